"""`align pipeline PIPELINE.yaml`: chain normal recipes (SFT → RM → MPO → COOL RLHF), each stage's outputs feeding the next.

A pipeline file:

    output_dir: runs/pipeline-quickstart
    stages:
      - {name: sft, command: sft, config: configs/sft/quickstart.yaml}
      - {name: rm, command: rm, config: configs/rm/quickstart.yaml, set: ["model.name_or_path={sft.model}"]}

`{stage.model}` is that stage's exported model (`model_path` in its summary.json), `{stage.dir}` its output
directory; any `{stage.<key>}` reads a top-level summary key. Each stage runs as its own process
(`python -m align <command>`, or under `launcher` when given), in `output_dir/<name>`, logging to
`output_dir/<name>/stage.log`.

Resumable: a stage whose `summary.json` exists and whose resolved recipe is unchanged (its fingerprint,
`align.run_state.recipe_fingerprint`, is stored in `pipeline_stage.json`) is skipped; a changed recipe re-runs the
stage and every stage after it, each starting clean (`train.resume=false`: no checkpoint or sample of the old
recipe is reused). A stage that was interrupted with its recipe unchanged resumes from its checkpoints.
A failed stage stops the pipeline, names its log, and leaves earlier outputs intact.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from align.config import RECIPES, ConfigError, load_recipe, read_yaml_mapping, to_dict
from align.run_state import SUMMARY, checkpoint_manifests, read_json, recipe_fingerprint

REFERENCE = re.compile(r"\{([A-Za-z0-9_\-]+)\.([A-Za-z0-9_]+)\}")
STAGE_FILE = "pipeline_stage.json"


@dataclasses.dataclass
class Stage:
    name: str
    command: str
    config: str
    set: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Pipeline:
    output_dir: str
    stages: list[Stage]
    launcher: list[str] = dataclasses.field(default_factory=list)  # e.g. [accelerate, launch, --num_processes, 2, ...]


class StageFailed(RuntimeError):
    pass


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> Pipeline:
    """Read and check a pipeline file; errors name the file, the stage and the key."""
    raw = read_yaml_mapping(path, "pipeline file")
    for item in overrides:  # only `output_dir=...` is meaningful at the pipeline level
        key, _, value = item.partition("=")
        if key != "output_dir":
            raise ConfigError(f"--set {item!r}: a pipeline takes only output_dir; set stage keys in the pipeline file")
        raw["output_dir"] = value
    unknown = set(raw) - {"output_dir", "stages", "launcher"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; a pipeline has output_dir, stages, launcher")
    stages, names = [], set()
    for i, item in enumerate(raw.get("stages") or []):
        where = f"{path}: stages[{i}]"
        if not isinstance(item, dict) or not {"name", "command", "config"} <= set(item):
            raise ConfigError(f"{where}: each stage needs name, command and config")
        extra = set(item) - {"name", "command", "config", "set"}
        if extra:
            raise ConfigError(f"{where}: unknown keys {sorted(extra)}")
        if item["command"] not in RECIPES:
            raise ConfigError(f"{where}: command {item['command']!r} is not one of {sorted(RECIPES)}")
        if item["name"] in names:
            raise ConfigError(f"{where}: duplicate stage name {item['name']!r}")
        for ref, _ in REFERENCE.findall(" ".join(item.get("set") or [])):
            if ref not in names:
                raise ConfigError(f"{where}: {{{ref}.…}} refers to no earlier stage (earlier: {sorted(names) or 'none'})")
        names.add(item["name"])
        stages.append(Stage(item["name"], item["command"], item["config"], [str(s) for s in item.get("set") or []]))
    if not stages:
        raise ConfigError(f"{path}: no stages")
    return Pipeline(str(raw.get("output_dir", "runs/pipeline")), stages, [str(a) for a in raw.get("launcher") or []])


def resolve_overrides(stage: Stage, outputs: dict[str, dict[str, Any]], stage_dir: Path) -> list[str]:
    """The stage's `--set` items with `{stage.key}` filled from earlier summaries, plus its output_dir."""

    def fill(match: re.Match) -> str:
        name, key = match.groups()
        summary = outputs[name]
        if key == "model":
            return str(summary["model_path"])
        if key == "dir":
            return str(summary["_dir"])
        if key not in summary:
            raise ConfigError(f"stage {stage.name}: {{{name}.{key}}}: stage {name}'s summary has no {key!r}")
        return str(summary[key])

    return [REFERENCE.sub(fill, item) for item in stage.set] + [f"output_dir={stage_dir}"]


def fingerprint(stage: Stage, overrides: list[str]) -> str:
    """The fingerprint of the stage's fully resolved recipe (the one its checkpoints and summary.json record)."""
    return recipe_fingerprint(load_recipe(RECIPES[stage.command], stage.config, overrides))


