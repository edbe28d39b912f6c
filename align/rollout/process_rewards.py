"""A process reward model as an RL reward: the PRM replica behind the router's `prm` component, and its step scores as
token rewards (each on the response token that closes its step) in place of its aggregate in the sequence score."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from align.config import ModelConfig
from align.engine.models import load_reward_model, without_zero3_init
from align.model_paths import MAKE_PRM, check_model_path
from data_builders.errors import UserError
from rewards.prm import PRMInfo, ProcessRewardScorer
from rewards.router import RewardRouter

if TYPE_CHECKING:
    from align.config import PPOConfig


def load_process_scorer(ppo: PPOConfig, model: ModelConfig, tokenizer: Any, device: torch.device, dtype: torch.dtype, vocab_size: int,
                        row_tokens: int) -> ProcessRewardScorer | None:  # fmt: skip
    """The PRM (a frozen whole replica on each rank, as the RM), or None when no route uses one."""
    if not ppo.uses_process_reward_model:
        return None
    check_model_path(ppo.process_reward_model, "ppo.process_reward_model", MAKE_PRM)
    cfg = ModelConfig(name_or_path=ppo.process_reward_model, trust_remote_code=model.trust_remote_code, attn_implementation=model.attn_implementation)
    with without_zero3_init():
        prm = load_reward_model(cfg, tokenizer, dtype).to(device).eval().requires_grad_(False)
    if prm.config.vocab_size != vocab_size:
        raise UserError(f"ppo.process_reward_model has vocabulary {prm.config.vocab_size}, the policy {vocab_size}: its step "
                         "scores land on the policy's tokens, so they must share a tokenizer")  # fmt: skip
    return ProcessRewardScorer(prm, tokenizer, PRMInfo.read(ppo.process_reward_model), ppo.prm_aggregation, row_tokens=row_tokens,
                               autocast_dtype=dtype)  # fmt: skip


def dense_step_rewards(router: RewardRouter, rollouts: Sequence[Any]) -> list[torch.Tensor]:
    """Per rollout, per response token: the route's prm weight × P(good step) on each step's closing token, else 0."""
    out = [torch.zeros(len(r.response_ids), device="cpu") for r in rollouts]
    picked = [i for i, r in enumerate(rollouts) if "prm" in router.route(r.condition or "default")]
    samples = [{"condition": rollouts[i].condition or "default", "prompt": rollouts[i].prompt, "response": rollouts[i].response} for i in picked]
    for i, steps in zip(picked, router.process_scorer.step_token_rewards(samples) if samples else [], strict=True):
        weight, last = router.route(rollouts[i].condition or "default")["prm"], len(rollouts[i].response_ids) - 1
        for token, probability in steps:  # a truncated answer's last step closes one past its end: its last token
            out[i][min(max(token, 0), last)] += weight * probability
    return out


def outcome_reward(router: RewardRouter, rollout: Any, dense: bool) -> float:
    """The sequence-level reward: the router's total, less the PRM's aggregate when (`dense`) its steps are token rewards."""
    if not dense or "prm" not in rollout.reward_parts:
        return rollout.reward
    return rollout.reward - router.route(rollout.condition or "default")["prm"] * rollout.reward_parts["prm"]
