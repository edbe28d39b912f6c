"""Sweep specs: wandb's format plus align's keys, read and checked before any run, and the local run plan.

A spec is wandb's keys (method, metric, parameters, run_cap, name, description, project, entity,
early_terminate) plus align's: `command` (sft|rm|mpo|rlhf), `config` (the base recipe), `overrides` (KEY=VALUE
for every run) and `seed` (local random search). Parameter names are dotted recipe keys, each checked against
the command's recipe; the metric is a key of summary.json's `metrics`. `plan` lists every local run's values
(grid: the product; random: seeded draws), so a rerun plans the same runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from align.config import RECIPES, ConfigError, load_recipe, read_yaml_mapping

METHODS = ("grid", "random", "bayes")
GOALS = ("maximize", "minimize")
WANDB_KEYS = ("name", "description", "project", "entity", "method", "metric", "parameters", "run_cap", "early_terminate")
ALIGN_KEYS = ("command", "config", "overrides", "seed")
PARAM_KEYS = ("values", "value", "probabilities", "distribution", "min", "max", "mu", "sigma", "q", "a", "b", "parameters")
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform", "log_uniform_values",
                 "q_log_uniform", "q_log_uniform_values", "inv_log_uniform", "inv_log_uniform_values", "normal", "q_normal",
                 "log_normal", "q_log_normal", "beta", "q_beta")  # fmt: skip
MANAGED = ("output_dir", "logging.group", "logging.wandb_mode")  # the sweep sets these for every run


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
    return _fix_numbers(read_yaml_mapping(path, "sweep spec", SweepError))


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
    if dist in ("categorical", "constant"):
        return _grid_values("", spec, Path())
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
