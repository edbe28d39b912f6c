"""What a run directory holds about the recipe that made it, and whether a new start may continue it.

One fingerprint (`recipe_fingerprint`) names a resolved recipe everywhere: checkpoints store it in their
manifest, `summary.json` stores it when the run finishes, the policy-sample rows store it, and the pipeline
skips a stage by it. It hashes the recipe's type and every key that shapes what is trained and reported,
except the keys in `IGNORED`, which only say where the run lives, how it is logged, how often it checkpoints
or whether it resumes. A key at its default value does not count either (set or not, it is the same recipe),
so a newer align that adds a setting still resumes and recognises the runs of an older one; the price is that
a changed default in the code is not seen as a changed recipe. Hardware-dependent choices (`model.dtype: auto`,
the world size) count as written, not as resolved, so a run may resume on other hardware; data files count by
path, not content.

`train.resume` decides what a start does with what it finds in `output_dir`:
- `true` (default): a finished run of the same recipe is reported and not trained again; checkpoints are
  resumed; a finished run or a checkpoint of another recipe is an error naming the changed keys;
- `false`: the previous run's state (`RUN_STATE`) is removed and training starts over;
- `force`: resume the newest checkpoint even if the recipe changed since it was written.

This module reads JSON only (no torch), so the pipeline and the CLI can use it before a job starts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from align.config import ConfigError, build, flat_dict

SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"  # inside each checkpoint, written last (align/engine/checkpoint.py)
WANDB_ID = "wandb_run_id"  # the wandb run a resumed start continues (align/engine/logger.py)
POLICY_ROWS = "policy_sample_rows.json"  # rows built from the policy's own samples (align/trainers/policy_samples.py)
RUN_STATE = (CHECKPOINTS, SUMMARY, "metrics.jsonl", WANDB_ID, POLICY_ROWS)  # what a fresh start removes

# keys (or sections, with every key below them) that do not change what a run trains or reports
IGNORED = ("output_dir", "logging", "train.resume", "train.save_every", "train.keep_last", "train.log_every", "train.eval_every",
           "train.max_bad_steps", "mpo.cache_dir")  # fmt: skip


class RecipeChanged(ConfigError):
    """`output_dir` holds a run of another recipe and `train.resume` does not say what to do with it."""


def recipe_keys(recipe: Any) -> dict[str, Any]:
    """The dotted keys the fingerprint covers (not ignored, not at their default), with their values (JSON-safe)."""
    defaults = _flat_json(type(recipe)())
    return {k: v for k, v in _flat_json(recipe).items() if not _ignored(k) and (k not in defaults or defaults[k] != v)}


def _flat_json(recipe: Any) -> dict[str, Any]:
    return json.loads(json.dumps(flat_dict(recipe), default=str))


def _ignored(key: str) -> bool:
    return any(key == name or key.startswith(name + ".") for name in IGNORED)


def recipe_fingerprint(recipe: Any) -> str:
    blob = json.dumps({"recipe": type(recipe).__name__, "keys": recipe_keys(recipe)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def describe_change(saved: dict[str, Any], current: dict[str, Any], recipe_type: type, limit: int = 4) -> str:
    """`optim.lr 0.0001 → 0.001, ...`: the keys whose values differ (a key not listed is at its default), for one error line."""
    defaults = _flat_json(recipe_type())
    saved, current = {**defaults, **saved}, {**defaults, **current}
    changed = [k for k in sorted(set(saved) | set(current)) if saved.get(k, "<unset>") != current.get(k, "<unset>")]
    shown = [f"{k} {saved.get(k, '<unset>')!r} → {current.get(k, '<unset>')!r}" for k in changed[:limit]]
    return ", ".join(shown) + (f" and {len(changed) - limit} more" if len(changed) > limit else "")


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None if it is missing or unreadable (a damaged file is treated as absent)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def checkpoint_manifests(run_dir: Path) -> list[tuple[Path, dict]]:
    """(checkpoint, manifest) of every complete checkpoint that has a readable manifest, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    found = [(p, read_json(p / MANIFEST)) for p in sorted(root.glob("step-*")) if p.is_dir() and not p.name.endswith(".tmp")]
    return [(p, m) for p, m in found if m is not None]


def check_run_dir(recipe: Any, fingerprint: str | None = None, is_main: bool = True) -> dict | None:
    """Before a job starts: its summary if `output_dir` already finished this recipe (said in one line), else None.

    A finished run or a checkpoint of another recipe raises `RecipeChanged` unless `train.resume` is false (start
    over) or, for checkpoints, `force`. Read-only, so every rank can call it before the process group exists.
    """
    resume, run_dir = recipe.train.resume, Path(recipe.output_dir)
    if resume is False:
        return None
    fingerprint = fingerprint or recipe_fingerprint(recipe)
    summary = read_json(run_dir / SUMMARY)
    previous = _finished_recipe(run_dir, type(recipe)) if summary else None
    saved = summary.get("recipe_fingerprint") if summary else None
    if summary and saved is None and previous is not None:  # written before align stored the fingerprint
        saved = recipe_fingerprint(previous)
    if saved == fingerprint and summary:
        if is_main:
            print(f"align: {run_dir} already finished this recipe ({SUMMARY}); not training again "
                  "(set train.resume=false to train it again)", flush=True)  # fmt: skip
        return summary
    if saved is not None and resume is True:
        same = previous is not None and recipe_fingerprint(previous) == saved
        change = describe_change(recipe_keys(previous), recipe_keys(recipe), type(recipe)) if same else "the recipe fingerprint differs"
        raise RecipeChanged(f"{run_dir} holds a finished run of another recipe ({change}); use a new output_dir, "
                            "or set train.resume=false to train there again (its checkpoints and summary are removed)")  # fmt: skip
    if resume is True:
        for path, manifest in reversed(checkpoint_manifests(run_dir)):
            if manifest.get("fingerprint") not in (None, fingerprint):
                raise RecipeChanged(f"{path} was written by another recipe ({describe_change(manifest.get('recipe', {}), recipe_keys(recipe), type(recipe))}); "
                                    "use a new output_dir, set train.resume=false to start over, or train.resume=force to continue it anyway")  # fmt: skip
    return None


def _finished_recipe(run_dir: Path, recipe_type: type) -> Any:
    """The recipe in `config.yaml` if it is the finished run's (written before its summary.json), else None."""
    config, summary = run_dir / "config.yaml", run_dir / SUMMARY
    try:
        if config.stat().st_mtime_ns > summary.stat().st_mtime_ns:
            return None  # rewritten by a later start
        return build(recipe_type, yaml.safe_load(config.read_text()), source=str(config))
    except (OSError, yaml.YAMLError, ConfigError, TypeError):
        return None


def start_over(run_dir: Path) -> list[str]:
    """Remove the previous run's state (`RUN_STATE`) from `run_dir`; returns what was removed. Rank 0 only."""
    removed = []
    for name in RUN_STATE:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        print(f"align: train.resume=false: starting over in {run_dir} (removed {', '.join(removed)})", flush=True)
    return removed


def prepare_run_dir(recipe: Any, accelerator: Any) -> None:
    """After the accelerator exists, before setup: a fresh start (train.resume=false) clears the previous run, once."""
    if recipe.train.resume is False and accelerator.is_main_process:
        start_over(Path(recipe.output_dir))
    accelerator.wait_for_everyone()
