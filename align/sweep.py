"""`align sweep SPEC.yaml`: hyperparameter sweeps over dotted recipe keys, written as wandb sweep specs.

One spec format serves both back ends, so a sweep tried here runs unchanged on wandb's server:
- with WANDB_API_KEY set (and wandb not switched offline), `wandb.sweep` registers the spec and `wandb.agent`
  runs the jobs the server picks (grid, random, bayes, early termination);
- otherwise grid or random search runs here, one subprocess per run (a crash or an OOM costs one run, not the
  sweep), every run logging offline into one wandb group; a run whose summary.json exists is skipped on rerun.

A spec is wandb's keys (method, metric, parameters, run_cap, name, description, project, entity,
early_terminate) plus align's: `command` (sft|rm|mpo|rlhf), `config` (the base recipe), `overrides` (KEY=VALUE
for every run) and `seed` (local random search). Parameter names are dotted recipe keys; the metric is a key of
summary.json's `metrics` (wandb sees it as the run summary's `final/<metric>`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from align.config import RECIPES, flat_dict, load_recipe
from align.sweep_spec import SweepError, SweepSpec, load_spec, plan, yaml_value  # noqa: F401 - SweepError is part of this API

TAIL_LINES = 20
CACHE_KEY = "mpo.cache_dir"
RESULTS_CSV, RESULTS_MD, SWEEP_JSON, RUN_RECORD, RUN_LOG = "sweep_results.csv", "sweep_results.md", "sweep.json", "sweep_run.json", "sweep.log"
@dataclasses.dataclass
class RunRecord:
    run: str
    params: dict[str, Any]
    status: str  # ok | failed
    metric: float | None
    wall_s: float
    run_dir: Path
    error: str = ""
    skipped: bool = False  # finished by an earlier invocation


def run_overrides(spec: SweepSpec, params: dict[str, Any], run_dir: Path, wandb_mode: str) -> list[str]:
    """The base overrides, the run's parameters, then what the sweep owns (run dir, wandb group and mode, shared cache)."""
    items = [*spec.overrides, *(f"{k}={yaml_value(v)}" for k, v in params.items())]
    owned = {"output_dir": str(run_dir), "logging.group": spec.name, "logging.wandb_mode": wandb_mode}
    if spec.command == "mpo" and not _sets(spec, CACHE_KEY):
        # one reference log-prob cache for all runs: it is keyed by data and reference, which a sweep rarely changes
        owned[CACHE_KEY] = str(run_dir.parent / ".cache" / "reference_logprobs")
    return items + [f"{k}={yaml_value(v)}" for k, v in owned.items()]  # quoted where YAML would misread (a group named `true`)


def _sets(spec: SweepSpec, key: str) -> bool:
    """Whether the user chose `key`: in the base recipe file, an override, or as a parameter."""
    node: Any = yaml.safe_load(Path(spec.config).read_text()) or {}
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node is not None or key in spec.params or any(o.split("=", 1)[0].strip() == key for o in spec.overrides)


def job_command(spec: SweepSpec, overrides: list[str]) -> list[str]:
    """`python -m align COMMAND --config BASE --set ...`: a process per run, so each starts clean."""
    return [sys.executable, "-m", "align", spec.command, "--config", spec.config, *itertools.chain.from_iterable(("--set", o) for o in overrides)]


def local_env() -> dict[str, str]:
    """The caller's environment without a stray wandb run or sweep identity, which would merge every run into one."""
    env = dict(os.environ)
    for key in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH"):
        env.pop(key, None)
    return env


def run_local(spec: SweepSpec, out: Path, max_runs: int | None = None) -> list[RunRecord]:
    """Grid or random search here, one run after another; a failed run is recorded and the sweep goes on."""
    points, records, env = plan(spec, max_runs), [], local_env()
    try:
        for i, params in enumerate(points):
            records.append(local_run(spec, f"run-{i:03d}", params, out, env, f"{i + 1}/{len(points)}"))
            if records[-1].status == "ok" and all(r.metric is None for r in records):  # a metric typo: stop after one run
                write_results(out, spec, records)
                raise SweepError(_missing_metric(spec, records[-1].run_dir))
    except KeyboardInterrupt:
        if records:
            write_results(out, spec, records)  # what finished so far; a rerun goes on from there
        raise
    return records


