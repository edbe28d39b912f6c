"""From scored rollouts to PPO experience: packed batches, per-token log-probs and values, advantages.

Rollouts are packed several to a row (positions restart per document, so they never attend to each
other; under flash-attention the rows become one flattened row with sequence boundaries,
`data_builders/attention_layout.py`) and the model's logits path runs only where a response token is
predicted. Per-token tensors come back in the order of the rollouts given, one 1-D tensor per rollout,
and are stored on the `Rollout` (step-level fields) until the update has used them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from align.losses.advantages import group_centred, grpo_advantages, returns_to_go, rloo_advantages
from align.losses.logprobs import hidden_states, logprobs_and_entropy_of, logprobs_of
from align.losses.ppo import gae, kl_estimate, token_rewards
from align.rollout.buffer import Rollout
from data_builders.attention_layout import forward_hidden
from data_builders.packing import collate_rows, pack_best_fit
from data_builders.samples import Sample, TokenBatch
from rewards.model import reward_head


@dataclass
class RolloutBatch:
    tokens: TokenBatch  # packed rows; targets only where a response token is predicted
    order: list[int]  # index (into the micro-batch's rollouts) of each document, in flattened target order
    lengths: list[int]  # response tokens of each document, same order

    def to(self, device: torch.device | str) -> RolloutBatch:
        return RolloutBatch(self.tokens.to(device), self.order, self.lengths)

    def per_rollout(self, flat: torch.Tensor, count: int) -> list[torch.Tensor]:
        """Flat per-target values → one tensor per rollout, in the micro-batch's rollout order."""
        out: list[torch.Tensor] = [torch.empty(0, device="cpu")] * count
        for i, part in zip(self.order, flat.split(self.lengths), strict=True):
            out[i] = part
        return out

    def flat(self, per_rollout: Sequence[torch.Tensor]) -> torch.Tensor:
        """The inverse of `per_rollout`: one rollout-ordered tensor each → the flattened target order."""
        return torch.cat([per_rollout[i] for i in self.order])


def collate_rollouts(rollouts: Sequence[Rollout], pad_id: int, row_tokens: int) -> RolloutBatch:
    """Pack prompt + response of each rollout, best fit into rows of `row_tokens` (a longer one gets its own row)."""
    lengths = [r.num_tokens for r in rollouts]
    rows = pack_best_fit(lengths, max(row_tokens, max(lengths)))
    docs = [[Sample(list(rollouts[i].prompt_ids) + list(rollouts[i].response_ids),
                    [0] * len(rollouts[i].prompt_ids) + [1] * len(rollouts[i].response_ids)) for i in row] for row in rows]  # fmt: skip
    order = [i for row in rows for i in row]
    return RolloutBatch(collate_rows(docs, pad_id), order, [len(rollouts[i].response_ids) for i in order])


