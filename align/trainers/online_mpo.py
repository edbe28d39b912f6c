"""Online MPO (InternVL-MPO's iterative rounds): sample from the current policy, train on its pairs, repeat.

Each round is an ordinary MPO job (`run_job(MPOTrainer, ...)`) in `output_dir/round-k` whose policy is round
k−1's exported `model/`, so round k's rollout buffer holds samples of the policy as trained so far. The
reference stays the first round's starting policy (or `mpo.reference_path`) unless
`mpo.sampled_pairs.update_reference` moves it to each round's start. A round whose `summary.json` records this
round's recipe fingerprint is finished and skipped (`align.run_state.check_run_dir`, the check every job makes), so
an interrupted run resumes at the round it stopped in (and that round resumes from its own checkpoints). `output_dir/summary.json` then reports every round, with the first round's accuracy
before training and the last round's after.

All rounds run in one process (group): accelerate keeps its state in process-wide singletons, so between
rounds the accelerator state is reset (the process group stays up) and each round builds a fresh
Accelerator with its own DeepSpeed config; only the last round ends the process group.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from pathlib import Path
from typing import Any

from align.config import ConfigError, MPORecipe, save_resolved
from align.run_state import check_run_dir


def round_recipe(recipe: MPORecipe, k: int, policy: str) -> MPORecipe:
    """Round k's job: its own run dir, the given starting policy, a one-round sampling config that knows its round."""
    mpo, sampled = recipe.mpo, recipe.mpo.sampled_pairs
    reference = None if sampled.update_reference else (mpo.reference_path or recipe.model.name_or_path)
    return dataclasses.replace(
        recipe,
        output_dir=str(Path(recipe.output_dir) / f"round-{k}"),
        model=dataclasses.replace(recipe.model, name_or_path=policy),
        mpo=dataclasses.replace(mpo, reference_path=reference, sampled_pairs=dataclasses.replace(sampled, rounds=1, round_index=k)),
        logging=dataclasses.replace(recipe.logging, group=recipe.logging.group or Path(recipe.output_dir).name),
    )


def check_online(recipe: MPORecipe) -> None:
    sampled = recipe.mpo.sampled_pairs
    if sampled.rounds < 1:
        raise ConfigError(f"mpo.sampled_pairs.rounds must be >= 1, got {sampled.rounds}")
    if not sampled.enabled:
        raise ConfigError("mpo.sampled_pairs.rounds > 1 needs mpo.sampled_pairs.enabled=true (each round trains on its own samples)")
    if recipe.mpo.reference == "adapters" and not sampled.update_reference:
        raise ConfigError(
            "mpo.reference=adapters makes each round's reference its merged starting policy; "
            "set mpo.sampled_pairs.update_reference=true or use mpo.reference=model|precomputed"
        )


def reset_accelerate_state() -> None:
    """Forget the finished round's accelerator (and its DeepSpeed plugin) but keep the process group for the next one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    gc.collect()


def run_online_mpo(recipe: MPORecipe) -> dict[str, Any]:
    """Run (or finish) every round, then write and return `output_dir/summary.json`."""
    from align.runner import _write_json, run_job
    from align.trainers.mpo import MPOTrainer

    check_online(recipe)
    started = time.perf_counter()
    out, rounds = Path(recipe.output_dir), recipe.mpo.sampled_pairs.rounds
    is_main = os.environ.get("RANK", "0") == "0"
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(recipe, out / "config.yaml")
    policy, results, ran = recipe.model.name_or_path, [], False
    for k in range(rounds):
        sub = round_recipe(recipe, k, policy)
        finished = check_run_dir(sub, is_main=is_main)  # the check every job makes: a finished round of this recipe
        if finished is not None:
            summary, skipped = finished, True
        else:
            if ran:
                reset_accelerate_state()
            summary, skipped, ran = run_job(MPOTrainer, sub, end_training=k == rounds - 1), False, True
        results.append({"round": k, "skipped": skipped, "run_dir": sub.output_dir, "start_model": policy} | summary)
        policy = str(Path(sub.output_dir) / "model")
    summary = summarize(results, time.perf_counter() - started)
    if is_main:
        _write_json(out / "summary.json", summary)
    return summary


def summarize(results: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """The last round's metrics, with accuracy before = the first round's start; every round's figures under `rounds`."""
    first, last = results[0], results[-1]
    metrics = dict(last["metrics"])
    if "accuracy_before" in first["metrics"]:
        metrics["accuracy_before"] = first["metrics"]["accuracy_before"]
        metrics["accuracy_by_condition_before"] = first["metrics"]["accuracy_by_condition_before"]
        metrics["accuracy_after"] = last["metrics"]["accuracy_after"]
    keep = ("round", "skipped", "run_dir", "start_model", "model_path", "steps", "tokens", "wall_s")
    per_round = [
        {k: r[k] for k in keep if k in r} | {"metrics": r["metrics"], "sampled_pairs": r["data"].get("sampled_pairs")} for r in results
    ]
    return {
        "job": "mpo",
        "online": True,
        "metrics": metrics,
        "rounds": per_round,
        "steps": sum(r["steps"] for r in results),
        "tokens": sum(r["tokens"] for r in results),
        "wall_s": round(wall_s, 2),
        "world_size": last["world_size"],
        "deepspeed": last["deepspeed"],
        "model_path": last["model_path"],
    }
