"""`align report DIR [--out OUT]`: PNG plots and a one-page report.md from a finished (or running) run or sweep.

Why a command of its own: runs write wandb offline by default and many machines have no browser or wandb
account, but every run leaves `metrics.jsonl` and `summary.json` (see align/engine/logger.py, align/runner.py);
this turns them into files a person can open anywhere or attach to a pull request. Matplotlib draws on the
Agg canvas only (no display, no pyplot global state), and is imported lazily so `align` starts without it.

Run directory (DIR has `metrics.jsonl`)
    Reads `metrics.jsonl` (one JSON object per log call: `step`, `time`, metric keys) and, if present,
    `summary.json` (`job`, `metrics`, ...). Writes into OUT (default `DIR/report/`) those of these plots whose
    metrics exist, each one a grid of panels:
      loss.png        loss, eval/*loss, loss/<part> (MPO), policy_loss / value_loss / ptx_loss (RLHF)
      reward.png      reward and reward/<condition> over steps, MPO's rewards/chosen|rejected|margin,
                      held-out reward per condition before/after (summary: reward_by_condition_before|after)
      kl.png          kl
      accuracy.png    verifier_accuracy(/<condition>), RM's accuracy, MPO's rewards/accuracy over steps; task
                      accuracy per condition before/after as bars (summary: accuracy_by_condition[_before])
      lr.png          lr, lr/actor, lr/critic
      throughput.png  tokens_per_s, and RLHF's time/<phase> split per iteration and in total
      other.png       every other numeric metric (grad_norm, response_length, entropy, ...)
    and `report.md` (job, run facts, final metrics and the per-condition table from summary.json, or the last
    logged values when there is no summary yet, and the images). Robust to hand-edited or crashed logs:
    unparsable lines, records without a step, non-numeric, NaN and infinite values are skipped; records that
    share a step are merged key by key (the later value wins: a train record and the eval record logged at the
    same step both count); a step lower than the previous record's means the run was resumed from a checkpoint,
    so the earlier records from that step on are dropped and the resumed run's records replace them.

Sweep directory (DIR has `sweep_results.csv`; takes precedence over metrics.jsonl) -- the contract a sweep
runner writes to:
    sweep_results.csv  a header row, then one row per run (UTF-8, comma-separated, csv-module quoting):
                         run          optional: a short name for the run (shown first in the table)
                         <param> ...  one column per swept parameter, named by its dotted recipe key
                                      (`optim.lr`, `mpo.beta`), the value as given to `--set`;
                                      numbers are plotted on a numeric axis (log scale when all positive
                                      and spanning 2 decades or more), anything else on a categorical axis
                         <metric>     the objective named in sweep.json: a number, empty or `nan` if none
                         run_dir      the run's output directory (absolute, or relative to DIR)
                         status       `ok` for a run that finished; anything else (`failed`, `skipped`,
                                      `running`, ...) is listed in the table but neither plotted nor ranked;
                                      without a status column every row with a metric value counts
                         wall_s       optional: the run's wall-clock seconds (shown in the table)
                       columns may come in any order; any column not named here is a swept parameter
                       unless sweep.json lists "parameters".
    sweep.json         {"metric": "<metric column>", "goal": "maximize" | "minimize"}, optionally
                       "parameters": ["optim.lr", ...] naming the swept columns, in plot order (default:
                       every column but run, <metric>, status, wall_s and run_dir); other keys are ignored.
    Writes `sweep_<param>.png` (the metric against that parameter, best run starred) for each swept parameter
    and `report.md` (the best run, the results table ranked by the metric, then the runs without a result).

Exit codes: 0 on success; 2 when DIR has neither metrics.jsonl nor sweep_results.csv, when sweep.json is
missing or malformed, or when matplotlib is not installed (each with a message naming the path or the fix).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bookkeeping, not training signals: left out of other.png (still in the "last logged" table).
_NOT_PLOTTED = {"step", "time", "tokens", "epoch", "skipped_steps", "actor_trained"}
_RLHF_LOSSES = ("policy_loss", "value_loss", "ptx_loss")
_MPO_REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margin")
_SWEEP_COLUMNS = ("run", "status", "wall_s", "run_dir")  # sweep_results.csv columns that are not swept parameters


class ReportError(Exception):
    """A directory that cannot be reported on; the message names the path and what is missing."""


Series = dict[str, tuple[list[float], list[float]]]  # metric key -> (steps, values), sorted by step


# --- reading --------------------------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    """A finite float, or None for anything a plot cannot show (strings, bools, None, NaN, inf, lists)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def load_metrics(path: Path) -> dict[int, dict[str, Any]]:
    """step -> merged record: per-key last value wins; a step going backwards (a resume) drops the old tail."""
    by_step: dict[int, dict[str, Any]] = {}
    previous: int | None = None
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut off by a crash, or not JSON at all
            if not isinstance(record, dict):
                continue
            step = _number(record.get("step"))
            if step is None:
                continue
            step = int(step)
            if previous is not None and step < previous:
                for stale in [s for s in by_step if s >= step]:
                    del by_step[stale]
            previous = step
            by_step.setdefault(step, {}).update({k: v for k, v in record.items() if k != "step"})
    return dict(sorted(by_step.items()))


