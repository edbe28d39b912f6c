"""PPO pieces for COOL RLHF (InternLM2 §4.2), as pure functions over one response's tokens.

- token rewards: the reward model's scalar at the final token (clipped to [−bound, bound] and
  normalised upstream), minus a per-token KL penalty kl_coef·KL(π‖π_ref) with the k1 or k3 estimator;
- GAE with γ = 1 and λ = 0.99 by default (InternLM2), returns = advantages + values;
- the clipped policy loss (ε = 0.2), the value loss (clipping optional, off as in InternLM2),
  entropy and explained variance for logging.

Everything works on padded (batch, tokens) tensors with a response mask, in fp32.
"""

from __future__ import annotations

import torch


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate from samples of π: k1 = log r, k3 = (r⁻¹ − 1) + log r with r = π/π_ref (Schulman)."""
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1 or k3")


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """(batch, tokens): −kl_coef·KL at every response token, plus the sequence score at its last response token."""
    rewards = -kl_coef * kl.float() * mask
    last = (mask.long() * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += score.float()
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; the value after the last token is 0. Returns (advantages, returns)."""
    rewards, values, mask = rewards.float(), values.float() * mask, mask.float()
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * mask[:, t]  # padding contributes nothing and resets nothing before the response
        advantages[:, t] = running
        next_value = torch.where(mask[:, t] > 0, values[:, t], next_value)
    return advantages, (advantages + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def policy_loss_tokens(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       clip: float = 0.2, clip_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-token PPO clipped surrogate max(−A·r, −A·clip(r)), and where the clip was active; `clip_high`: DAPO's upper bound."""
    ratio = torch.exp(logprobs.float() - old_logprobs.float())
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + (clip if clip_high is None else clip_high))
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """PPO clipped surrogate, token mean; also the share of tokens where the clip was active."""
    loss, clipped = policy_loss_tokens(logprobs, old_logprobs, advantages, clip)
    return masked_mean(loss, mask), masked_mean(clipped, mask).detach()


def value_loss_tokens(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """Per-token 0.5·(V − R)²; with `clip`, the max of the clipped and unclipped errors (off in InternLM2)."""
    error = (values.float() - returns) ** 2
    if clip is not None:
        clipped = old_values + (values.float() - old_values).clamp(-clip, clip)
        error = torch.maximum(error, (clipped - returns) ** 2)
    return 0.5 * error


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = None) -> torch.Tensor:  # fmt: skip
    """0.5·(V − R)², token mean (see `value_loss_tokens`)."""
    return masked_mean(value_loss_tokens(values, old_values, returns, clip), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V) / Var(R) over response tokens: 1 is a perfect critic, ≤ 0 no better than a constant."""
    r, v = returns[mask.bool()].double(), values[mask.bool()].double()
    var = r.var(unbiased=False)
    return float(1 - (r - v).var(unbiased=False) / var) if var > 0 else float("nan")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits), in fp32."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


class RunningMoments:
    """Running mean and std of a stream (Chan et al.'s parallel update), for reward normalisation.

    Updated with every rank's batch at once (sum, sum of squares and count all-reduced by the caller),
    so all ranks hold the same moments; `state_dict` carries them through checkpoints.
    """

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, total: float, squares: float, count: float) -> None:
        if count <= 0:
            return
        batch_mean = total / count
        batch_var = max(squares / count - batch_mean**2, 0.0)
        new_count = self.count + count
        delta = batch_mean - self.mean
        if self.count == 0:
            self.mean, self.var = batch_mean, batch_var
        else:
            m2 = self.var * self.count + batch_var * count + delta**2 * self.count * count / new_count
            self.mean, self.var = self.mean + delta * count / new_count, m2 / new_count
        self.count = new_count

    @property
    def std(self) -> float:
        return self.var**0.5

    def normalize(self, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        return (x - self.mean) / max(self.std, eps)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
