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
import difflib
import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from align.config import ConfigError, MPORecipe, RLHFRecipe, RMRecipe, SFTRecipe, flat_dict, load_recipe

RECIPES: dict[str, type] = {"sft": SFTRecipe, "rm": RMRecipe, "mpo": MPORecipe, "rlhf": RLHFRecipe}
METHODS = ("grid", "random", "bayes")
GOALS = ("maximize", "minimize")
WANDB_KEYS = ("name", "description", "project", "entity", "method", "metric", "parameters", "run_cap", "early_terminate")
ALIGN_KEYS = ("command", "config", "overrides", "seed")
PARAM_KEYS = ("values", "value", "probabilities", "distribution", "min", "max", "mu", "sigma", "q", "a", "b", "parameters")
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform", "log_uniform_values",
                 "q_log_uniform", "q_log_uniform_values", "inv_log_uniform", "inv_log_uniform_values", "normal", "q_normal",
                 "log_normal", "q_log_normal", "beta", "q_beta")  # fmt: skip
MANAGED = ("output_dir", "logging.group", "logging.wandb_mode")  # the sweep sets these for every run
CACHE_KEY = "mpo.cache_dir"
RESULTS_CSV, RESULTS_MD, SWEEP_JSON, RUN_RECORD, RUN_LOG = "sweep_results.csv", "sweep_results.md", "sweep.json", "sweep_run.json", "sweep.log"
TAIL_LINES = 20


class SweepError(ConfigError):
    """A spec or a sweep that cannot go on; the message names the spec file and the key."""


@dataclasses.dataclass
class SweepSpec:
    path: Path
    name: str
    command: str
    config: str
    overrides: list[str]  # the spec's, then --set: applied to every run before its parameters
    method: str
    metric: str  # a key of summary.json's metrics, without the `metrics.` prefix
    goal: str
    params: dict[str, dict[str, Any]]  # dotted key -> wandb parameter spec (distribution filled in)
    run_cap: int | None
    seed: int
    raw: dict[str, Any]  # the YAML as read, for the wandb keys passed through to the server
    recipe: Any  # the base recipe with the overrides: what every run starts from


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


