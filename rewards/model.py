"""The reward model: a causal LM backbone with a scalar head, scored at the last real token.

Loading lives with the other model loading (`align.engine.models.load_reward_model`). Scores never come from HF's pad-token pooling: the index of the
last real token is derived from lengths (packed documents) or the attention mask (padded rows),
so the score cannot depend on padding side, on batch composition, or on pad == eos.

A vision-language reward model (the VLM with a `score` head, `align.engine.models.with_score_head`) takes the same
path; a batch with images hands its tiles to the forward as `pixel_values`, in the order of the image tokens.
"""

from __future__ import annotations

import torch

from data_builders.attention_layout import forward_hidden
from data_builders.packing import collate_rows
from data_builders.pair_rows import PairRows
from data_builders.samples import Sample

HEAD_NAMES = ("score", "classifier", "v_head")


def reward_head(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    for name in HEAD_NAMES:
        if isinstance(getattr(inner, name, None), torch.nn.Module):
            return getattr(inner, name)
    raise AttributeError(f"{type(inner).__name__} has no scalar head ({', '.join(HEAD_NAMES)})")


def _images(pixel_values: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The forward's image argument: none at all for a text batch (a text model's forward takes no `pixel_values`)."""
    return {} if pixel_values is None else {"pixel_values": pixel_values}


def _hidden(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            pixel_values: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, output_hidden_states=True,
                **_images(pixel_values))  # fmt: skip
    return out.hidden_states[-1]


def scores_at(model: torch.nn.Module, hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Scalar score of the hidden state at each (row, position), in fp32."""
    return reward_head(model)(hidden[rows, positions]).squeeze(-1).float()


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    pixel_values: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """One score per padded row (left or right padding): positions follow the mask, the score is read at its last 1."""
    mask = attention_mask.long()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = _hidden(model, input_ids, position_ids, mask, pixel_values)
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
    return scores_at(model, hidden, torch.arange(mask.shape[0], device=mask.device), last)


def packed_scores(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, ends: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """Scores of packed documents; `ends` is (docs, 2) of (row, index of the document's last token).

    Without `attention_mask` documents are separated by restarting positions (or, under flash-attention, by the
    boundaries of one flattened row); with a 4-D bool mask (shared-prefix pair rows) the mask decides, per layer type
    and in the form the model's attention takes (`data_builders/attention_layout.py`). `pixel_values`: the rows' image
    tiles, in the order of their image tokens.
    """
    lengths = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    lengths = lengths.scatter_reduce(0, ends[:, 0], ends[:, 1] + 1, reduce="amax")  # the last document ends each row
    hidden = forward_hidden(model, input_ids, position_ids, lengths, attention_mask, **_images(pixel_values))
    return scores_at(model, hidden, ends[:, 0], ends[:, 1])


def pair_scores(model: torch.nn.Module, rows: PairRows) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores of shared-prefix (or plain packed) pair rows (a prompt's image once per shared prefix)."""
    scores = packed_scores(model, rows.input_ids, rows.position_ids, rows.ends(rows.input_ids.device), rows.attention_mask, rows.pixel_values)
    return scores[0::2], scores[1::2]


def pack_documents(rows: list[list[list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Rows of token lists → (input_ids, position_ids, ends (docs, 2) in row order, non-pad tokens)."""
    batch = collate_rows([[Sample(ids, [0] * len(ids)) for ids in row] for row in rows], pad_id)
    ends = []
    for r, row in enumerate(rows):
        offset = 0
        for ids in row:
            offset += len(ids)
            ends.append((r, offset - 1))
    return batch.input_ids, batch.position_ids, torch.tensor(ends, device="cpu"), batch.num_tokens