def legacy_fingerprint(stage: Stage, overrides: list[str]) -> str:
    """What `pipeline_stage.json` stored before the shared fingerprint (a hash of the whole recipe), still honoured."""
    recipe = load_recipe(RECIPES[stage.command], stage.config, overrides)
    blob = json.dumps({"command": stage.command, "recipe": to_dict(recipe)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def stage_plan(stage: Stage, overrides: list[str], stage_dir: Path, rerun_rest: bool) -> tuple[bool, bool, str]:
    """(skip, start clean, fingerprint): skip a finished unchanged stage; start clean when its recipe or its inputs changed.

    Inputs changed: an earlier stage re-ran (its export has the same path, new weights). Recipe changed: the stage's
    marker, summary or checkpoints record another fingerprint. Otherwise an unfinished stage resumes.
    """
    digest = fingerprint(stage, overrides)
    marker = read_json(stage_dir / STAGE_FILE)
    summary = read_json(stage_dir / SUMMARY)
    if marker is not None and marker.get("fingerprint") == legacy_fingerprint(stage, overrides):
        marker["fingerprint"] = digest
    if rerun_rest:
        return False, True, digest
    if marker is not None and summary is not None and marker.get("fingerprint") == digest:
        return True, False, digest
    recorded = {m.get("fingerprint") for _, m in checkpoint_manifests(stage_dir)} | {(summary or {}).get("recipe_fingerprint")}
    recorded |= {marker.get("fingerprint")} if marker else set()
    return False, bool(recorded - {None, digest}), digest


def run_stage(stage: Stage, overrides: list[str], stage_dir: Path, launcher: list[str]) -> None:
    command = (launcher or [sys.executable]) + ["-m", "align", stage.command, "--config", stage.config]
    for item in overrides:
        command += ["--set", item]
    stage_dir.mkdir(parents=True, exist_ok=True)
    log = stage_dir / "stage.log"
    with log.open("w") as handle:
        handle.write("$ " + " ".join(shlex.quote(c) for c in command) + "\n")
        handle.flush()
        proc = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy())
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise StageFailed(f"stage {stage.name!r} ({stage.command}) failed with exit code {proc.returncode}; log: {log}\n{tail}")


def run_pipeline(pipeline: Pipeline, echo=print) -> dict[str, Any]:
    """Run (or skip) every stage in order; write `pipeline_summary.json`; return it."""
    root = Path(pipeline.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, dict[str, Any]] = {}
    records = []
    rerun_rest = False
    for stage in pipeline.stages:
        stage_dir = root / stage.name
        overrides = resolve_overrides(stage, outputs, stage_dir)
        skip, clean, digest = stage_plan(stage, overrides, stage_dir, rerun_rest)
        summary_path, marker = stage_dir / SUMMARY, stage_dir / STAGE_FILE
        if skip:
            echo(f"[pipeline] {stage.name}: unchanged, skipped ({stage_dir})")
            wall = json.loads(marker.read_text()).get("wall_s")
        else:
            rerun_rest = True  # a re-run stage changes the inputs of every later one
            marker.unlink(missing_ok=True)
            how = " (starting clean)" if clean else ""
            echo(f"[pipeline] {stage.name}: align {stage.command} --config {stage.config} → {stage_dir}{how}")
            started = time.perf_counter()
            run_stage(stage, overrides + (["train.resume=false"] if clean else []), stage_dir, pipeline.launcher)
            wall = round(time.perf_counter() - started, 1)
            marker.write_text(json.dumps({"fingerprint": digest, "wall_s": wall, "overrides": overrides}, indent=1))
        summary = json.loads(summary_path.read_text())
        outputs[stage.name] = {**summary, "_dir": str(stage_dir)}
        records.append({"name": stage.name, "command": stage.command, "metrics": summary.get("metrics", {}), "wall_s": wall,
                        "skipped": skip, "model_path": summary.get("model_path")})  # fmt: skip
    result = {"output_dir": str(root), "stages": records}
    tmp = root / "pipeline_summary.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(root / "pipeline_summary.json")
    echo(format_table(records))
    return result


def _percent(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "–"


def stage_row(record: dict) -> dict[str, str]:
    """One table row: task accuracy (before → after where the stage measured both), per condition, reward, KL, wall."""
    m = record["metrics"]
    accuracy = m.get("accuracy_after", m.get("accuracy")) if record["command"] != "rm" else m.get("accuracy")
    before = m.get("accuracy_before")
    by = m.get("accuracy_by_condition") or {}
    by_before = m.get("accuracy_by_condition_before") or {}
    conditions = ", ".join(f"{c} {_percent(by_before[c]) + '→' if c in by_before else ''}{_percent(v)}" for c, v in sorted(by.items()))
    label = "pairwise" if record["command"] == "rm" else "task"
    reward = m.get("reward_after")
    reward_text = f"{m['reward_before']:.3f}→{reward:.3f}" if reward is not None and "reward_before" in m else "–"
    kl = m.get("kl")
    return {
        "stage": record["name"],
        "accuracy": f"{label} {(_percent(before) + '→') if before is not None else ''}{_percent(accuracy)}",
        "by condition": conditions or "–",
        "mean reward": reward_text,
        "KL": f"{kl:.3f}" if isinstance(kl, (int, float)) else "–",
        "wall": f"{record['wall_s']:.0f} s" if isinstance(record["wall_s"], (int, float)) else "–",
    }


def format_table(records: list[dict]) -> str:
    rows = [stage_row(r) for r in records]
    headers = list(rows[0]) if rows else []
    widths = {h: max(len(h), *(len(r[h]) for r in rows)) for h in headers}
    line = " | ".join(h.ljust(widths[h]) for h in headers)
    out = [line, "-+-".join("-" * widths[h] for h in headers)]
    out += [" | ".join(r[h].ljust(widths[h]) for h in headers) for r in rows]
    return "\n".join(out)


def cmd_pipeline(args: argparse.Namespace) -> int:
    try:
        run_pipeline(load_pipeline(args.pipeline, args.overrides))
    except StageFailed as err:
        print(f"align pipeline: {err}", file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pipeline", help="chain recipes (SFT → RM → MPO → RLHF); finished, unchanged stages are skipped")
    parser.add_argument("pipeline", help="pipeline YAML under configs/pipelines/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="output_dir=DIR")
    parser.set_defaults(func=cmd_pipeline)