def local_run(spec: SweepSpec, name: str, params: dict[str, Any], out: Path, env: dict[str, str], progress: str) -> RunRecord:
    """One planned run: reused when its summary.json exists (and it ran with these values), else run now."""
    run_dir = out / name
    overrides = run_overrides(spec, params, run_dir, "offline")
    if (run_dir / "summary.json").exists():
        _check_same_run(spec, run_dir, overrides)
        record = finished_record(spec, name, params, run_dir)
    else:
        print(f"[sweep] {name} ({progress}): {_describe(params)}", flush=True)
        record = execute(spec, name, params, run_dir, overrides, env)
    print(f"[sweep] {_outcome(spec, record)}", flush=True)
    return record


def execute(spec: SweepSpec, name: str, params: dict[str, Any], run_dir: Path, overrides: list[str], env: dict[str, str]) -> RunRecord:
    """Run one job as a subprocess, its output in RUN_DIR/sweep.log; record how it ended in RUN_DIR/sweep_run.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / RUN_LOG
    started = time.perf_counter()
    with log.open("w") as sink:
        code = subprocess.run(job_command(spec, overrides), stdout=sink, stderr=subprocess.STDOUT, env=env, check=False).returncode
    wall = round(time.perf_counter() - started, 1)
    summary = _read_summary(run_dir)
    if code == 0 and summary is not None:
        record = RunRecord(name, params, "ok", metric_value(summary, spec.metric), wall, run_dir)
    else:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-TAIL_LINES:])
        error = f"exit code {code}" if code else "exited 0 without writing summary.json"
        record = RunRecord(name, params, "failed", None, wall, run_dir, error=f"{error}\n{tail}".strip())
    (run_dir / RUN_RECORD).write_text(json.dumps({"run": name, "params": params, "status": record.status, "wall_s": wall, "error": record.error}, indent=2))
    return record


def finished_record(spec: SweepSpec, name: str, params: dict[str, Any], run_dir: Path) -> RunRecord:
    """A run an earlier invocation finished: its metric re-read (the spec's metric may have changed), its time as recorded."""
    summary = _read_summary(run_dir) or {}
    saved = json.loads((run_dir / RUN_RECORD).read_text()) if (run_dir / RUN_RECORD).exists() else {}
    wall = float(saved.get("wall_s", summary.get("wall_s", 0.0)))
    return RunRecord(name, params, "ok", metric_value(summary, spec.metric), wall, run_dir, skipped=True)


def _check_same_run(spec: SweepSpec, run_dir: Path, overrides: list[str]) -> None:
    """A finished run is reused only if it ran with the values this sweep plans for it (else the spec changed under OUT)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = _flatten_dict(yaml.safe_load(saved_path.read_text()) or {})
    planned = flat_dict(load_recipe(RECIPES[spec.command], spec.config, overrides))
    for key in spec.params:
        if key in saved and saved[key] != planned.get(key):
            raise SweepError(f"{spec.path}: {run_dir} ran with {key}={saved[key]!r} but this sweep plans {planned.get(key)!r} for it "
                             "(the spec changed): use another --out, or remove that run")  # fmt: skip


def _flatten_dict(node: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        out |= _flatten_dict(value, f"{name}.") if isinstance(value, dict) else {name: value}
    return out


def _read_summary(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def metric_value(summary: dict, metric: str) -> float | None:
    """summary.json's metrics[metric] (dots reach into nested metrics: accuracy_by_condition.math); None if absent or not a number."""
    node: Any = summary.get("metrics", {})
    for part in (metric.split(".") if metric not in node else [metric]):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, bool) or not isinstance(node, (int, float)) or math.isnan(node):
        return None
    return float(node)


def _missing_metric(spec: SweepSpec, run_dir: Path) -> str:
    metrics = (_read_summary(run_dir) or {}).get("metrics", {})
    numbers = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    return f"{spec.path}: metric.name: {spec.metric!r} is not a number in {run_dir / 'summary.json'}'s metrics (numbers there: {', '.join(numbers)})"


