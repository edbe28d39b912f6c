"""`align pipeline`: stages chained through their outputs, skipped when unchanged, stopped cleanly on failure."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from align.config import ConfigError
from align.pipeline import format_table, load_pipeline
from tests.conftest import ALIGN, ROOT, run_env

TINY_SFT = ["model.name_or_path=builtin:tiny", "data.synthetic.train_rows=64", "data.synthetic.eval_rows=8", "train.max_steps=2",
            "train.micro_batch_size=2", "train.global_batch_size=4", "eval.num_prompts=6", "eval.max_new_tokens=4",
            "logging.progress=false", "logging.wandb=false"]  # fmt: skip
TINY_RM = ["data.synthetic.train_rows=32", "data.synthetic.eval_rows=12", "train.max_steps=2", "train.micro_batch_size=2",
           "train.global_batch_size=4", "logging.progress=false", "logging.wandb=false"]  # fmt: skip


def write_pipeline(tmp_path: Path, rm_extra: list[str] | None = None) -> Path:
    spec = {
        "output_dir": str(tmp_path / "pipe"),
        "stages": [
            {"name": "sft", "command": "sft", "config": "configs/sft/quickstart.yaml", "set": TINY_SFT},
            {"name": "rm", "command": "rm", "config": "configs/rm/quickstart.yaml", "set": ["model.name_or_path={sft.model}", *TINY_RM, *(rm_extra or [])]},
        ],
    }  # fmt: skip
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def align_pipeline(tmp_path: Path, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(ALIGN + ["pipeline", str(path)], cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=600)


def test_stages_feed_each_other_skip_when_unchanged_and_rerun_when_changed(tmp_path):
    path = write_pipeline(tmp_path)
    first = align_pipeline(tmp_path, path)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "pipe" / "pipeline_summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["sft", "rm"] and not any(s["skipped"] for s in summary["stages"])
    assert all(s["wall_s"] > 0 and s["metrics"] for s in summary["stages"])
    rm_config = yaml.safe_load((tmp_path / "pipe" / "rm" / "config.yaml").read_text())
    assert rm_config["model"]["name_or_path"] == summary["stages"][0]["model_path"]  # the RM started from the SFT export
    assert "stage" in first.stdout and "pairwise" in first.stdout and "task" in first.stdout  # the table

    second = align_pipeline(tmp_path, path)
    assert second.returncode == 0 and second.stdout.count("unchanged, skipped") == 2
    assert [s["skipped"] for s in json.loads((tmp_path / "pipe" / "pipeline_summary.json").read_text())["stages"]] == [True, True]

    changed = align_pipeline(tmp_path, write_pipeline(tmp_path, ["optim.lr=0.002"]))
    assert changed.returncode == 0 and changed.stdout.count("unchanged, skipped") == 1  # sft kept, rm re-run

    failed = align_pipeline(tmp_path, write_pipeline(tmp_path, ["data.train=[{path: missing.jsonl}]"]))
    assert failed.returncode == 1
    assert "stage 'rm' (rm) failed" in failed.stderr and "stage.log" in failed.stderr
    assert (tmp_path / "pipe" / "sft" / "model" / "model.safetensors").exists()  # earlier outputs intact
    assert not (tmp_path / "pipe" / "rm" / "pipeline_stage.json").exists()  # the failed stage will run again


def test_pipeline_file_errors_name_the_stage(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stages": [{"name": "rm", "command": "rm", "config": "c.yaml", "set": ["model.name_or_path={sft.model}"]}]}))
    with pytest.raises(ConfigError, match=r"stages\[0\].*refers to no earlier stage"):
        load_pipeline(bad)
    bad.write_text(yaml.safe_dump({"stages": [{"name": "x", "command": "ppo", "config": "c.yaml"}]}))
    with pytest.raises(ConfigError, match="command 'ppo' is not one of"):
        load_pipeline(bad)
    quick = load_pipeline(ROOT / "configs" / "pipelines" / "quickstart.yaml")
    assert [s.name for s in quick.stages] == ["sft", "rm", "mpo", "rlhf"]


def test_table_shows_before_and_after():
    table = format_table([{"name": "rlhf", "command": "rlhf", "wall_s": 12.0, "metrics": {
        "accuracy_before": 0.5, "accuracy_after": 0.75, "accuracy_by_condition": {"math": 0.75}, "accuracy_by_condition_before": {"math": 0.5},
        "reward_before": 1.0, "reward_after": 2.0, "kl": 0.1}}])  # fmt: skip
    assert "task 50.0%→75.0%" in table and "math 50.0%→75.0%" in table and "1.000→2.000" in table and "0.100" in table


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_pipelines_and_their_stage_recipes_validate(path, tmp_path):
    """Every stage's recipe, with its `--set` items (earlier stages' outputs filled by a placeholder path), loads."""
    from align.config import RECIPES, load_recipe
    from align.pipeline import load_pipeline, resolve_overrides

    pipeline = load_pipeline(path)
    outputs = {s.name: {"model_path": str(tmp_path / s.name / "model"), "_dir": str(tmp_path / s.name)} for s in pipeline.stages}
    for stage in pipeline.stages:
        recipe = load_recipe(RECIPES[stage.command], ROOT / stage.config, resolve_overrides(stage, outputs, tmp_path / stage.name))
        assert recipe.output_dir == str(tmp_path / stage.name)
