"""Reward-model losses (ranking, and the process reward model's per-step BCE), registered by name so a recipe picks one.

Each ranking loss maps per-pair chosen/rejected scores to per-pair losses; the trainer averages
over the pairs of the whole optimizer step. The log barrier keeps scores inside (−bound, bound)
so that rewards stay on one scale across conditions (InternLM2 §4.2; xtuner applies it to both
scores, in fp32, clamped at the edge).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rewards.loss_registry import get_loss, register_loss


@register_loss("bradley_terry", "ranking")
def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, **_: float) -> torch.Tensor:
    """−log σ(r_c − r_r − m): TRL RewardTrainer's loss, per pair."""
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff)


@register_loss("focal_ranking", "ranking")
def focal_ranking(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, gamma: float = 2.0, **_: float) -> torch.Tensor:
    """InternLM2 ranking loss with difficulty decay: −(1 − 2·max(0, P − 0.5))^γ · log P, P = σ(r_c − r_r).

    Easy pairs (P near 1) are down-weighted; pairs ranked wrongly (P < 0.5) keep weight 1.
    """
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    p = torch.sigmoid(diff)
    decay = (1 - 2 * torch.clamp(p - 0.5, min=0)) ** gamma
    return -decay * F.logsigmoid(diff)


def log_barrier(scores: torch.Tensor, bound: float = 5.0, eps: float = 1e-3) -> torch.Tensor:
    """−(log(r + b) + log(b − r)) per score, in fp32, with r clamped to [−b + eps, b − eps]."""
    r = torch.clamp(scores.float(), -bound + eps, bound - eps)
    return -(torch.log(r + bound) + torch.log(bound - r))


def pair_losses(
    name: str,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    gamma: float = 2.0,
    barrier_weight: float = 0.0,
    bound: float = 5.0,
) -> torch.Tensor:
    """Per-pair L_rank + λ·(L_pen(r_c) + L_pen(r_r)) / 2, so the pair mean is L_rank + λ·mean over all scores."""
    loss = get_loss(name, "ranking")(chosen, rejected, margin=margin, gamma=gamma)
    if barrier_weight:
        loss = loss + barrier_weight * 0.5 * (log_barrier(chosen, bound) + log_barrier(rejected, bound))
    return loss


@register_loss("bce", "step")
def step_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Process reward models: −[y·log σ(z) + (1 − y)·log(1 − σ(z))] per step, in fp32 (soft labels y in [0, 1] allowed)."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
