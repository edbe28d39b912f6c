"""How far the sampling engine's log-probs sit from the trainer's on the same tokens (users watch it with vLLM rollouts).

The PPO/GRPO losses use the trainer's own log-probs as the old ones; this only measures the gap, per iteration, as
the mean and max |sampler − trainer| over every response token of every rank.
"""

from __future__ import annotations

from typing import Any

import torch


class SamplerDrift:
    def __init__(self) -> None:
        self.sums: list[torch.Tensor] = []
        self.maxes: list[torch.Tensor] = []
        self.count = 0

    def add(self, trainer: torch.Tensor, sampler: torch.Tensor) -> None:
        """Per-token log-probs of the same tokens, in the same order (kept on the device: no host sync here)."""
        gap = (trainer.detach().float() - sampler.to(trainer.device).float()).abs()
        if gap.numel():
            self.sums.append(gap.sum())
            self.maxes.append(gap.max())
            self.count += gap.numel()

    def metrics(self, accelerator: Any) -> dict[str, float]:
        """{"sampler/logprob_diff_mean", "sampler/logprob_diff_max"} over all ranks, then reset; every rank calls it."""
        local = torch.tensor([float(torch.stack(self.sums).sum()) if self.sums else 0.0, float(self.count),
                              float(torch.stack(self.maxes).max()) if self.maxes else 0.0], dtype=torch.float64, device="cpu")  # fmt: skip
        self.__init__()
        if accelerator is not None and accelerator.num_processes > 1:
            local = accelerator.gather(local.to(accelerator.device)).cpu().view(-1, 3)
        else:
            local = local.view(1, 3)
        total, count = float(local[:, 0].sum()), float(local[:, 1].sum())
        if count == 0:
            return {}
        return {"sampler/logprob_diff_mean": total / count, "sampler/logprob_diff_max": float(local[:, 2].max())}