def to_series(by_step: dict[int, dict[str, Any]]) -> Series:
    """Numeric, finite values only: a key logged as a string somewhere just loses those points."""
    series: Series = {}
    for step, record in by_step.items():
        for key, value in record.items():
            number = _number(value)
            if number is not None:
                xs, ys = series.setdefault(key, ([], []))
                xs.append(float(step))
                ys.append(number)
    return series


def _read_json(path: Path) -> dict[str, Any] | None:
    """None for a missing or unreadable file: a report of a crashed run is still worth writing."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _numeric_dict(value: Any) -> dict[str, float]:
    """{condition: number} with the non-numeric entries dropped; {} for anything else."""
    if not isinstance(value, dict):
        return {}
    return {str(k): n for k, v in value.items() if (n := _number(v)) is not None}


# --- drawing --------------------------------------------------------------------------------------------
@dataclass
class Panel:
    """One axes: lines over steps, or grouped bars (label -> {group: value})."""

    title: str
    ylabel: str = ""
    lines: Series = field(default_factory=dict)
    bars: dict[str, dict[str, float]] = field(default_factory=dict)
    stacked: bool = False  # lines drawn as a stacked area (time split)
    emphasize: str | None = None  # the aggregate line, drawn thicker than its per-condition parts

    def empty(self) -> bool:
        return not self.lines and not any(self.bars.values())


def _figure(panels: list[Panel]) -> Any:
    from matplotlib.figure import Figure

    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.4 * cols, 4.0 * rows), layout="constrained")
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        if panel.bars:
            _draw_bars(ax, panel)
        elif panel.stacked:
            _draw_stack(ax, panel)
        else:
            _draw_lines(ax, panel)
        ax.set_title(panel.title)
        if panel.ylabel:
            ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
    return fig


def _draw_lines(ax: Any, panel: Panel) -> None:
    for label, (xs, ys) in panel.lines.items():
        bold = label == panel.emphasize
        ax.plot(
            xs,
            ys,
            label=label,
            linewidth=2.2 if bold else 1.2,
            color="black" if bold else None,
            marker="o" if len(xs) <= 12 else None,
            markersize=4,
        )
    ax.set_xlabel("step")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    if len(panel.lines) > 1:
        ax.legend(fontsize="small")


def _draw_stack(ax: Any, panel: Panel) -> None:
    """Per-iteration phases stacked, on the union of steps (a phase missing at a step counts 0 s)."""
    steps = sorted({x for xs, _ in panel.lines.values() for x in xs})
    stacks = []
    for xs, ys in panel.lines.values():
        at = dict(zip(xs, ys))
        stacks.append([at.get(s, 0.0) for s in steps])
    ax.stackplot(steps, *stacks, labels=list(panel.lines), alpha=0.85)
    ax.set_xlabel("step")
    ax.legend(fontsize="small", loc="upper right")


def _draw_bars(ax: Any, panel: Panel) -> None:
    """Grouped bars: one group per condition, one bar per label (before/after), values written on top."""
    groups = list(dict.fromkeys(g for values in panel.bars.values() for g in values))
    labels = [label for label, values in panel.bars.items() if values]
    width = 0.8 / max(len(labels), 1)
    for j, label in enumerate(labels):
        shift = (j - (len(labels) - 1) / 2) * width
        present = [(i, panel.bars[label][g]) for i, g in enumerate(groups) if g in panel.bars[label]]
        bars = ax.bar([i + shift for i, _ in present], [v for _, v in present], width, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize="x-small")
    ax.set_xticks(range(len(groups)), groups, rotation=30 if len(groups) > 4 else 0)
    if len(labels) > 1:
        ax.legend(fontsize="small")


def _save(panels: list[Panel], path: Path) -> bool:
    """Write the figure when any panel has data; False (and nothing written) otherwise."""
    panels = [p for p in panels if not p.empty()]
    if not panels:
        return False
    _figure(panels).savefig(path, dpi=100)
    return True


def _pick(series: Series, keys: Iterable[str]) -> Series:
    return {k: series[k] for k in keys if k in series}


def _prefixed(series: Series, prefix: str) -> Series:
    return {k: v for k, v in sorted(series.items()) if k.startswith(prefix)}


def _before_after(metrics: dict[str, Any], before: str, after: str, overall: tuple[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Bars for a per-condition summary metric (+ an "all" group from the overall keys, when logged);
    a lone `after` (RM's pairwise accuracy) is labelled final."""
    b, a = _numeric_dict(metrics.get(before)), _numeric_dict(metrics.get(after))
    if overall and b and a:
        ob, oa = _number(metrics.get(overall[0])), _number(metrics.get(overall[1]))
        if ob is not None and oa is not None:
            b, a = b | {"all": ob}, a | {"all": oa}
    return {"before": b, "after": a} if b else {"final": a}