def actor_logprobs(model: torch.nn.Module, batch: RolloutBatch, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat log π(response token) in target order (and the policy's entropy there)."""
    tokens = batch.tokens
    mask = tokens.targets != -100
    hidden = hidden_states(model, tokens.input_ids, tokens.position_ids, tokens.lengths())[mask]
    if with_entropy:
        return logprobs_and_entropy_of(model, hidden, tokens.targets[mask])
    return logprobs_of(model, hidden, tokens.targets[mask]), None


def critic_values(model: torch.nn.Module, batch: RolloutBatch, critic: torch.nn.Module, **forward: object) -> torch.Tensor:
    """Flat V(prompt + response[:t]) in target order: the value head on the hidden state that predicts token t."""
    tokens = batch.tokens
    hidden = forward_hidden(model, tokens.input_ids, tokens.position_ids, tokens.lengths(), attention_of=critic, **forward)
    hidden = hidden[tokens.targets != -100]
    return reward_head(critic)(hidden).squeeze(-1).float()


def pad_tokens(values: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D tensors → (n, longest) right-padded with 0, and the mask of real entries."""
    longest = max((len(v) for v in values), default=0)
    out = torch.zeros(len(values), longest, device="cpu")
    mask = torch.zeros(len(values), longest, device="cpu")
    for i, v in enumerate(values):
        out[i, : len(v)] = v.float()
        mask[i, : len(v)] = 1
    return out, mask


def assign_advantages(rollouts: Sequence[Rollout], scores: torch.Tensor, kl_coef: float, estimator: str, gamma: float,
                      lam: float, dense: Sequence[torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """Token rewards (score at the last token − kl_coef·KL per token, plus `dense` per-token rewards such as a PRM's step
    scores), GAE advantages and returns, written onto each rollout.

    Returns each rollout's summed KL estimate.
    """
    kl, mask = token_kl(rollouts, estimator)
    values, _ = pad_tokens([r.values for r in rollouts])
    advantages, returns = gae(with_dense(token_rewards(scores, kl, mask, kl_coef), dense), values, mask, gamma, lam)
    write_back(rollouts, advantages, returns)
    return kl.sum(-1)


def token_kl(rollouts: Sequence[Rollout], estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, tokens) KL(π‖π_ref) estimate per response token from the stored log-probs, and the response mask."""
    logprobs, mask = pad_tokens([r.logprobs for r in rollouts])
    ref, _ = pad_tokens([r.ref_logprobs for r in rollouts])
    return kl_estimate(logprobs, ref, estimator) * mask, mask


def write_back(rollouts: Sequence[Rollout], advantages: torch.Tensor, returns: torch.Tensor) -> None:
    """Each rollout's row of the padded (batch, tokens) advantages and returns, unpadded, as its step-level fields."""
    for i, r in enumerate(rollouts):
        n = len(r.response_ids)
        r.advantages, r.returns = advantages[i, :n].clone(), returns[i, :n].clone()


def with_dense(rewards: torch.Tensor, dense: Sequence[torch.Tensor] | None) -> torch.Tensor:
    """(batch, tokens) token rewards plus one 1-D per-token reward tensor per rollout (None: unchanged)."""
    if dense is None:
        return rewards
    extra, _ = pad_tokens(dense)
    return rewards + extra[:, : rewards.shape[1]]


def assign_group_advantages(rollouts: Sequence[Rollout], scores: torch.Tensor, estimator: str, group_size: int, kl_coef: float,
                            kl_estimator: str, gamma: float = 1.0, scale: str = "group",
                            batch_std: Callable[[torch.Tensor], float] | None = None,
                            dense: Sequence[torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """Critic-free advantages (see `align.losses.advantages`) written onto each rollout; `kl_coef` is the KL in the reward
    (0 when the KL is a loss term). The rollouts are in group order; `batch_std` gives the std of scores over every rank
    (grpo's `scale="batch"`). Returns each rollout's summed KL estimate.

    grpo / rloo: the sequence's KL-penalised score against its group's baseline, the same advantage on every token;
    reinforce_baseline: r − group mean at the last token, −kl_coef·KL per token (+ `dense` rewards), returns to go
    (whitened by the caller).
    """
    kl, mask = token_kl(rollouts, kl_estimator)
    if estimator == "reinforce_baseline":
        rewards = with_dense(token_rewards(group_centred(scores.float(), group_size), kl, mask, kl_coef), dense)
        advantages = returns_to_go(rewards, mask, gamma)
    else:
        penalised = scores.float() - kl_coef * kl.sum(-1)
        if estimator == "grpo":
            per_sequence = grpo_advantages(penalised, group_size, scale, batch_std(penalised) if scale == "batch" and batch_std else None)
        elif estimator == "rloo":
            per_sequence = rloo_advantages(penalised, group_size)
        else:
            raise ValueError(f"unknown critic-free estimator {estimator!r}")
        advantages = per_sequence[:, None] * mask
    write_back(rollouts, advantages, advantages)  # no critic: the returns are the advantages (the buffer's one record shape)
    return kl.sum(-1)
