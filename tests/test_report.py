"""`align report`: plots and report.md from synthetic run and sweep directories (no training, a few seconds)."""

from __future__ import annotations

import argparse
import csv
import json
import struct
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from align.report import load_metrics, register  # noqa: E402

CONDITIONS = ("concise", "harmless", "math")


def _cli(argv: list[str]) -> int:
    """Through `register`, the way cli.py wires it: a subparser whose func returns the exit code."""
    parser = argparse.ArgumentParser(prog="align")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _write_jsonl(path: Path, records: list[dict | str]) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width >= 300 and height >= 200 and len(data) > 5_000, f"{path.name}: {width}x{height}, {len(data)} bytes"


def _rlhf_run(run: Path) -> None:
    records: list[dict | str] = []
    for step in range(1, 9):
        rec = {"step": step, "time": 1000.0 + step, "reward": 1.5 + 0.05 * step, "verifier_accuracy": 0.6 + 0.03 * step,
               "kl": 0.01 * step, "response_length": 18.0 + step, "grad_norm": 5.0 / step, "value_loss": 1.0 / step,
               "lr/actor": 5e-5 * min(1.0, step / 3), "lr/critic": 1e-4, "time/generate": 10.0, "time/score": 8.0,
               "time/experience": 6.0, "time/train": 20.0, "round/flags": 0}  # fmt: skip
        rec |= {f"reward/{c}": 1.0 + 0.1 * i + 0.02 * step for i, c in enumerate(CONDITIONS)}
        rec |= {f"verifier_accuracy/{c}": 0.5 + 0.1 * i + 0.01 * step for i, c in enumerate(CONDITIONS)}
        if step >= 3:
            rec |= {"policy_loss": 0.1 - 0.01 * step, "ptx_loss": 0.05}
        records.append(rec)
    records[4]["kl"] = float("nan")  # json.dumps writes NaN, which json.loads reads back
    records[5]["entropy"] = "n/a"
    records.append('{"step": 9, "reward": 1.')  # cut off by a crash
    _write_jsonl(run / "metrics.jsonl", records)
    metrics = {
        "kl": 0.154, "reward_before": 1.653, "reward_after": 1.95, "accuracy_before": 0.6567, "accuracy_after": 0.9367, "accuracy": 0.9367,
        "reward_by_condition_before": {"concise": 0.83, "harmless": 1.93, "math": 2.2},
        "reward_by_condition_after": {"concise": 1.63, "harmless": 1.95, "math": 2.27},
        "accuracy_by_condition_before": {"concise": 0.14, "harmless": 0.96, "math": 0.87},
        "accuracy_by_condition": {"concise": 0.94, "harmless": 0.97, "math": 0.9},
    }  # fmt: skip
    summary = {"job": "rlhf", "metrics": metrics, "iterations": 8, "optimizer_steps": 32, "wall_s": 651.81,
               "time_split_s": {"generate": 80.0, "score": 64.0, "experience": 48.0, "train": 160.0},
               "rounds": [{"round": 0, "flags": []}, {"round": 1, "flags": ["reward_up_accuracy_down"]}],
               "eval_samples": [{"problem": "What is 2+0?", "response": "Final Answer: 2"}]}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.yaml").write_text("output_dir: x\n")


def test_rlhf_run_writes_every_plot_and_a_linked_report(tmp_path):
    run = tmp_path / "rlhf"
    run.mkdir()
    _rlhf_run(run)
    assert _cli(["report", str(run)]) == 0
    out = run / "report"
    expected = {f"{n}.png" for n in ("loss", "reward", "kl", "accuracy", "lr", "throughput", "other")}
    assert {p.name for p in out.glob("*.png")} == expected
    for name in expected:
        _assert_png(out / name)
    md = (out / "report.md").read_text()
    assert md.startswith("# rlhf run report")
    for name in expected:
        assert f"]({name})" in md
    assert "| accuracy_after | 0.9367 |" in md and "| reward_after | 1.95 |" in md and "| kl | 0.154 |" in md
    assert (
        "| condition | reward_by_condition_before | reward_by_condition_after | accuracy_by_condition_before | accuracy_by_condition |"
        in md
    )
    assert "| math | 2.2 | 2.27 | 0.87 | 0.9 |" in md
    assert "| wall_s | 651.81 |" in md and "| time_split_s/train | 160 |" in md
    assert "round 1: reward_up_accuracy_down" in md and "[config.yaml](../config.yaml)" in md


