"""Actor and critic as one module, so one DeepSpeed engine (one ZeRO-3 partitioning, one optimizer) trains both.

accelerate prepares one model per DeepSpeed plugin; TRL's old PPO trainer used the same trick
(`PolicyAndValueWrapper`). The two keep separate parameter groups, so each has its own learning rate
and schedule: the actor's multiplier is 0 during the critic warm-up (InternLM2: 50 iterations with the
actor frozen), the critic's follows the schedule from the first step.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedTokenizerBase

from align.engine.optim import lr_multiplier, warmup_steps

if TYPE_CHECKING:
    from align.config import OptimConfig


class ActorCritic(torch.nn.Module):
    """`forward(role="actor" | "critic", **inputs)`: the policy LM or the value model (RM backbone + head).

    `critic` is None for the critic-free estimators (GRPO, RLOO, REINFORCE++): the same module, loop and checkpoints,
    with the actor alone inside.
    """

    def __init__(self, actor: torch.nn.Module, critic: torch.nn.Module | None):
        super().__init__()
        self.actor, self.critic = actor, critic
        self.config = actor.config  # what the log-prob helpers read (attention implementation)

    def forward(self, *args, role: str = "actor", **kwargs):
        if role != "actor" and self.critic is None:
            raise RuntimeError("this run has no critic (a critic-free advantage estimator)")
        return (self.actor if role == "actor" else self.critic)(*args, **kwargs)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.actor.get_output_embeddings()

    # generation helpers (TRL's `unwrap_model_for_generation`) toggle checkpointing on the unwrapped model
    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.actor, "is_gradient_checkpointing", False))

    def gradient_checkpointing_disable(self) -> None:
        self.actor.gradient_checkpointing_disable()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.actor.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)


def _groups(module: torch.nn.Module, lr: float, weight_decay: float, name: str) -> list[dict]:
    decay, no_decay = [], []
    for pname, param in module.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or pname.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr, "role": name}, {"params": no_decay, "weight_decay": 0.0, "lr": lr, "role": name}]
    return [g for g in groups if g["params"]]


def build_actor_critic_optimizer(model: ActorCritic, cfg: OptimConfig, critic_lr: float) -> torch.optim.Optimizer:
    groups = _groups(model.actor, cfg.lr, cfg.weight_decay, "actor")
    if model.critic is not None:
        groups += _groups(model.critic, critic_lr, cfg.weight_decay, "critic")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def build_actor_critic_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, actor_frozen_steps: int) -> LambdaLR:
    """Per-group multipliers: the critic's schedule spans every step; the actor's starts after the warm-up."""
    actor_steps = max(1, total_steps - actor_frozen_steps)
    warm_actor, warm_critic = warmup_steps(cfg, actor_steps), warmup_steps(cfg, total_steps)

    def actor(step: int) -> float:
        if step < actor_frozen_steps:
            return 0.0
        return lr_multiplier(step - actor_frozen_steps, actor_steps, warm_actor, cfg.schedule, cfg.min_lr_ratio)

    def critic(step: int) -> float:
        return lr_multiplier(step, total_steps, warm_critic, cfg.schedule, cfg.min_lr_ratio)

    return LambdaLR(optimizer, [actor if g["role"] == "actor" else critic for g in optimizer.param_groups])


def export_actor_critic(accelerator: Accelerator, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, run_dir: Path) -> dict[str, Path]:
    """`run_dir/model` (the policy) and `run_dir/critic` (if there is one), plain transformers + safetensors, written atomically."""
    state = accelerator.get_state_dict(model)  # consolidates ZeRO-3 partitions on rank 0
    inner = accelerator.unwrap_model(model)
    out = {"actor": run_dir / "model"} | ({"critic": run_dir / "critic"} if inner.critic is not None else {})
    if accelerator.is_main_process:
        for role, target in out.items():
            sub = {k[len(role) + 1 :]: v for k, v in state.items() if k.startswith(role + ".")}
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            getattr(inner, role).save_pretrained(tmp, state_dict=sub, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    accelerator.wait_for_everyone()
    return out