def _describe(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={yaml_value(v)}" for k, v in params.items())


def _outcome(spec: SweepSpec, record: RunRecord) -> str:
    if record.status == "failed":
        last = record.error.splitlines()[-1] if record.error else ""
        return f"{record.run} FAILED ({record.error.splitlines()[0]}) after {record.wall_s:.0f} s: {last}; log: {record.run_dir / RUN_LOG}"
    value = "n/a" if record.metric is None else f"{record.metric:.4g}"
    when = "finished earlier, skipped" if record.skipped else f"{record.wall_s:.0f} s"
    return f"{record.run}: {spec.metric} {value} ({when})"


# ----------------------------------------------------------------------------- results
def sort_records(records: list[RunRecord], goal: str) -> list[RunRecord]:
    """Best first by the metric per goal; runs without a metric, then failed runs, last."""
    sign = -1.0 if goal == "maximize" else 1.0
    return sorted(records, key=lambda r: (r.status != "ok", r.metric is None, sign * (r.metric or 0.0), r.run))


def result_columns(spec: SweepSpec) -> list[str]:
    return ["run", *spec.params, spec.metric, "status", "wall_s", "run_dir"]


def write_results(out: Path, spec: SweepSpec, records: list[RunRecord]) -> str:
    """OUT/sweep_results.csv and .md (columns: run, parameters, metric, status, wall_s, run_dir) and OUT/sweep.json; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    rows, columns = sort_records(records, spec.goal), result_columns(spec)
    with (out / RESULTS_CSV).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            metric = "" if r.metric is None else repr(r.metric)
            writer.writerow([r.run, *(_cell(r.params.get(k)) for k in spec.params), metric, r.status, f"{r.wall_s:.1f}", str(r.run_dir.resolve())])
    table = markdown_table(columns, rows, spec)
    (out / RESULTS_MD).write_text(f"# Sweep {spec.name}: {spec.metric} ({spec.goal})\n\n{table}\n{_failures(rows)}")
    meta = {"metric": spec.metric, "goal": spec.goal, "method": spec.method, "parameters": list(spec.params)}
    (out / SWEEP_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return table


def _cell(value: Any) -> str:
    return "" if value is None else yaml_value(value)


def markdown_table(columns: list[str], rows: list[RunRecord], spec: SweepSpec) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        metric = "" if r.metric is None else f"{r.metric:.4g}"
        cells = [r.run, *(_cell(r.params.get(k)) for k in spec.params), metric, r.status, f"{r.wall_s:.1f}", _shown_path(r.run_dir)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())


def _failures(rows: list[RunRecord]) -> str:
    failed = [r for r in rows if r.status == "failed"]
    if not failed:
        return ""
    blocks = [f"### {r.run}\n\n```\n{r.error}\n```\n" for r in failed]
    return "\n## Failed runs\n\n" + "\n".join(blocks)


def collect_records(out: Path, spec: SweepSpec) -> list[RunRecord]:
    """The runs under OUT as their sweep_run.json recorded them (the server's runs: it, not we, planned them)."""
    records = []
    for path in sorted(out.glob(f"run-*/{RUN_RECORD}")):
        saved, run_dir = json.loads(path.read_text()), path.parent
        summary = _read_summary(run_dir)
        metric = metric_value(summary, spec.metric) if summary else None
        records.append(RunRecord(saved["run"], saved["params"], saved["status"], metric, saved["wall_s"], run_dir, saved.get("error", "")))
    return records


# ----------------------------------------------------------------------------- wandb's sweep server
def use_server(spec: SweepSpec) -> bool:
    """wandb's server iff an API key is set and nothing switches wandb off or offline (env or recipe)."""
    env_mode = os.environ.get("WANDB_MODE", "").lower()
    logging = spec.recipe.logging
    return (bool(os.environ.get("WANDB_API_KEY")) and env_mode not in ("offline", "dryrun", "disabled")
            and logging.wandb and logging.wandb_mode in ("auto", "online"))  # fmt: skip


def wandb_sweep_config(spec: SweepSpec) -> dict[str, Any]:
    """The spec as wandb.sweep takes it: align's keys dropped, the metric named as runs log it (`final/<metric>` in the summary)."""
    metric = {"name": f"final/{spec.metric}", "goal": spec.goal}
    if "target" in spec.raw["metric"]:
        metric["target"] = spec.raw["metric"]["target"]
    config: dict[str, Any] = {"name": spec.name, "method": spec.method, "metric": metric, "parameters": {k: dict(p) for k, p in spec.params.items()}}
    for key in ("description", "run_cap", "early_terminate"):
        if spec.raw.get(key) is not None:
            config[key] = spec.raw[key]
    return config


def sweep_project(spec: SweepSpec) -> str:
    return str(spec.raw.get("project") or spec.recipe.logging.project)


def agent_params() -> dict[str, Any]:
    """This run's values as the agent wrote them for wandb.init (WANDB_SWEEP_PARAM_PATH: {key: {value: v}}), i.e. its wandb.config."""
    raw = yaml.safe_load(Path(os.environ["WANDB_SWEEP_PARAM_PATH"]).read_text()) or {}
    raw.pop("wandb_version", None)
    return {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in raw.items()}


def agent_job(spec: SweepSpec, out: Path) -> None:
    """One run the server picked. The child's wandb.init joins that sweep run through the env the agent set (WANDB_RUN_ID,
    WANDB_SWEEP_ID, WANDB_SWEEP_PARAM_PATH), as `wandb agent` does for a program; a process per run keeps runs apart."""
    params = agent_params()
    name = f"run-{os.environ.get('WANDB_RUN_ID', 'unknown')}"
    run_dir = out / name
    overrides = [*run_overrides(spec, params, run_dir, "online"), f"logging.project={sweep_project(spec)}"]
    print(f"[sweep] {name}: {_describe(params)}", flush=True)
    record = execute(spec, name, params, run_dir, overrides, dict(os.environ))
    print(f"[sweep] {_outcome(spec, record)}", flush=True)
    if record.status == "failed":
        raise RuntimeError(f"{name} failed: {record.error.splitlines()[0]}")  # the agent counts it as a failed run


def run_server(spec: SweepSpec, out: Path, max_runs: int | None = None) -> list[RunRecord]:
    """Register the spec with wandb's sweep server and run an agent here for up to max_runs (or run_cap) runs."""
    import wandb

    entity, project = spec.raw.get("entity"), sweep_project(spec)
    sweep_id = wandb.sweep(wandb_sweep_config(spec), entity=entity, project=project)
    print(f"[sweep] wandb sweep {sweep_id} in project {project}; runs under {out}", flush=True)
    wandb.agent(sweep_id, function=lambda: agent_job(spec, out), entity=entity, project=project, count=max_runs or spec.run_cap)
    return collect_records(out, spec)


# ----------------------------------------------------------------------------- entry points
def run_sweep(spec_path: str | Path, out: str | Path | None = None, max_runs: int | None = None, overrides: list[str] | tuple[str, ...] = ()) -> list[RunRecord]:
    """Check the spec, run the sweep (server or local), write the results under OUT and print the table."""
    if max_runs is not None and max_runs < 1:
        raise SweepError(f"--max-runs must be at least 1, got {max_runs}")
    spec = load_spec(spec_path, overrides)
    out_dir = Path(out) if out else Path("runs") / "sweeps" / spec.name
    server = use_server(spec)
    if spec.method == "bayes" and not server:
        raise SweepError(f"{spec.path}: method: bayes needs wandb's sweep server: set WANDB_API_KEY (with WANDB_MODE unset or online); "
                         "to search here use `method: random` with a run_cap")  # fmt: skip
    if not server:
        plan(spec, max_runs)  # its errors (a grid over a distribution, no run_cap) before any run
    out_dir.mkdir(parents=True, exist_ok=True)
    records = run_server(spec, out_dir, max_runs) if server else run_local(spec, out_dir, max_runs)
    table = write_results(out_dir, spec, records)
    print(f"\n[sweep] {spec.name}: {len(records)} runs, {spec.metric} ({spec.goal}); {out_dir / RESULTS_CSV}\n\n{table}", flush=True)
    return records


def cmd_sweep(args: argparse.Namespace) -> int:
    """0 when every run finished, 1 when some failed (their error tails are in sweep_results.md), 2 for a bad spec."""
    try:
        records = run_sweep(args.spec, args.out, args.max_runs, args.overrides)
    except SweepError as err:
        print(f"align sweep: {err}", file=sys.stderr)
        return 2
    return 0 if all(r.status == "ok" for r in records) else 1


def register(subparsers: Any) -> None:
    """Add `align sweep SPEC [--out DIR] [--max-runs N] [--set KEY=VALUE ...]` to the CLI's subparsers."""
    parser = subparsers.add_parser("sweep", help="hyperparameter sweep from a wandb sweep spec (wandb's server with an API key, else local grid/random)")
    parser.add_argument("spec", help="sweep spec YAML under configs/sweeps/")
    parser.add_argument("--out", default=None, help="sweep directory (default runs/sweeps/NAME); rerunning into it skips finished runs")
    parser.add_argument("--max-runs", type=int, default=None, help="cap on runs (default: run_cap; grid: the whole product)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every run, repeatable")
    parser.set_defaults(func=cmd_sweep)