def test_sft_run_writes_only_the_plots_it_has_metrics_for(tmp_path):
    run = tmp_path / "sft"
    run.mkdir()
    records: list[dict | str] = [{"step": s, "time": 1.0 * s, "loss": 3.0 / s, "lr": 3e-3, "tokens_per_s": 7000.0 + s, "tokens": 2000 * s}
                                 for s in range(2, 22, 2)]  # fmt: skip
    records.append({"step": 20, "time": 30.0, "eval/loss": 0.3})  # the eval record logged at the last train step
    _write_jsonl(run / "metrics.jsonl", records)
    stale = run / "report" / "kl.png"  # from an earlier report: it must not outlive the metrics it showed
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    out = tmp_path / "elsewhere"
    assert _cli(["report", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["loss.png", "lr.png", "throughput.png"]
    for png in out.glob("*.png"):
        _assert_png(png)
    md = (out / "report.md").read_text()
    assert "No `summary.json` yet" in md
    assert "| eval/loss | 0.3 | 20 |" in md and "| loss | 0.15 | 20 |" in md  # last values, train and eval merged at step 20
    assert "kl.png" not in md and "](loss.png)" in md
    assert stale.exists()  # --out elsewhere leaves RUN_DIR/report alone
    assert _cli(["report", str(run)]) == 0
    assert not stale.exists()


def test_metrics_merge_steps_and_keep_the_resumed_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_jsonl(path, [
        {"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0}, {"step": 3, "loss": 2.5}, {"step": 4, "loss": 2.4, "kl": 0.1},
        {"step": 3, "loss": 2.0, "lr": "warmup"},  # resumed from the step-2 checkpoint: 3 and 4 are logged again
        {"step": 3, "eval/loss": 1.9}, {"time": 5.0, "loss": 9.0}, "not json", [1, 2], {"step": float("nan"), "loss": 9.0},
    ])  # fmt: skip
    by_step = load_metrics(path)
    assert list(by_step) == [1, 2, 3]
    assert by_step[3] == {"loss": 2.0, "lr": "warmup", "eval/loss": 1.9}


@pytest.mark.parametrize("goal", ["minimize", "maximize"])
def test_sweep_writes_one_plot_per_parameter_and_a_ranked_table(tmp_path, goal):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    header = ["run", "optim.lr", "mpo.loss", "eval/loss", "status", "wall_s", "run_dir"]  # what align/sweep.py writes
    rows = [
        ["a", "1e-05", "sigmoid", "0.5", "ok", "61.0", "runs/a"],
        ["b", "1e-04", "sigmoid", "0.3", "ok", "60.2", "runs/b"],
        ["c", "1e-03", "hinge", "0.4", "ok", "59.9", "runs/c"],
        ["d", "1e-02", "hinge", "", "failed", "3.1", "runs/d"],
        ["e", "3e-02", "hinge", "nan", "ok", "62.5", "runs/e"],
    ]
    with (sweep / "sweep_results.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    spec = {"metric": "eval/loss", "goal": goal, "method": "grid"}
    if goal == "maximize":  # the swept columns named explicitly; without them every non-reserved column is one
        spec["parameters"] = ["optim.lr", "mpo.loss"]
    (sweep / "sweep.json").write_text(json.dumps(spec))
    assert _cli(["report", str(sweep)]) == 0
    out = sweep / "report"
    assert sorted(p.name for p in out.glob("*.png")) == ["sweep_mpo.loss.png", "sweep_optim.lr.png"]
    for png in out.glob("*.png"):
        _assert_png(png)
    md = (out / "report.md").read_text()
    assert "](sweep_optim.lr.png)" in md and "](sweep_mpo.loss.png)" in md
    assert "| rank | run | optim.lr | mpo.loss | eval/loss | status | wall_s | run_dir |" in md
    table = md[md.index("## Results") :]
    order = sorted("abcde", key=lambda r: table.index(f"| runs/{r} |"))
    assert order[:3] == (["b", "c", "a"] if goal == "minimize" else ["a", "c", "b"])  # ranked by the metric
    assert set(order[3:]) == {"d", "e"}  # the failed run and the one without a value come after the ranked ones
    best = rows["abcde".index(order[0])]
    assert f"**Best:** eval/loss = {best[3]} with `optim.lr={best[1]}`, `mpo.loss={best[2]}`" in md
    assert f"| 1 | {order[0]} | {best[1]} |" in md


def test_sweep_needs_its_spec(tmp_path, capsys):
    (tmp_path / "sweep_results.csv").write_text("optim.lr,eval/loss,run_dir,status\n1e-4,0.3,runs/a,ok\n")
    assert _cli(["report", str(tmp_path)]) == 2
    assert "sweep.json" in capsys.readouterr().err
    (tmp_path / "sweep.json").write_text(json.dumps({"metric": "accuracy", "goal": "maximize"}))
    assert _cli(["report", str(tmp_path)]) == 2
    assert "'accuracy'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["empty", "missing"])
def test_a_directory_without_metrics_is_a_clear_error(tmp_path, capsys, kind):
    target = tmp_path / "run" if kind == "missing" else tmp_path
    assert _cli(["report", str(target)]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and ("metrics.jsonl" in err or "not a directory" in err)
    assert not (target / "report").exists()


def test_register_exposes_the_cli_contract():
    parser = argparse.ArgumentParser(prog="align")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", "runs/x", "--out", "/tmp/o"])
    assert (args.command, args.run_dir, args.out) == ("report", "runs/x", "/tmp/o")
    assert callable(args.func)
    assert parser.parse_args(["report", "runs/x"]).out is None
    with pytest.raises(SystemExit):
        parser.parse_args(["report"])
