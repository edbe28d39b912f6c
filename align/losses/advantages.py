"""Critic-free advantages (GRPO, RLOO, REINFORCE++-baseline) and the policy-loss normalisations, as pure functions.

Scores arrive as one flat tensor in group order: the `group_size` samples of a prompt sit next to each other (how
`collect_rollouts` returns them), so a prompt's group never spans ranks. What each estimator does:

- `grpo` (DeepSeekMath; TRL's `GRPOTrainer`): A = r − mean(group), divided by the group's std (`scale="group"`,
  Bessel-corrected as TRL's `nanstd`), by the whole batch's std (`"batch"`, all ranks) or not at all (`"none"`, Dr. GRPO),
  plus 1e-4 as TRL; the same A on every token of the response.
- `rloo` (Ahmadian et al. 2024; TRL's `RLOOTrainer`): A = r − mean of the *other* samples of the group; every token.
- `reinforce_baseline` (OpenRLHF's REINFORCE++-baseline): r − mean(group) as the score at the last token, the KL
  penalty per token, returns summed to go (γ), then whitened over every token of the batch on all ranks (the buffer).

The loss normalisations (TRL's `loss_type`) turn per-token losses into one step loss. We normalise over the whole
optimizer step on every rank (not TRL's micro-batch), so each is a weight per token: `dapo` the step's token mean,
`grpo` the mean over sequences of each sequence's token mean, `dr_grpo` the sum over (sequences × max new tokens), and
`bnpo` each micro-batch's token mean averaged over the step's micro-batches (TRL's local-batch normalisation, kept for
parity with it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_baseline")
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
STD_EPS = 1e-4  # TRL's


def grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    return scores.double().view(-1, group_size)


def group_std(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-sample std of its group (Bessel-corrected; 0 for groups of one)."""
    groups = grouped(scores, group_size)
    std = groups.std(-1, correction=1) if group_size > 1 else torch.zeros(groups.shape[0], dtype=groups.dtype, device=groups.device)
    return std.repeat_interleave(group_size).to(scores.dtype)


def grpo_advantages(scores: torch.Tensor, group_size: int, scale: str = "group", batch_std: float | None = None) -> torch.Tensor:
    """r − group mean, scaled by the group std, a batch std (`batch_std`: over all ranks, computed by the caller) or nothing."""
    groups = grouped(scores, group_size)
    centred = (groups - groups.mean(-1, keepdim=True)).flatten()
    if scale == "group":
        return (centred / (group_std(scores, group_size).double() + STD_EPS)).to(scores.dtype)
    if scale == "batch":
        if batch_std is None:
            raise ValueError("scale='batch' needs the batch std (over every rank's scores)")
        return (centred / (batch_std + STD_EPS)).to(scores.dtype)
    if scale == "none":
        return centred.to(scores.dtype)
    raise ValueError(f"unknown scale {scale!r}; use group, batch or none")


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """r − the mean of the group's other samples (0 for groups of one: no baseline to leave out)."""
    if group_size < 2:
        return torch.zeros_like(scores)
    groups = grouped(scores, group_size)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).flatten().to(scores.dtype)


def group_centred(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """r − group mean (REINFORCE++-baseline's score before the KL and the batch whitening)."""
    groups = grouped(scores, group_size)
    return (groups - groups.mean(-1, keepdim=True)).flatten().to(scores.dtype)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """(batch, tokens) discounted sum of the rewards from each response token to the end (REINFORCE's return)."""
    rewards, mask = rewards.float() * mask, mask.float()
    out = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token exp(ref − logp) − (ref − logp) − 1 ≥ 0 (Schulman's k3, as TRL's GRPO loss term): differentiable in logp."""
    delta = ref_logprobs.float() - logprobs.float()
    return torch.expm1(delta) - delta


def token_loss_weights(micro_batches: Sequence[Sequence[tuple[int, bool]]], loss_type: str, step_totals: dict[str, float],
                       max_new_tokens: int) -> list[list[torch.Tensor]]:  # fmt: skip
    """Per micro-batch, per rollout: a weight for each response token so that Σ weight·loss over the step is the step loss.

    `micro_batches`: this rank's (response length, trained) per rollout of each micro-batch (an untrained rollout, e.g. a
    dropped truncated answer, gets zeros); `step_totals`: "tokens", "sequences" and "micro_batches" over every rank.
    """
    tokens, sequences = max(step_totals["tokens"], 1.0), max(step_totals["sequences"], 1.0)
    out = []
    for rollouts in micro_batches:
        micro_tokens = max(sum(n for n, trained in rollouts if trained), 1)
        weights = []
        for n, trained in rollouts:
            if loss_type == "dapo":
                w = 1.0 / tokens
            elif loss_type == "grpo":
                w = 1.0 / (max(n, 1) * sequences)
            elif loss_type == "dr_grpo":
                w = 1.0 / (sequences * max_new_tokens)
            elif loss_type == "bnpo":
                w = 1.0 / (micro_tokens * max(step_totals["micro_batches"], 1.0))
            else:
                raise ValueError(f"unknown loss type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
            weights.append(torch.full((n,), w if trained else 0.0, dtype=torch.float32, device="cpu"))
        out.append(weights)
    return out
