"""`align sweep`: spec checks, local grid/random runs (real and stand-in jobs), resume, results files, wandb translation."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import types
from pathlib import Path

import pytest
import yaml

from align import sweep
from align.sweep import SweepError, load_spec, plan, run_sweep
from tests.conftest import ROOT, tiny_overrides

SFT_CONFIG = str(ROOT / "configs" / "sft" / "quickstart.yaml")
COLUMNS_TAIL = ["status", "wall_s", "run_dir"]

# A stand-in for `python -m align ...`: takes the --set items, fails for seeds listed in FAKE_FAIL, else writes
# config.yaml and summary.json (loss_final = 1 + seed) like a finished run. Starts in milliseconds.
FAKE_JOB = """
import json, os, pathlib, sys, yaml
sets = dict(a.split("=", 1) for a in sys.argv[1:])
run_dir = pathlib.Path(sets["output_dir"])
seed = yaml.safe_load(sets.get("train.seed", "0"))
if str(seed) in os.environ.get("FAKE_FAIL", "").split(","):
    print("loading data"); print("RuntimeError: boom, out of memory"); sys.exit(3)
(run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"seed": seed}, "logging": {"group": sets["logging.group"]}}))
metrics = {"loss_final": 1.0 + seed, "wandb_run": os.environ.get("WANDB_RUN_ID")}
(run_dir / "summary.json").write_text(json.dumps({"metrics": metrics, "wall_s": 0.5, "sets": sets}))
"""


@pytest.fixture
def fake_job(tmp_path, monkeypatch):
    script = tmp_path / "fake_job.py"
    script.write_text(FAKE_JOB)
    monkeypatch.setattr(sweep, "job_command", lambda spec, overrides: [sys.executable, str(script), *overrides])
    return script


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Runs start from tmp (nothing lands in the checkout) with the checkout importable; no wandb key unless a test sets one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def write_spec(path: Path, **fields) -> Path:
    spec = {"command": "sft", "config": SFT_CONFIG, "method": "grid", "metric": {"name": "loss_final", "goal": "minimize"},
            "parameters": {"train.seed": {"values": [0, 1]}}} | fields  # fmt: skip
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="align")
    sweep.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def read_csv(out: Path) -> list[dict[str, str]]:
    with (out / "sweep_results.csv").open() as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- real runs
def test_local_grid_runs_every_point_writes_sorted_results_and_resumes(tmp_path, capsys):
    """2 x 2 grid of real tiny SFT runs (subprocesses), then a rerun that skips all four."""
    base = tiny_overrides(tmp_path / "unused", steps=2, **{"data.synthetic.train_rows": 32, "data.synthetic.eval_rows": 8,
                          "data.max_length": 128, "train.global_batch_size": 2, "eval.num_prompts": 4, "eval.max_new_tokens": 4,
                          "eval.enabled": False})  # fmt: skip
    base = [o for o in base if not o.startswith("output_dir=")]
    spec = write_spec(tmp_path / "grid.yaml", name="tiny-grid", overrides=base,
                      parameters={"optim.lr": {"values": [1e-3, 1e-4]}, "train.seed": {"values": [0, 1]}})  # fmt: skip
    out = tmp_path / "sweep"
    assert cli(["sweep", str(spec), "--out", str(out)]) == 0

    rows = read_csv(out)
    assert list(rows[0]) == ["run", "optim.lr", "train.seed", "loss_final", *COLUMNS_TAIL]
    assert sorted(r["run"] for r in rows) == ["run-000", "run-001", "run-002", "run-003"]
    losses = [float(r["loss_final"]) for r in rows]
    assert losses == sorted(losses) and all(r["status"] == "ok" for r in rows)  # minimize: best (lowest) first
    assert json.loads((out / "sweep.json").read_text()) == {"metric": "loss_final", "goal": "minimize", "method": "grid",
                                                             "parameters": ["optim.lr", "train.seed"]}  # fmt: skip
    md = (out / "sweep_results.md").read_text()
    assert "| run | optim.lr | train.seed | loss_final | status | wall_s | run_dir |" in md
    planned = {"run-000": (1e-3, 0), "run-001": (1e-3, 1), "run-002": (1e-4, 0), "run-003": (1e-4, 1)}
    for row in rows:
        run_dir = Path(row["run_dir"])
        assert run_dir == (out / row["run"]).resolve() and (run_dir / "summary.json").exists()
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (config["optim"]["lr"], config["train"]["seed"]) == planned[row["run"]]
        assert (float(row["optim.lr"]), int(row["train.seed"])) == planned[row["run"]]
        assert config["logging"]["group"] == "tiny-grid" and config["logging"]["wandb_mode"] == "offline"
        assert config["output_dir"] == str(out / row["run"])
    assert "| run | optim.lr" in capsys.readouterr().out  # the table is printed at the end

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("run-*/summary.json")}
    assert cli(["sweep", str(spec), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("run-*/summary.json")} == stamps
    assert [r["loss_final"] for r in read_csv(out)] == [r["loss_final"] for r in rows]


# ----------------------------------------------------------------------------- stand-in jobs
def test_failed_run_is_recorded_the_sweep_goes_on_and_a_rerun_retries_it(tmp_path, fake_job, monkeypatch):
    spec = write_spec(tmp_path / "s.yaml", parameters={"train.seed": {"values": [0, 1, 2]}})
    out = tmp_path / "sweep"
    monkeypatch.setenv("FAKE_FAIL", "1")
    assert cli(["sweep", str(spec), "--out", str(out)]) == 1
    rows = read_csv(out)
    assert [(r["run"], r["status"], r["loss_final"]) for r in rows] == [("run-000", "ok", "1.0"), ("run-002", "ok", "3.0"), ("run-001", "failed", "")]
    md = (out / "sweep_results.md").read_text()
    assert "## Failed runs" in md and "exit code 3" in md and "boom, out of memory" in md

    monkeypatch.setenv("FAKE_FAIL", "")
    records = run_sweep(spec, out)
    assert {r.run: r.skipped for r in records} == {"run-000": True, "run-001": False, "run-002": True}
    assert [r["status"] for r in read_csv(out)] == ["ok", "ok", "ok"]


def test_changed_spec_does_not_reuse_a_run_made_with_other_values(tmp_path, fake_job):
    out = tmp_path / "sweep"
    run_sweep(write_spec(tmp_path / "s.yaml"), out)
    with pytest.raises(SweepError, match=r"run-000 ran with train.seed=0 but this sweep plans 5"):
        run_sweep(write_spec(tmp_path / "s.yaml", parameters={"train.seed": {"values": [5, 6]}}), out)


def test_random_search_is_seeded_and_respects_run_cap(tmp_path, fake_job):
    params = {"optim.lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2},
              "optim.warmup_ratio": {"min": 0.0, "max": 0.2}, "train.seed": {"min": 0, "max": 9},
              "optim.schedule": {"values": ["cosine", "constant"]}}  # fmt: skip
    spec = load_spec(write_spec(tmp_path / "r.yaml", method="random", run_cap=5, seed=7, parameters=params))
    points = plan(spec)
    assert len(points) == 5 and points == plan(spec)
    assert plan(spec, max_runs=3) == points[:3]  # raising the cap later extends the same sweep
    assert points != plan(load_spec(write_spec(tmp_path / "r2.yaml", method="random", run_cap=5, seed=8, parameters=params)))
    for p in points:
        assert 1e-5 <= p["optim.lr"] <= 1e-2 and 0.0 <= p["optim.warmup_ratio"] <= 0.2
        assert isinstance(p["train.seed"], int) and 0 <= p["train.seed"] <= 9 and p["optim.schedule"] in ("cosine", "constant")
    assert len({p["optim.lr"] for p in points}) == 5

    out = tmp_path / "sweep"
    records = run_sweep(tmp_path / "r.yaml", out, max_runs=2)
    assert [r.run for r in records] == ["run-000", "run-001"] and sorted(p.name for p in out.glob("run-*")) == ["run-000", "run-001"]
    assert records[0].params == points[0]
    with pytest.raises(SweepError, match="run_cap"):
        plan(load_spec(write_spec(tmp_path / "r3.yaml", method="random", parameters=params)))


def test_grid_is_capped_by_max_runs(tmp_path, fake_job):
    spec = write_spec(tmp_path / "g.yaml", parameters={"train.seed": {"values": [0, 1, 2]}, "optim.lr": {"values": [1e-3, 1e-4]}})
    assert len(plan(load_spec(spec))) == 6
    assert [r.params for r in run_sweep(spec, tmp_path / "sweep", max_runs=2)] == [{"train.seed": 0, "optim.lr": 1e-3}, {"train.seed": 0, "optim.lr": 1e-4}]


def test_metric_missing_from_summary_stops_after_the_first_run(tmp_path, fake_job):
    spec = write_spec(tmp_path / "s.yaml", metric={"name": "metrics.accuracy", "goal": "maximize"})
    with pytest.raises(SweepError, match=r"metric.name: 'accuracy' is not a number in .*numbers there: loss_final"):
        run_sweep(spec, tmp_path / "sweep")
    assert not (tmp_path / "sweep" / "run-001").exists() and (tmp_path / "sweep" / "sweep_results.csv").exists()


def test_mpo_runs_share_one_reference_cache_unless_the_user_sets_it(tmp_path):
    spec = load_spec(ROOT / "configs" / "sweeps" / "mpo_loss_weights.yaml")
    items = sweep.run_overrides(spec, plan(spec)[0], tmp_path / "out" / "run-000", "offline")
    assert f"mpo.cache_dir={tmp_path / 'out' / '.cache' / 'reference_logprobs'}" in items
    assert {"logging.group=mpo_loss_weights", "logging.wandb_mode=offline", f"output_dir={tmp_path / 'out' / 'run-000'}"} <= set(items)
    spec = load_spec(ROOT / "configs" / "sweeps" / "mpo_loss_weights.yaml", ["mpo.cache_dir=/mine"])
    assert [i for i in sweep.run_overrides(spec, {}, tmp_path / "run-000", "offline") if i.startswith("mpo.cache_dir")] == ["mpo.cache_dir=/mine"]


def test_example_specs_check_against_their_recipes():
    mpo = load_spec(ROOT / "configs" / "sweeps" / "mpo_loss_weights.yaml")
    assert (mpo.command, mpo.metric, mpo.goal, len(plan(mpo))) == ("mpo", "accuracy_after", "maximize", 12)
    assert set(mpo.params) == {"mpo.losses.sigmoid", "mpo.losses.bco_pair", "mpo.losses.sft", "mpo.beta"}
    rlhf = load_spec(ROOT / "configs" / "sweeps" / "rlhf_kl.yaml")
    assert (rlhf.command, rlhf.metric, rlhf.goal, len(plan(rlhf))) == ("rlhf", "reward_after", "maximize", 12)
    assert set(rlhf.params) == {"ppo.kl_coef", "ppo.critic_warmup_iterations"}


# ----------------------------------------------------------------------------- errors before any run
def test_bayes_without_a_key_is_a_clear_error(tmp_path, capsys):
    spec = write_spec(tmp_path / "b.yaml", method="bayes")
    with pytest.raises(SweepError, match=r"b.yaml: method: bayes needs wandb's sweep server: set WANDB_API_KEY.*method: random"):
        run_sweep(spec, tmp_path / "sweep")
    assert cli(["sweep", str(spec), "--out", str(tmp_path / "sweep")]) == 2
    assert "bayes needs wandb's sweep server" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"parameters": {"optim.lrr": {"values": [1e-3]}}}, r"parameters.optim.lrr: .*unknown key 'optim.lrr'; did you mean 'optim.lr'"),
        ({"parameters": {"optim.lr": {"values": ["fast"]}}}, r"parameters.optim.lr: .*optim.lr: expected float"),
        ({"parameters": {"ppo.kl_coef": {"values": [0.1]}}}, r"parameters.ppo.kl_coef: .*unknown key 'ppo'"),  # not an SFT key
        ({"parameters": {"output_dir": {"values": ["a"]}}}, r"parameters.output_dir: set by the sweep"),
        ({"parameters": {"optim.lr": {"min": 0.1, "max": 0.01}}}, r"parameters.optim.lr: min 0.1 is above max 0.01"),
        ({"parameters": {"optim.lr": {"min": 1e-4, "max": 1e-2}}}, r"parameters.optim.lr: grid search needs `values`.*method: random"),
        ({"method": "grdi"}, r"method: 'grdi' is not one of .*did you mean 'grid'"),
        ({"metric": None}, r"missing metric"),
        ({"metric": {"name": "loss_final", "goal": "max"}}, r"metric.goal: 'max' is not one of"),
        ({"command": "dpo"}, r"command: 'dpo' is not one of"),
        ({"config": "nowhere.yaml"}, r"config: base recipe 'nowhere.yaml' not found"),
        ({"overrides": ["optim.lr"]}, r"overrides\[0\]: expected KEY=VALUE"),
        ({"overrides": ["optim.lrr=1"]}, r"overrides: .*unknown key 'optim.lrr'"),
        ({"paramaters": {}}, r"unknown key 'paramaters'; did you mean 'parameters'"),
    ],
)
def test_spec_errors_name_the_file_and_key_before_any_run(tmp_path, fields, message, monkeypatch):
    monkeypatch.setattr(sweep, "execute", lambda *a, **k: pytest.fail("a run started"))
    spec = write_spec(tmp_path / "bad.yaml", **fields)
    with pytest.raises(SweepError, match=message) as err:
        run_sweep(spec, tmp_path / "sweep")
    assert str(err.value).startswith(str(spec))
    assert not list((tmp_path / "sweep").glob("run-*"))


# ----------------------------------------------------------------------------- wandb's sweep server
def test_wandb_spec_translation(tmp_path):
    spec = load_spec(write_spec(
        tmp_path / "w.yaml", name="lr-sweep", method="bayes", run_cap=20, seed=3, description="lr and seed",
        overrides=["train.max_steps=2"], metric={"name": "metrics.accuracy", "goal": "maximize", "target": 0.9},
        early_terminate={"type": "hyperband", "min_iter": 3}, project="p", entity="e",
        parameters={"optim": {"parameters": {"lr": {"min": 1e-5, "max": 1e-3}, "schedule": {"values": ["cosine", "linear"]}}},
                    "train.seed": {"min": 0, "max": 3}, "train.epochs": {"value": 1.0}},
    ))  # fmt: skip
    assert sweep.wandb_sweep_config(spec) == {
        "name": "lr-sweep",
        "method": "bayes",
        "metric": {"name": "final/accuracy", "goal": "maximize", "target": 0.9},  # runs log summary.json's metrics as final/<key>
        "parameters": {
            "optim.lr": {"min": 1e-5, "max": 1e-3, "distribution": "uniform"},
            "optim.schedule": {"values": ["cosine", "linear"], "distribution": "categorical"},
            "train.seed": {"min": 0, "max": 3, "distribution": "int_uniform"},
            "train.epochs": {"value": 1.0, "distribution": "constant"},
        },
        "description": "lr and seed",
        "run_cap": 20,
        "early_terminate": {"type": "hyperband", "min_iter": 3},
    }
    assert sweep.sweep_project(spec) == "p"


def test_server_is_used_only_with_a_key_and_wandb_online(tmp_path, monkeypatch):
    spec = load_spec(write_spec(tmp_path / "s.yaml"))
    assert not sweep.use_server(spec)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not sweep.use_server(spec)  # the test env has WANDB_MODE=offline
    monkeypatch.delenv("WANDB_MODE")
    assert sweep.use_server(spec)
    assert not sweep.use_server(load_spec(write_spec(tmp_path / "s.yaml", overrides=["logging.wandb_mode=offline"])))
    assert not sweep.use_server(load_spec(write_spec(tmp_path / "s.yaml", overrides=["logging.wandb=false"])))


def test_server_path_runs_the_agents_picks_as_subprocesses(tmp_path, fake_job, monkeypatch):
    """A stand-in wandb: sweep() records the config, agent() hands two runs over the env the real agent sets."""
    calls: dict = {}

    def fake_sweep(config, entity=None, project=None):
        calls["sweep"] = (config, entity, project)
        return "sw123"

    def fake_agent(sweep_id, function, entity=None, project=None, count=None):
        calls["agent"] = (sweep_id, project, count)
        for run_id, seed in (("r1", 1), ("r2", 0)):
            param_path = tmp_path / f"config-{run_id}.yaml"
            param_path.write_text(yaml.safe_dump({"wandb_version": 1, "train.seed": {"value": seed}}))
            monkeypatch.setenv("WANDB_RUN_ID", run_id)
            monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(param_path))
            function()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(sweep=fake_sweep, agent=fake_agent))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE")
    out = tmp_path / "sweep"
    records = run_sweep(write_spec(tmp_path / "s.yaml", name="srv", run_cap=4), out, max_runs=2)

    assert calls["sweep"][0]["metric"] == {"name": "final/loss_final", "goal": "minimize"} and calls["sweep"][2] == "align"
    assert calls["agent"] == ("sw123", "align", 2)
    assert [(r.run, r.params, r.metric) for r in records] == [("run-r1", {"train.seed": 1}, 2.0), ("run-r2", {"train.seed": 0}, 1.0)]
    child = json.loads((out / "run-r1" / "summary.json").read_text())
    assert child["metrics"]["wandb_run"] == "r1"  # the child's wandb.init joins the agent's run
    assert child["sets"]["logging.wandb_mode"] == "online" and child["sets"]["logging.group"] == "srv"
    assert child["sets"]["logging.project"] == "align"
    assert [r["run"] for r in read_csv(out)] == ["run-r2", "run-r1"]
