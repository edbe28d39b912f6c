"""Run logging on rank 0: a JSONL metrics file, wandb (offline unless an API key is set), a progress bar.

The wandb run id is kept in `run_dir/wandb_run_id`, so a resumed start continues the same wandb run
(`resume="allow"`) instead of opening a second one; a fresh start (`train.resume=false`) removes the file
(align/run_state.py). An id given by the environment (`WANDB_RUN_ID`, e.g. a sweep agent's) wins.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from align.run_state import WANDB_ID

if TYPE_CHECKING:
    from align.config import LoggingConfig


def wandb_mode(cfg: LoggingConfig) -> str:
    if not cfg.wandb or cfg.wandb_mode == "disabled":
        return "disabled"
    if cfg.wandb_mode != "auto":
        return cfg.wandb_mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_run_id(run_dir: Path) -> str:
    """The environment's id, else the one this run dir stored, else a new one (stored, so a resumed start continues it)."""
    path = run_dir / WANDB_ID
    run_id = os.environ.get("WANDB_RUN_ID") or (path.read_text().strip() if path.exists() else "") or secrets.token_hex(6)
    if not path.exists() or path.read_text().strip() != run_id:
        path.write_text(run_id + "\n")
    return run_id


class RunLogger:
    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: dict, total_steps: int, is_main: bool, job: str):
        self.is_main = is_main
        self.metrics_path = run_dir / "metrics.jsonl"
        self.run = None
        self.bar = None
        if not is_main:
            return
        mode = wandb_mode(cfg)
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_DIR", str(run_dir))
            self.run = wandb.init(
                project=cfg.project,
                group=cfg.group,
                tags=list(cfg.tags) or None,
                name=cfg.run_name or f"{job}-{run_dir.name}",
                job_type=job,
                config=config,
                dir=str(run_dir),
                mode=mode,
                id=wandb_run_id(run_dir),
                resume="allow",
                settings=wandb.Settings(x_disable_stats=True, console="off", silent=True),
            )
        if cfg.progress:
            self.bar = tqdm(total=total_steps, desc=job, dynamic_ncols=True, mininterval=1.0)
        self._file = self.metrics_path.open("a")

    def set_progress(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def log(self, step: int, metrics: dict[str, Any], advance: int = 0) -> None:
        if not self.is_main:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)
        if self.bar is not None:
            shown = {k: metrics[k] for k in ("loss", "tokens_per_s", "lr") if k in metrics}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self.bar.update(advance)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in metrics.items():
                self.run.summary[key] = value

    def close(self) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
        self._file.close()
        if self.run is not None:
            self.run.finish()