# ----------------------------------------------------------------------------- the spec
def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Read and check a spec before any run starts: a typo must not surface as N failed runs."""
    path = Path(path)
    raw = _read_yaml(path)
    _check_keys(raw, WANDB_KEYS + ALIGN_KEYS, path, "")
    command = _choice(raw, "command", tuple(RECIPES), path)
    config = _resolve_config(_require(raw, "config", path), path)
    method = _choice(raw, "method", METHODS, path)
    metric, goal = _metric(raw, path)
    run_overrides = _overrides(raw, path) + list(overrides)
    params = _parameters(raw, path)
    cls = RECIPES[command]
    try:
        recipe = load_recipe(cls, config, run_overrides)
    except ConfigError as err:
        raise SweepError(f"{path}: overrides: {err}") from None
    _check_parameters(cls, config, run_overrides, params, path)
    return SweepSpec(
        path=path,
        name=str(raw.get("name") or path.stem),
        command=command,
        config=config,
        overrides=run_overrides,
        method=method,
        metric=metric,
        goal=goal,
        params=params,
        run_cap=_positive_int(raw, "run_cap", path),
        seed=_int(raw, "seed", path, 0),
        raw=raw,
        recipe=recipe,
    )


def _resolve_config(config: Any, path: Path) -> str:
    """As given (from the working directory), else under one of the spec's parent folders, so
    `configs/sweeps/x.yaml` finds `configs/mpo/quickstart.yaml` from anywhere."""
    if isinstance(config, str):
        if Path(config).is_file():
            return config
        for parent in path.resolve().parents:
            if (parent / config).is_file():
                return str(parent / config)
    raise SweepError(f"{path}: config: base recipe {config!r} not found (from the working directory or the spec's folders)")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"{path}: sweep spec not found") from None
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: top level must be a mapping")
    return _fix_numbers(raw)


def _fix_numbers(node: Any) -> Any:
    """PyYAML reads `1e-3` (no dot) as a string; a sweep means the number."""
    if isinstance(node, dict):
        return {k: _fix_numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_numbers(v) for v in node]
    if isinstance(node, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", node):
        return float(node)
    return node


def _check_keys(node: dict, allowed: tuple[str, ...], path: Path, where: str) -> None:
    for key in node:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(allowed)}"
            raise SweepError(f"{path}: unknown key {where + str(key)!r}{hint}")


def _require(raw: dict, key: str, path: Path) -> Any:
    if raw.get(key) is None:
        raise SweepError(f"{path}: missing required key {key!r}")
    return raw[key]


def _choice(raw: dict, key: str, choices: tuple[str, ...], path: Path, where: str = "") -> str:
    value = _require(raw, key, path)
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SweepError(f"{path}: {where}{key}: {value!r} is not one of {list(choices)}{hint}")
    return value


def _int(raw: dict, key: str, path: Path, default: int | None) -> int | None:
    value = raw.get(key, default)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise SweepError(f"{path}: {key}: expected an integer, got {value!r}")
    return value


def _positive_int(raw: dict, key: str, path: Path) -> int | None:
    value = _int(raw, key, path, None)
    if value is not None and value < 1:
        raise SweepError(f"{path}: {key}: must be at least 1, got {value}")
    return value


def _metric(raw: dict, path: Path) -> tuple[str, str]:
    metric = raw.get("metric")
    if not isinstance(metric, dict) or not metric.get("name"):
        raise SweepError(f"{path}: missing metric: add `metric: {{name: KEY, goal: maximize|minimize}}` (KEY from summary.json's metrics)")
    _check_keys(metric, ("name", "goal", "target"), path, "metric.")
    goal = _choice(metric | {"goal": metric.get("goal", "minimize")}, "goal", GOALS, path, "metric.")  # wandb's default
    return bare_metric(str(metric["name"])), goal


def bare_metric(name: str) -> str:
    """`metrics.accuracy`, `final/accuracy` and `accuracy` name the same summary.json value."""
    for prefix in ("metrics.", "final/"):
        name = name.removeprefix(prefix)
    return name


def _overrides(raw: dict, path: Path) -> list[str]:
    items = raw.get("overrides") or []
    if not isinstance(items, list):
        raise SweepError(f"{path}: overrides: expected a list of KEY=VALUE strings")
    for i, item in enumerate(items):
        if not isinstance(item, str) or "=" not in item:
            raise SweepError(f"{path}: overrides[{i}]: expected KEY=VALUE, got {item!r}")
    return list(items)


def _parameters(raw: dict, path: Path) -> dict[str, dict[str, Any]]:
    params = raw.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{path}: parameters: expected a mapping of dotted recipe keys to {{values: [...]}} or a distribution")
    out = _flatten(params, "", path)
    for key in out:
        if key in MANAGED:
            raise SweepError(f"{path}: parameters.{key}: set by the sweep for every run; it cannot be swept")
    return out


def _flatten(params: dict, prefix: str, path: Path) -> dict[str, dict[str, Any]]:
    """Dotted keys as they are, and wandb's nested form (`optim: {parameters: {lr: ...}}`) as `optim.lr`."""
    out: dict[str, dict[str, Any]] = {}
    for key, spec in params.items():
        name = f"{prefix}{key}"
        if not isinstance(spec, dict):
            raise SweepError(f"{path}: parameters.{name}: expected {{values: [...]}}, {{value: x}} or {{distribution, min, max}}, got {spec!r}")
        _check_keys(spec, PARAM_KEYS, path, f"parameters.{name}.")
        if "parameters" in spec:
            out |= _flatten(spec["parameters"], f"{name}.", path)
        else:
            out[name] = _with_distribution(name, spec, path)
    return out


def _with_distribution(key: str, spec: dict, path: Path) -> dict[str, Any]:
    """Fill in the distribution as wandb infers it: values -> categorical, value -> constant, int bounds -> int_uniform."""
    spec = dict(spec)
    if "distribution" not in spec:
        if "values" in spec:
            spec["distribution"] = "categorical"
        elif "value" in spec:
            spec["distribution"] = "constant"
        elif "min" in spec and "max" in spec:
            ints = all(isinstance(spec[b], int) and not isinstance(spec[b], bool) for b in ("min", "max"))
            spec["distribution"] = "int_uniform" if ints else "uniform"
        else:
            raise SweepError(f"{path}: parameters.{key}: give `values: [...]`, `value: x`, or `min` and `max`")
    dist = _choice(spec, "distribution", DISTRIBUTIONS, path, f"parameters.{key}.")
    if dist == "categorical" and (not isinstance(spec.get("values"), list) or not spec["values"]):
        raise SweepError(f"{path}: parameters.{key}.values: expected a non-empty list")
    if "probabilities" in spec and (not isinstance(spec["probabilities"], list) or len(spec["probabilities"]) != len(spec.get("values") or [])):
        raise SweepError(f"{path}: parameters.{key}.probabilities: expected one weight per value")
    if dist == "constant" and "value" not in spec:
        raise SweepError(f"{path}: parameters.{key}: distribution constant needs `value`")
    if "uniform" in dist:
        number = int if dist == "int_uniform" else (int, float)
        for bound in ("min", "max"):
            if not isinstance(spec.get(bound), number) or isinstance(spec.get(bound), bool):
                raise SweepError(f"{path}: parameters.{key}: distribution {dist} needs {'an integer' if number is int else 'a number'} `{bound}`")
        if spec["min"] > spec["max"]:
            raise SweepError(f"{path}: parameters.{key}: min {spec['min']} is above max {spec['max']}")
    if dist.endswith("_values") and spec["min"] <= 0:
        raise SweepError(f"{path}: parameters.{key}: {dist} needs min > 0, got {spec['min']}")
    return spec


