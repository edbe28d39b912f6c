"""The one training loop: accumulation, clipping, the non-finite guard, eval and checkpoint cadence.

Per optimizer step: each rank runs its G micro-batches; each micro-batch's loss is its exact
share of the step mean (see trainers/base.py), scaled by G·W to cancel the averaging that
DeepSpeed (÷G, mean over ranks) and DDP (mean over ranks) apply.

The non-finite guard costs one small all-reduce and host sync per micro-step: under ZeRO-3
gradients are reduced inside backward, so a bad loss must be caught before it is
backpropagated. A step with any non-finite micro-batch on any rank is skipped on every rank
(gradients discarded, no optimizer or schedule step) and counted; `max_bad_steps` in a row
stop the run with an error, before any checkpoint could hold poisoned weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from align.config import flat_dict
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


class Stepper:
    """Backward and optimizer step, for plain accelerate and for a DeepSpeed engine alike."""

    def __init__(self, engine: Engine, model, optimizer, scheduler, max_grad_norm: float):
        self.engine, self.model, self.optimizer, self.scheduler = engine, model, optimizer, scheduler
        self.max_grad_norm = max_grad_norm

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        if self.engine.deepspeed:
            self.model.set_gradient_accumulation_boundary(boundary)
            self.model.backward(loss)
        else:
            self.engine.accelerator.backward(loss)

    def finish(self, ok: bool) -> tuple[bool, float | None]:
        """Apply the accumulated gradients if `ok`; returns (applied, grad norm)."""
        norm = None
        if self.engine.deepspeed:
            if ok:
                self.model.step()  # clips (gradient_clipping), steps and zeroes gradients
                self.scheduler.step()  # accelerate hands DeepSpeed only its own schedule types, not ours
                norm = self.model.get_global_grad_norm()
                norm = float(norm) if norm is not None else None
            else:
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
    model, optimizer, scheduler = acc.prepare(trainer.model, optimizer, scheduler)
    trainer.model = model
    model.train()
    stepper = Stepper(engine, model, optimizer, scheduler, recipe.optim.max_grad_norm)

    ckpt = Checkpointer(acc, engine.run_dir / "checkpoints", cfg.keep_last)
    ckpt.clean_partial()
    state = LoopState()
    latest = ckpt.latest() if cfg.resume else None
    if latest is not None:
        saved = ckpt.load(latest)
        state = LoopState(**saved["loop"])
        trainer.load_state_dict(saved.get("trainer", {}))
        if engine.is_main:
            print(f"resumed from {latest} at step {state.step}", flush=True)

    logger = RunLogger(recipe.logging, engine.run_dir, flat_dict(recipe), plan.total_steps, engine.is_main, trainer.name)
    logger.set_progress(state.step)
    scale = engine.shape.gradient_accumulation_steps * engine.world_size if engine.deepspeed else engine.world_size
    window_metrics: dict[str, list[torch.Tensor]] = {}
    log_loss, log_tokens, log_steps, log_start = 0.0, 0, 0, time.perf_counter()
    last_loss: float | None = None

    while state.step < plan.total_steps:
        step_start = time.perf_counter()
        micro_batches = plan.micro_batches(state.step, engine.rank)
        totals = trainer.units(plan.step_rows(state.step), "train")
        step_ok, step_loss, step_tokens = True, 0.0, 0
        for g, row_ids in enumerate(micro_batches):
            batch = trainer.collate(row_ids, "train").to(engine.device)
            loss, metrics = trainer.loss(model, batch, totals)
            local = loss.detach().float()
            finite = torch.isfinite(local)
            check = torch.stack([(~finite).float(), torch.where(finite, local, 0.0), torch.tensor(float(batch.num_tokens))])
            bad, share, tokens = acc.reduce(check.to(engine.device), "sum").tolist()
            boundary = g == len(micro_batches) - 1
            if bad or not step_ok:
                step_ok = False
                continue
            stepper.backward(loss * scale, boundary)
            step_loss += share
            step_tokens += int(tokens)
            for key, value in metrics.items():
                window_metrics.setdefault(key, []).append(value.detach().float())
        applied, grad_norm = stepper.finish(step_ok)
        state.step += 1
        state.train_seconds += time.perf_counter() - step_start
        if not applied:
            state.skipped_steps += 1
            state.bad_streak += 1
            logger.log(state.step, {"skipped_steps": state.skipped_steps}, advance=1)
            if state.bad_streak >= cfg.max_bad_steps:
                raise NonFiniteLossError(
                    f"{state.bad_streak} optimizer steps in a row had a non-finite loss or gradient norm "
                    f"(last at step {state.step}); stopping without saving. Lower optim.lr or check the data."
                )
            continue
        state.bad_streak = 0
        state.tokens += step_tokens
        log_loss, log_tokens, log_steps = log_loss + step_loss, log_tokens + step_tokens, log_steps + 1

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