def run_panels(series: Series, metrics: dict[str, Any], time_split: dict[str, float]) -> dict[str, list[Panel]]:
    """Plot name -> its panels, built from whatever the run logged; empty panels are dropped when saving."""
    used: set[str] = set()

    def take(picked: Series) -> Series:
        used.update(picked)
        return picked

    phases = {k.removeprefix("time/"): v for k, v in take(_prefixed(series, "time/")).items()}  # time/<phase> -> <phase>
    eval_losses = {k: v for k, v in sorted(series.items()) if k.startswith("eval/") and k.endswith("loss")}
    plots: dict[str, list[Panel]] = {
        "loss": [
            Panel("loss", "loss", take(_pick(series, ["loss"]) | eval_losses)),
            Panel("loss parts", "loss", take(_prefixed(series, "loss/"))),
            *[Panel(k, k, take(_pick(series, [k]))) for k in _RLHF_LOSSES],
        ],
        "reward": [
            Panel("reward per condition", "reward", take(_pick(series, ["reward"]) | _prefixed(series, "reward/")), emphasize="reward"),
            Panel("implicit reward (β·log-ratio)", "reward", take(_pick(series, _MPO_REWARDS))),
            Panel(
                "held-out reward per condition",
                "reward",
                bars=_before_after(metrics, "reward_by_condition_before", "reward_by_condition_after", ("reward_before", "reward_after")),
            ),
        ],
        "kl": [Panel("KL to the reference", "KL", take(_pick(series, ["kl"])))],
        "accuracy": [
            Panel(
                "verifier accuracy per condition",
                "accuracy",
                take(_pick(series, ["verifier_accuracy"]) | _prefixed(series, "verifier_accuracy/")),
                emphasize="verifier_accuracy",
            ),
            Panel("training accuracy", "accuracy", take(_pick(series, ["accuracy", "rewards/accuracy"]))),
            Panel(
                "task accuracy per condition",
                "accuracy",
                bars=_before_after(metrics, "accuracy_by_condition_before", "accuracy_by_condition", ("accuracy_before", "accuracy_after")),
            ),
        ],
        "lr": [Panel("learning rate", "lr", take(_pick(series, ["lr"]) | _prefixed(series, "lr/")))],
        "throughput": [
            Panel("throughput", "tokens/s", take(_pick(series, ["tokens_per_s"]))),
            Panel(
                "time per iteration",
                "seconds",
                {k: phases[k] for k in [*[k for k in time_split if k in phases], *sorted(set(phases) - set(time_split))]},
                stacked=True,
            ),
            Panel("time in total", "seconds", bars={"seconds": time_split}),
        ],
    }
    rest = sorted(k for k in series if k not in used and k not in _NOT_PLOTTED and not k.startswith("round/"))
    plots["other"] = [Panel(k, "", {k: series[k]}) for k in rest[:16]]
    return plots


