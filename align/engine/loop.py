"""The one training loop and the one guarded optimizer step every trainer uses.

`Stepper.step(micro_batches, loss_fn)` is the only place a gradient is applied (`fit` for SFT, RM
and MPO; the PPO loop in `trainers/rlhf.py`). Each micro-batch's loss is its exact share of the
step mean (see trainers/base.py), scaled by G·W to cancel the averaging that DeepSpeed (÷G, mean
over ranks) and DDP (mean over ranks) apply; DDP syncs gradients only on the last micro-batch.

The non-finite guard costs one small all-reduce and one host sync per optimizer step: every
micro-batch is backpropagated, the (bad-count, loss, tokens) of all of them are reduced once at the
end, and a step with any non-finite loss on any rank, or a non-finite gradient norm, is discarded
on every rank (gradients zeroed, no optimizer or schedule step) and counted. Backpropagating a
bad loss is safe: the plain path zeroes the poisoned gradients, and ZeRO-3's zero_grad resets its
accumulation counter so the next step's first reduction overwrites them. On the DeepSpeed path the
gradient norm is checked by DeepSpeed itself (a non-finite norm skips its step; we read
`was_step_applied`). `max_bad_steps` skipped steps in a row stop the run with an error, before
any checkpoint could hold poisoned weights.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from align.config import flat_dict
from align.engine.accelerator import fill_model_sizes
from align.engine.checkpoint import Checkpointer
from align.engine.core import Engine
from align.engine.logger import RunLogger
from align.engine.optim import build_optimizer, build_scheduler
from align.engine.plan import StepPlan, eval_micro_batches


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class LoopState:
    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    bad_streak: int = 0
    train_seconds: float = 0.0


@dataclass
class StepResult:
    """What one optimizer step did, summed over ranks (loss and tokens cover the finite micro-batches)."""

    applied: bool
    loss: float
    tokens: int
    grad_norm: float | None
    metrics: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # detached per-micro-batch values, this rank


LossFn = Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Stepper:
    """The guarded optimizer step (see the module docstring), for plain accelerate and a DeepSpeed engine alike."""

    def __init__(self, engine: Engine, model, optimizer, scheduler, max_grad_norm: float, max_bad_steps: int = 3):
        self.engine, self.model, self.optimizer, self.scheduler = engine, model, optimizer, scheduler
        self.max_grad_norm, self.max_bad_steps = max_grad_norm, max_bad_steps
        self.scale = engine.shape.gradient_accumulation_steps * engine.world_size if engine.deepspeed else engine.world_size
        self.skipped_steps = 0
        self.bad_streak = 0

    def step(self, micro_batches: Sequence[Any], loss_fn: LossFn, tokens: float = 0.0) -> StepResult:
        """Forward + backward every micro-batch through `loss_fn`, then apply the step unless anything was non-finite.

        `tokens` is this rank's token count, summed over ranks in the same reduction (for logging).
        """
        device = self.engine.device
        bad = torch.zeros((), device=device)
        share = torch.zeros((), device=device)
        metrics: dict[str, list[torch.Tensor]] = {}
        last = len(micro_batches) - 1
        for g, item in enumerate(micro_batches):
            with self._sync(g == last):
                loss, values = loss_fn(item)
                local = loss.detach().float()
                finite = torch.isfinite(local)
                bad += (~finite).float()
                share += torch.where(finite, local, torch.zeros_like(local))
                self._backward(loss * self.scale, g == last)
            for key, value in values.items():
                metrics.setdefault(key, []).append(value.detach().float())
        check = torch.stack([bad, share, torch.tensor(float(tokens), device=device)])
        n_bad, loss_sum, token_sum = self.engine.accelerator.reduce(check, "sum").tolist()
        applied, norm = self._finish(n_bad == 0)
        if applied:
            self.bad_streak = 0
        else:
            self.skipped_steps += 1
            self.bad_streak += 1
            if self.bad_streak >= self.max_bad_steps:
                raise NonFiniteLossError(
                    f"{self.bad_streak} optimizer steps in a row had a non-finite loss or gradient norm "
                    f"({self.skipped_steps} skipped in all); stopping without saving. Lower optim.lr or check the data."
                )
        return StepResult(applied, loss_sum, int(token_sum), norm, metrics)

    def _sync(self, boundary: bool):
        """DDP all-reduces gradients on the boundary micro-batch only (DeepSpeed takes the boundary flag instead)."""
        if boundary or self.engine.deepspeed or self.engine.world_size == 1:
            return contextlib.nullcontext()
        return self.engine.accelerator.no_sync(self.model)

    def _backward(self, loss: torch.Tensor, boundary: bool) -> None:
        if self.engine.deepspeed:
            self.model.set_gradient_accumulation_boundary(boundary)
            self.model.backward(loss)
        else:
            self.engine.accelerator.backward(loss)

    def _finish(self, ok: bool) -> tuple[bool, float | None]:
        """Apply the accumulated gradients if `ok` and their norm is finite; returns (applied, grad norm)."""
        norm = None
        if self.engine.deepspeed:
            if ok:
                self.model.step()  # clips (gradient_clipping); skips itself on a non-finite norm
                ok = self.model.was_step_applied()
                if ok:
                    self.scheduler.step()  # accelerate hands DeepSpeed only its own schedule types, not ours
                    norm = self.model.get_global_grad_norm()
                    norm = float(norm) if norm is not None else None
            if not ok:
                self.model.optimizer.zero_grad()  # also resets ZeRO-3's accumulation counter
            return ok, norm
        if ok:
            if self.max_grad_norm > 0:
                norm = float(self.engine.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm))
                ok = math.isfinite(norm)
            if ok:
                self.optimizer.step()
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return ok, norm


def evaluate_loss(engine: Engine, trainer, model) -> dict[str, float]:
    """Exact mean loss over the eval rows, sharded across ranks."""
    if not trainer.eval_rows:
        return {}
    ids = list(range(len(trainer.eval_rows)))
    totals = trainer.units(ids, "eval")
    acc = torch.zeros((), device=engine.device)
    model.eval()
    with torch.no_grad():
        for row_ids, real in eval_micro_batches(len(ids), engine.rank, engine.world_size, engine.shape.micro_batch_size):
            batch = trainer.collate(row_ids, "eval").to(engine.device)
            loss, _ = trainer.loss(model, batch, totals)
            if real:
                acc += loss.detach().float()
    model.train()
    return {"eval/loss": float(engine.accelerator.reduce(acc, "sum"))}


def fit(engine: Engine, trainer) -> dict:
    """Train `trainer` to the end of its plan, resuming if a checkpoint exists; returns loop facts."""
    recipe, acc = engine.recipe, engine.accelerator
    cfg = recipe.train
    plan = StepPlan(len(trainer.train_rows), engine.shape, cfg.seed, cfg.epochs, cfg.max_steps)
    optimizer = build_optimizer(trainer.model, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.optim, plan.total_steps)
    fill_model_sizes(acc, trainer.model)
    model, optimizer, scheduler = acc.prepare(trainer.model, optimizer, scheduler)
    trainer.model = model
    model.train()

    ckpt = Checkpointer(acc, engine.run_dir / "checkpoints", cfg.keep_last, recipe=recipe)
    ckpt.clean_partial()
    state = LoopState()
    latest = ckpt.resume_point(cfg.resume)  # newest verified checkpoint of this recipe
    if latest is not None:
        saved = ckpt.load(latest)
        state = LoopState(**saved["loop"])
        trainer.load_state_dict(saved.get("trainer", {}))
        if engine.is_main:
            print(f"resumed from {latest} at step {state.step}", flush=True)

    logger = RunLogger(recipe.logging, engine.run_dir, flat_dict(recipe), plan.total_steps, engine.is_main, trainer.name)
    logger.set_progress(state.step)
    stepper = Stepper(engine, model, optimizer, scheduler, recipe.optim.max_grad_norm, cfg.max_bad_steps)
    stepper.skipped_steps, stepper.bad_streak = state.skipped_steps, state.bad_streak
    window_metrics: dict[str, list[torch.Tensor]] = {}
    log_loss, log_tokens, log_steps, log_start = 0.0, 0, 0, time.perf_counter()
    last_loss: float | None = None

    while state.step < plan.total_steps:
        step_start = time.perf_counter()
        totals = trainer.units(plan.step_rows(state.step), "train")
        batches = [trainer.collate(row_ids, "train") for row_ids in plan.micro_batches(state.step, engine.rank)]
        tokens = sum(b.num_tokens for b in batches)  # counted on the host copy: no device sync

        def micro_loss(batch, totals=totals):
            return trainer.loss(model, batch.to(engine.device), totals)

        result = stepper.step(batches, micro_loss, tokens)
        state.step += 1
        state.train_seconds += time.perf_counter() - step_start
        state.skipped_steps, state.bad_streak = stepper.skipped_steps, stepper.bad_streak
        if not result.applied:
            logger.log(state.step, {"skipped_steps": state.skipped_steps}, advance=1)
            continue
        for key, values in result.metrics.items():
            window_metrics.setdefault(key, []).extend(values)
        state.tokens += result.tokens
        log_loss, log_tokens, log_steps = log_loss + result.loss, log_tokens + result.tokens, log_steps + 1
        grad_norm = result.grad_norm

        last = state.step == plan.total_steps
        if state.step % cfg.log_every == 0 or last:
            elapsed = time.perf_counter() - log_start
            last_loss = log_loss / log_steps
            record = {
                "loss": last_loss,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": log_tokens / max(elapsed, 1e-9),
                "tokens": state.tokens,
                "epoch": state.step / plan.steps_per_epoch,
                "skipped_steps": state.skipped_steps,
            }
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            record.update({k: float(torch.stack(v).mean()) for k, v in window_metrics.items()})
            logger.log(state.step, record, advance=log_steps)
            window_metrics.clear()
            log_loss, log_tokens, log_steps, log_start = 0.0, 0, 0, time.perf_counter()
        if cfg.eval_every and (state.step % cfg.eval_every == 0) and not last:
            logger.log(state.step, evaluate_loss(engine, trainer, model))
        if cfg.save_every and state.step % cfg.save_every == 0 and not last:
            ckpt.save(state.step, {"loop": asdict(state), "trainer": trainer.state_dict()})

    eval_metrics = evaluate_loss(engine, trainer, model)
    if eval_metrics:
        logger.log(state.step, eval_metrics)
    return {"state": state, "logger": logger, "plan": plan, "eval": eval_metrics, "last_loss": last_loss}
