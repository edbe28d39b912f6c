"""Preference-optimisation losses (MPO = preference + quality + generation), registered by name.

Every loss takes the same `PreferenceInputs` and returns per-pair numerators plus the unit they
average over ("pairs" or "chosen_tokens"); the trainer divides by the step's total of that unit, so
each component is an exact step mean however the step is split into micro-batches and ranks. A
recipe mixes them with weights, e.g. MPO `{sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}` (InternVL2.5-MPO).

lr_c / lr_r are the log-ratios of the chosen / rejected responses: summed response-token log-probs
of the policy minus the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from align.losses import register_loss


@dataclass
class PreferenceInputs:
    chosen_logratios: torch.Tensor  # (pairs,) lr_c
    rejected_logratios: torch.Tensor  # (pairs,) lr_r
    chosen_nll: torch.Tensor  # (pairs,) summed −log π(chosen response tokens)
    chosen_tokens: torch.Tensor  # (pairs,) response tokens of chosen
    beta: float
    delta: float = 0.0  # BCO's reward shift (running mean of past rewards)


@register_loss("sigmoid", "preference")
def dpo_sigmoid(x: PreferenceInputs) -> tuple[torch.Tensor, str]:
    """Preference (DPO): −log σ(β·lr_c − β·lr_r)."""
    return -F.logsigmoid(x.beta * (x.chosen_logratios - x.rejected_logratios)), "pairs"


@register_loss("bco_pair", "preference")
def bco_pair(x: PreferenceInputs) -> tuple[torch.Tensor, str]:
    """Quality (BCO): −log σ(β·lr_c − δ) − log σ(−(β·lr_r − δ)); each response judged on its own."""
    return -F.logsigmoid(x.beta * x.chosen_logratios - x.delta) - F.logsigmoid(-(x.beta * x.rejected_logratios - x.delta)), "pairs"


@register_loss("sft", "preference")
def generation_token_mean(x: PreferenceInputs) -> tuple[torch.Tensor, str]:
    """Generation: NLL of the chosen response, averaged over all chosen tokens (official InternVL code, TRL)."""
    return x.chosen_nll, "chosen_tokens"


@register_loss("sft_sequence", "preference")
def generation_sequence_mean(x: PreferenceInputs) -> tuple[torch.Tensor, str]:
    """Generation, the paper's equation: each chosen response's NLL divided by its own length, then the pair mean."""
    return x.chosen_nll / x.chosen_tokens.clamp(min=1), "pairs"


@register_loss("ipo", "preference")
def ipo(x: PreferenceInputs) -> tuple[torch.Tensor, str]:
    """IPO: (lr_c − lr_r − 1/(2β))²."""
    return (x.chosen_logratios - x.rejected_logratios - 1 / (2 * x.beta)) ** 2, "pairs"


@register_loss("hinge", "preference")
def hinge(x: PreferenceInputs) -> tuple[torch.Tensor, str]:
    """SLiC hinge: max(0, 1 − β·(lr_c − lr_r))."""
    return torch.relu(1 - x.beta * (x.chosen_logratios - x.rejected_logratios)), "pairs"


@dataclass
class RunningMean:
    """BCO's δ: the cumulative mean of every past update's values, as TRL's former `RunningMoments.mean`.

    Each update adds one value per rank (that rank's micro-batch mean of β·lr_c and β·lr_r, gathered),
    and δ is read after the update, so the first step already uses its own batch. Saved in checkpoints.
    """

    mean: float = 0.0
    count: int = 0

    def update(self, values: torch.Tensor) -> float:
        values = values.detach().double().flatten()
        if values.numel() and bool(torch.isfinite(values).all()):  # a non-finite step is skipped; so is its update
            total = self.count + values.numel()
            self.mean += (float(values.sum()) - values.numel() * self.mean) / total
            self.count = total
        return self.mean

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])