# --- markdown -------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _scalars(mapping: dict[str, Any], flatten: bool = True) -> list[list[Any]]:
    """Scalar entries, and (flatten) one level of {name: scalar} dicts as name/key (time_split_s, data)."""
    rows: list[list[Any]] = []
    for key, value in mapping.items():
        if isinstance(value, str | int | float | bool):
            rows.append([key, value])
        elif flatten and isinstance(value, dict) and value and all(isinstance(v, str | int | float | bool) for v in value.values()):
            rows += [[f"{key}/{k}", v] for k, v in value.items()]
    return rows


def _by_condition(metrics: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Per-condition dicts side by side: one row per condition, one column per dict (nested dicts as dict/sub)."""
    columns: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if not isinstance(value, dict):
            continue
        if flat := _numeric_dict(value):
            columns[key] = flat
        for cond, inner in value.items():
            for sub, n in _numeric_dict(inner).items():
                columns.setdefault(f"{key}/{sub}", {})[str(cond)] = n
    conditions = list(dict.fromkeys(c for col in columns.values() for c in col))
    rows = [[c, *[col.get(c, "") for col in columns.values()]] for c in conditions]
    return ["condition", *columns], rows


def _run_markdown(run_dir: Path, out: Path, summary: dict[str, Any] | None, by_step: dict[int, dict[str, Any]], images: list[str]) -> str:
    job = summary.get("job", "?") if summary else "?"
    lines = [f"# {job} run report", "", f"Run directory: `{run_dir}`", ""]
    if (run_dir / "config.yaml").exists():
        lines += [f"Config: [config.yaml]({Path(os.path.relpath(run_dir / 'config.yaml', out)).as_posix()})", ""]
    if summary:
        facts = [r for r in _scalars({k: v for k, v in summary.items() if k != "metrics"}) if r[0] != "job"]
        if facts:
            lines += ["## Run", "", *_table(["", "value"], facts)]
        metrics = summary.get("metrics") if isinstance(summary.get("metrics"), dict) else {}
        if rows := _scalars(metrics, flatten=False):
            lines += ["## Final metrics", "", *_table(["metric", "value"], rows)]
        header, rows = _by_condition(metrics)
        if rows:
            lines += ["## By condition", "", *_table(header, rows)]
        rounds = summary.get("rounds") if isinstance(summary.get("rounds"), list) else []
        flagged = [r for r in rounds if isinstance(r, dict) and isinstance(r.get("flags"), list) and r["flags"]]
        if flagged:
            lines += ["## Round flags", "", *[f"- round {r.get('round', '?')}: {', '.join(map(str, r['flags']))}" for r in flagged], ""]
    else:
        lines += ["No `summary.json` yet (the run is unfinished or crashed): last logged values instead.", ""]
        last: dict[str, Any] = {}
        for step, record in by_step.items():
            last.update({k: (step, v) for k, v in record.items() if k != "time" and _number(v) is not None})
        if last:
            lines += ["## Last logged values", "", *_table(["metric", "value", "step"], [[k, v, s] for k, (s, v) in sorted(last.items())])]
    lines += ["## Plots", ""]
    if images:
        lines += [f"### {name.removesuffix('.png')}\n\n![{name.removesuffix('.png')}]({name})\n" for name in images]
    else:
        lines += ["No numeric metrics logged yet.", ""]
    return "\n".join(lines).rstrip() + "\n"


# --- entry points ---------------------------------------------------------------------------------------
def report_run(run_dir: Path, out: Path | None = None) -> tuple[Path, list[Path]]:
    """Plots and report.md for one run; returns (report.md, the plots written)."""
    out = out or run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    by_step = load_metrics(run_dir / "metrics.jsonl")
    summary = _read_json(run_dir / "summary.json")
    metrics = summary.get("metrics") if summary and isinstance(summary.get("metrics"), dict) else {}
    series = to_series(by_step)
    time_split = _numeric_dict(summary.get("time_split_s")) if summary else {}
    if not time_split:  # no summary yet: total the per-iteration phases
        time_split = {k.removeprefix("time/"): sum(ys) for k, (_, ys) in _prefixed(series, "time/").items()}
    written = []
    for name, panels in run_panels(series, metrics, time_split).items():
        path = out / f"{name}.png"
        if _save(panels, path):
            written.append(path)
        elif path.exists():
            path.unlink()  # stale from an earlier report: report.md would not link it, so neither should the folder hold it
    md = out / "report.md"
    md.write_text(_run_markdown(run_dir, out, summary, by_step, [p.name for p in written]), encoding="utf-8")
    return md, written


@dataclass
class SweepSpec:
    """sweep.json, validated (see the module docstring for the contract)."""

    metric: str
    goal: str
    params: list[str] | None = None

    @classmethod
    def load(cls, path: Path) -> SweepSpec:
        spec = _read_json(path)
        if spec is None:
            raise ReportError(
                f"{path}: missing or not a JSON object; a sweep directory needs "
                '{"metric": "<column>", "goal": "maximize"|"minimize"} beside sweep_results.csv'
            )
        metric, goal, params = spec.get("metric"), spec.get("goal"), spec.get("parameters")
        if not isinstance(metric, str) or goal not in ("maximize", "minimize"):
            raise ReportError(f'{path}: needs "metric" (a column name) and "goal" ("maximize" or "minimize"); got {spec}')
        if params is not None and not (isinstance(params, list) and all(isinstance(p, str) for p in params)):
            raise ReportError(f'{path}: "parameters", when given, is a list of column names; got {params!r}')
        return cls(metric, goal, params)


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None and text.strip().lower() not in ("true", "false") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _param_plot(rows: list[dict[str, str]], param: str, spec: SweepSpec, best: dict[str, str] | None, path: Path) -> None:
    """Metric against one parameter: numeric axis (log when it spans decades) or one slot per category."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    present = [r.get(param, "") for r in rows if r.get(param, "") != ""]
    slots: dict[str, int] | None = None
    if not present or any(_float(v) is None for v in present):
        slots = {c: i for i, c in enumerate(sorted({r.get(param) or "(unset)" for r in rows}))}

    def position(row: dict[str, str]) -> float | None:
        return _float(row.get(param)) if slots is None else float(slots.get(row.get(param) or "(unset)", 0))

    pts = [(x, _float(r.get(spec.metric))) for r in rows if (x := position(r)) is not None]
    if slots is None:
        xs = [x for x, _ in pts]
        if xs and min(xs) > 0 and max(xs) / min(xs) >= 100:
            ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(slots)), list(slots), rotation=30 if len(slots) > 4 else 0)
        ax.set_xlim(-0.5, max(len(slots), 1) - 0.5)
    ax.scatter([x for x, _ in pts], [y for _, y in pts], s=36, alpha=0.8, label="run")
    if best is not None and (x := position(best)) is not None:
        ax.scatter([x], [_float(best.get(spec.metric))], marker="*", s=260, color="tab:red", zorder=3, label="best")
        ax.legend(fontsize="small")
    better = "higher" if spec.goal == "maximize" else "lower"
    ax.set_xlabel(param)
    ax.set_ylabel(f"{spec.metric} ({better} is better)")
    ax.set_title(f"{spec.metric} vs {param}")
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=100)