def _samples(spec: dict[str, Any]) -> list[Any]:
    """Values that stand for the parameter when checking its key and type against the recipe."""
    dist = spec["distribution"]
    if dist == "categorical":
        return list(spec["values"])
    if dist == "constant":
        return [spec["value"]]
    if dist == "int_uniform":
        return [spec["min"], spec["max"]]
    return [1.0]  # continuous: only the key and a float type matter


def _check_parameters(cls: type, config: str, overrides: list[str], params: dict[str, dict], path: Path) -> None:
    """Each key must exist in the command's recipe and take its values: load_recipe names the bad key."""
    for key, spec in params.items():
        for value in _samples(spec):
            try:
                load_recipe(cls, config, [*overrides, f"{key}={yaml_value(value)}"])
            except ConfigError as err:
                raise SweepError(f"{path}: parameters.{key}: {err}") from None


def yaml_value(value: Any) -> str:
    """The text `--set KEY=TEXT` parses back (as YAML) to `value`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9)
    return text.removesuffix("\n").removesuffix("\n...").strip()


# ----------------------------------------------------------------------------- local search
def plan(spec: SweepSpec, max_runs: int | None = None) -> list[dict[str, Any]]:
    """Every run's parameters, in run order; random draws are seeded, so a rerun plans the same runs."""
    cap = max_runs or spec.run_cap
    if spec.method == "grid":
        axes = [_grid_values(key, p, spec.path) for key, p in spec.params.items()]
        return [dict(zip(spec.params, combo)) for combo in itertools.islice(itertools.product(*axes), cap)]
    if cap is None:
        raise SweepError(f"{spec.path}: run_cap: random search needs a number of runs: set `run_cap` or pass --max-runs")
    for key, p in spec.params.items():
        if p["distribution"] not in SAMPLERS:
            raise SweepError(f"{spec.path}: parameters.{key}: distribution {p['distribution']} runs only on wandb's sweep server; "
                             f"locally use one of {sorted(SAMPLERS)}")  # fmt: skip
    rng = random.Random(spec.seed)
    return [{key: _round(SAMPLERS[p["distribution"]](rng, p)) for key, p in spec.params.items()} for _ in range(cap)]


def _grid_values(key: str, spec: dict[str, Any], path: Path) -> list[Any]:
    dist = spec["distribution"]
    if dist == "categorical":
        return list(spec["values"])
    if dist == "constant":
        return [spec["value"]]
    if dist == "int_uniform":
        return list(range(spec["min"], spec["max"] + 1))
    raise SweepError(f"{path}: parameters.{key}: grid search needs `values` (distribution {dist} is continuous); list values or use method: random")


def _quantize(x: float, q: float) -> float:
    return round(x / q) * q


SAMPLERS: dict[str, Callable[[random.Random, dict], Any]] = {
    "constant": lambda r, p: p["value"],
    "categorical": lambda r, p: r.choices(p["values"], weights=p.get("probabilities"))[0],
    "int_uniform": lambda r, p: r.randint(p["min"], p["max"]),
    "uniform": lambda r, p: r.uniform(p["min"], p["max"]),
    "q_uniform": lambda r, p: _quantize(r.uniform(p["min"], p["max"]), p.get("q", 1)),
    "log_uniform": lambda r, p: math.exp(r.uniform(p["min"], p["max"])),  # bounds in log space (wandb)
    "log_uniform_values": lambda r, p: math.exp(r.uniform(math.log(p["min"]), math.log(p["max"]))),
    "q_log_uniform_values": lambda r, p: _quantize(math.exp(r.uniform(math.log(p["min"]), math.log(p["max"]))), p.get("q", 1)),
    "normal": lambda r, p: r.gauss(p.get("mu", 0.0), p.get("sigma", 1.0)),
    "q_normal": lambda r, p: _quantize(r.gauss(p.get("mu", 0.0), p.get("sigma", 1.0)), p.get("q", 1)),
    "log_normal": lambda r, p: r.lognormvariate(p.get("mu", 0.0), p.get("sigma", 1.0)),
}


def _round(value: Any) -> Any:
    """Six significant digits: a readable --set and results table; no sweep resolves finer than that."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


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
