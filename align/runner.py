"""Runs one job end to end: run-dir check → engine → trainer setup → the loop → export → summary.json.

A job whose `summary.json` records the same recipe fingerprint is finished: it is reported and not trained again
unless `train.resume=false` (align/run_state.py, which also refuses to continue a run of another recipe).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from align.engine.checkpoint import export_model
from align.engine.core import Engine
from align.engine.loop import fit
from align.run_state import check_run_dir, prepare_run_dir, recipe_fingerprint


def run_job(trainer_cls: type, recipe: Any, end_training: bool = True) -> dict:
    """`end_training=False` keeps the process group up for another job in the same process (online MPO's next round)."""
    started = time.perf_counter()
    fingerprint = recipe_fingerprint(recipe)
    finished = check_run_dir(recipe, fingerprint, is_main=os.environ.get("RANK", "0") == "0")
    if finished is not None:
        return finished
    engine = Engine.create(recipe)
    prepare_run_dir(recipe, engine.accelerator)
    trainer = trainer_cls(recipe, engine)
    trainer.setup()
    result = fit(engine, trainer)
    state, logger = result["state"], result["logger"]
    model_dir = export_model(engine.accelerator, trainer.model, trainer.tokenizer, engine.run_dir / "model")
    final = trainer.final_metrics()
    samples = final.pop("eval_samples", None)
    metrics = {"loss_final": result["last_loss"], **result["eval"], **final}
    summary = {
        "job": trainer.name,
        "metrics": metrics,
        "steps": state.step,
        "tokens": state.tokens,
        "skipped_steps": state.skipped_steps,
        "wall_s": round(time.perf_counter() - started, 2),
        "train_s": round(state.train_seconds, 2),
        "world_size": engine.world_size,
        "deepspeed": engine.deepspeed,
        "model_path": str(model_dir.resolve()),
        "data": trainer.data_stats,
        "unused_rows_per_epoch": result["plan"].unused_rows_per_epoch,
        "recipe_fingerprint": fingerprint,
    }
    if samples is not None:
        summary["eval_samples"] = samples
    logger.summary({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    logger.close()
    if engine.is_main:
        _write_json(engine.run_dir / "summary.json", summary)
    engine.accelerator.wait_for_everyone()
    if end_training:
        engine.accelerator.end_training()
    return summary


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