def _plot_name(param: str, taken: set[str]) -> str:
    base = "sweep_" + (re.sub(r"[^A-Za-z0-9._-]+", "_", param).strip("._") or "param")
    name, i = f"{base}.png", 2
    while name in taken:
        name, i = f"{base}_{i}.png", i + 1
    taken.add(name)
    return name


def report_sweep(sweep_dir: Path, out: Path | None = None) -> tuple[Path, list[Path]]:
    """One scatter per swept parameter and report.md with the runs ranked by the metric."""
    spec = SweepSpec.load(sweep_dir / "sweep.json")
    with (sweep_dir / "sweep_results.csv").open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c for c in (reader.fieldnames or []) if c]
        rows = [{k: (v or "") for k, v in row.items() if k} for row in reader]
    if spec.metric not in columns:
        raise ReportError(
            f"{sweep_dir / 'sweep_results.csv'}: no column {spec.metric!r} (the metric named in sweep.json); columns: {columns}"
        )
    reserved = (spec.metric, *_SWEEP_COLUMNS)
    params = spec.params if spec.params is not None else [c for c in columns if c not in reserved]
    missing = [p for p in params if p not in columns]
    if missing:
        raise ReportError(f"{sweep_dir / 'sweep.json'}: parameters {missing} are not columns of sweep_results.csv")
    has_status = "status" in columns
    ok = [r for r in rows if (not has_status or r["status"].strip().lower() == "ok") and _float(r.get(spec.metric)) is not None]
    ranked = sorted(ok, key=lambda r: _float(r[spec.metric]) or 0.0, reverse=spec.goal == "maximize")  # stable: ties keep CSV order
    unranked = [r for r in rows if all(r is not o for o in ok)]
    best = ranked[0] if ranked else None

    out = out or sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written, taken = [], set()
    for param in params:
        path = out / _plot_name(param, taken)
        _param_plot(ok, param, spec, best, path)
        written.append(path)

    lines = [
        "# Sweep report",
        "",
        f"Sweep directory: `{sweep_dir}`",
        "",
        f"Metric: `{spec.metric}` ({spec.goal}); {len(rows)} runs, {len(ok)} with a result.",
        "",
    ]
    if best is not None:
        setting = ", ".join(f"`{p}={best.get(p, '')}`" for p in params)
        lines += [
            f"**Best:** {spec.metric} = {_fmt(_float(best[spec.metric]))} with {setting or 'the base recipe'} (`{best.get('run_dir', '')}`)",
            "",
        ]
    head, tail = [c for c in ("run",) if c in columns], [c for c in ("status", "wall_s", "run_dir") if c in columns]
    header = ["rank", *head, *params, spec.metric, *tail]
    table = [
        [i + 1, *[r.get(c, "") for c in head + params], _fmt(_float(r[spec.metric])), *[r.get(c, "") for c in tail]]
        for i, r in enumerate(ranked)
    ]
    table += [["–", *[r.get(c, "") for c in head + params], r.get(spec.metric, ""), *[r.get(c, "") for c in tail]] for r in unranked]
    lines += ["## Results", "", *_table(header, table), "## Plots", ""]
    lines += [f"![{spec.metric} vs {p}]({path.name})\n" for p, path in zip(params, written)] or ["No swept parameters.", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return md, written


def report(path: Path, out: Path | None = None) -> tuple[Path, list[Path]]:
    """A sweep report when DIR has sweep_results.csv, else a run report; ReportError when it has neither."""
    if (path / "sweep_results.csv").is_file():
        return report_sweep(path, out)
    if (path / "metrics.jsonl").is_file():
        return report_run(path, out)
    what = "is not a directory" if not path.is_dir() else "has neither metrics.jsonl (a run) nor sweep_results.csv (a sweep)"
    raise ReportError(f"{path} {what}")


def cmd_report(args: argparse.Namespace) -> int:
    try:
        md, plots = report(Path(args.run_dir), Path(args.out) if args.out else None)
    except ReportError as err:
        print(f"align report: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise
        print("align report: matplotlib is not installed; pip install 'matplotlib>=3.8'", file=sys.stderr)
        return 2
    print(f"[report] {len(plots)} plot{'s' * (len(plots) != 1)} and {md}")
    return 0


def register(subparsers: Any) -> None:
    """Adds `align report` to the CLI's subparsers (cli.py calls this; the command's func returns an exit code)."""
    parser = subparsers.add_parser("report", help="PNG plots and report.md from a run's metrics.jsonl or a sweep's sweep_results.csv")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run's output directory, or a sweep directory")
    parser.add_argument("--out", help="where to write the plots and report.md (default: RUN_DIR/report)")
    parser.set_defaults(func=cmd_report)
