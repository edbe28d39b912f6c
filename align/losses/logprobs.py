"""Log-probabilities of target tokens without full-vocabulary logits for the whole batch.

The model runs with `logits_to_keep=1`, so it computes no logits itself; the model's own logits path
(`losses/logits.py`: the LM head plus whatever the architecture does after it, e.g. Cohere's scale or Gemma's
soft-cap) is then applied only at positions that have a target, in chunks, each chunk recomputed in backward
(activation checkpointing), so peak memory holds one chunk of fp32 logits rather than
rows × length × vocab. Rows reach the attention in the layout it supports (`data_builders/attention_layout.py`).
The gather is written here rather than imported from TRL
(`trl.trainer.utils.selective_log_softmax`): importing any part of trl costs ~100 MB of RSS and a
second of start-up, more than the whole 1M-parameter model of the CPU benchmarks, and TRL's version
loops over rows in fp32.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from align.losses.logits import logits_path
from data_builders.attention_layout import forward_hidden
from data_builders.samples import TokenBatch

CHUNK_TOKENS = 4096


def final_hidden_states(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """(rows, length, hidden) after the final norm. `use_cache=False` keeps packed documents apart; a batch with images
    hands the model its tiles (in the order of the rows' image tokens, which is how a VLM scatters them)."""
    return hidden_states(model, batch.input_ids, batch.position_ids, batch.lengths(), pixel_values=batch.pixel_values)


def hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, lengths: torch.Tensor,
                  pair_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(rows, length, hidden) after the final norm, with no logits computed (`logits_to_keep=1`).

    `lengths`: real tokens per row (padding is trailing); `pair_mask`: shared-prefix pair rows' 4-D bool mask;
    `pixel_values`: the image tiles of the rows, if any.
    """
    images = {} if pixel_values is None else {"pixel_values": pixel_values}
    return forward_hidden(model, input_ids, position_ids, lengths, pair_mask, logits_to_keep=1, **images)


def _chunk_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in fp32: the target logit minus one logsumexp per position."""
    logits = head(hidden)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def target_logprobs(model: torch.nn.Module, batch: TokenBatch, chunk_tokens: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) at every position that has one, flattened, and the boolean mask of those positions."""
    hidden = final_hidden_states(model, batch)
    mask = batch.targets != -100
    return logprobs_of(model, hidden[mask], batch.targets[mask], chunk_tokens), mask


def logprobs_of(model: torch.nn.Module, selected: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """log p(target) from final hidden states (tokens, hidden): the logits path runs on these positions only, chunked."""
    return _chunked(_chunk_logprobs, logits_path(model), selected, targets, chunk_tokens)


def _chunked(fn, head, selected: torch.Tensor, targets: torch.Tensor, chunk_tokens: int):
    """`fn(head, hidden, targets)` over chunks of positions, each recomputed in backward; outputs concatenated."""
    if selected.shape[0] <= chunk_tokens:
        return fn(head, selected, targets)
    parts = [checkpoint(fn, head, h, t, use_reentrant=False) for h, t in zip(selected.split(chunk_tokens), targets.split(chunk_tokens))]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def _chunk_logprobs_entropy(head, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden)
    logz = torch.logsumexp(logits, dim=-1)
    with torch.no_grad():  # entropy is logged, never trained on
        entropy = logz - (logits.softmax(-1) * logits).sum(-1)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz, entropy


def logprobs_and_entropy_of(model: torch.nn.Module, selected: torch.Tensor, targets: torch.Tensor,
                            chunk_tokens: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`logprobs_of` plus the (detached) entropy of each position's distribution, from the same logits."""
    return _chunked(_chunk_logprobs_entropy, logits_path(model), selected, targets, chunk_tokens)
