"""Trainers that draw samples through the shared rollout buffer: MPO's sampled pairs, online MPO, rejection-sampling SFT."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from align.config import ConfigError, MPORecipe, SFTRecipe, load_recipe
from align.rollout.buffer import RolloutBuffer
from tests.conftest import ALIGN, ROOT, ScriptedGenerator, run_env

MPO_QUICKSTART = ROOT / "configs" / "mpo" / "quickstart.yaml"
MPO_ONLINE = ROOT / "configs" / "mpo" / "online.yaml"
SFT_REJECTION = ROOT / "configs" / "sft" / "rejection_sampling.yaml"


def half_right(i: int) -> list[str]:
    """Even prompts: one right, two wrong, one right but cut off. Odd prompts: nothing right."""
    return ["right", "wrong", "wrong", "right-cut"] if i % 2 == 0 else ["wrong"] * 4


def scripted(monkeypatch, tokenizer, recipe_sampling, synthetic) -> ScriptedGenerator:
    """Route the trainers' sampling through a ScriptedGenerator over the prompts they will load."""
    import align.trainers.policy_samples as policy_samples
    from align.evaluation import load_prompts

    problems = load_prompts(recipe_sampling.prompts_path, synthetic, recipe_sampling.num_prompts, split="train")
    generator = ScriptedGenerator(tokenizer, problems, half_right)
    monkeypatch.setattr(policy_samples, "make_generator", lambda *args, **kwargs: generator)
    return generator


def pair_key(row: dict) -> tuple:
    return (row["prompt_id"], row["builder"], row["chosen"], row["rejected"])


def test_mpo_sampled_pairs_are_the_saved_buffers_preference_pairs(tmp_path, sft_checkpoint, tokenizer, monkeypatch):
    from align.engine.core import Engine
    from align.trainers.mpo import MPOTrainer

    run = tmp_path / "run"
    recipe = load_recipe(MPORecipe, MPO_QUICKSTART, [
        f"output_dir={run}", f"model.name_or_path={sft_checkpoint}", "mpo.sampled_pairs.num_prompts=8",
        "mpo.sampled_pairs.samples_per_prompt=4", "mpo.sampled_pairs.max_pairs_per_prompt=2", "mpo.sampled_pairs.dropout_ntp_share=1.0",
        "data.synthetic.eval_rows=6", "eval.enabled=false", "logging.wandb=false", "mpo.reference=model"])  # fmt: skip
    generator = scripted(monkeypatch, tokenizer, recipe.mpo.sampled_pairs, recipe.data.synthetic)
    trainer = MPOTrainer(recipe, Engine.create(recipe))
    trainer.setup()

    saved = RolloutBuffer.load(run, "rollouts-rank0")  # round trip: the buffer on disk rebuilds exactly what was trained on
    assert [r.episode_fields() for r in saved] == [r.episode_fields() for r in trainer.buffer]
    assert len(saved) == 32 and {r.round for r in saved} == {0}
    assert [(r.correct, r.truncated) for r in saved[:4]] == [(True, False), (False, False), (False, False), (True, True)]
    assert all(r.reward_parts == {"task": float(r.correct)} for r in saved)  # verifier only: no reward model in the route
    correctness = [r for r in trainer.sampled_rows if r["builder"] == "correctness"]
    assert correctness == sorted(saved.preference_pairs(2, seed=recipe.train.seed), key=pair_key)
    assert len(correctness) == 8  # even prompts: two distinct right answers (one cut off) against one wrong one
    assert generator.calls == 2  # the samples, then the Dropout-NTP continuations on the same weights
    stats = trainer.data_stats["sampled_pairs"]
    assert stats == {"round": 0, "samples": 32, "correct_share": 0.25, "truncated_share": 0.125, "pairs": 12,
                     "by_builder": {"correctness": 8, "dropout_ntp": 4}}  # fmt: skip
    assert len(trainer.pairs) == 12 and trainer.data_stats["train_pairs"] == 12  # data.train is []: only the sampled pairs


def online_args(out: Path, model: Path) -> list[str]:
    sets = {"output_dir": out, "model.name_or_path": model, "data.train": "[{path: synthetic}]", "data.synthetic.train_rows": 16,
            "data.synthetic.eval_rows": 8, "train.max_steps": 2, "train.micro_batch_size": 2, "train.global_batch_size": 4,
            "train.log_every": 1, "optim.lr": 1e-3, "optim.warmup_steps": 0, "mpo.sampled_pairs.num_prompts": 4,
            "mpo.sampled_pairs.samples_per_prompt": 2, "mpo.sampled_pairs.max_new_tokens": 8, "eval.num_prompts": 4,
            "eval.max_new_tokens": 8, "mpo.cache_dir": out.parent / "ref-cache", "logging.progress": "false", "logging.wandb": "false"}  # fmt: skip
    return ["mpo", "--config", str(MPO_ONLINE)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def align_cli(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(ALIGN + args, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def first_record(run_dir: Path) -> dict:
    return next(r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r)


def test_online_mpo_chains_rounds_and_a_rerun_skips_finished_ones(tmp_path, sft_checkpoint):
    out = tmp_path / "online"
    align_cli(tmp_path, online_args(out, sft_checkpoint))
    rounds = [json.loads((out / f"round-{k}" / "summary.json").read_text()) for k in (0, 1)]
    top = json.loads((out / "summary.json").read_text())
    second = load_recipe(MPORecipe, out / "round-1" / "config.yaml")
    assert second.model.name_or_path == str(out / "round-0" / "model")  # round 1 samples from and trains round 0's export
    assert second.mpo.reference_path == str(sft_checkpoint) and second.mpo.sampled_pairs.round_index == 1
    assert first_record(out / "round-0")["rewards/margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert abs(first_record(out / "round-1")["rewards/margin"]) > 1e-4  # round 0 moved the policy; the reference stayed put
    assert rounds[1]["metrics"]["accuracy_before"] == rounds[0]["metrics"]["accuracy_after"]  # greedy eval of the same weights
    assert {r.round for r in RolloutBuffer.load(out / "round-1", "rollouts-rank0")} == {1}
    assert top["metrics"]["accuracy_before"] == rounds[0]["metrics"]["accuracy_before"]
    assert top["metrics"]["accuracy_after"] == rounds[1]["metrics"]["accuracy_after"]
    assert top["model_path"] == rounds[1]["model_path"] == str((out / "round-1" / "model").resolve())
    assert [r["round"] for r in top["rounds"]] == [0, 1] and top["steps"] == 4 and not any(r["skipped"] for r in top["rounds"])

    before = [(out / f"round-{k}" / "summary.json").read_bytes() for k in (0, 1)]
    rerun = align_cli(tmp_path, online_args(out, sft_checkpoint))
    assert rerun.stdout.count("finished earlier, skipped") == 2
    assert [(out / f"round-{k}" / "summary.json").read_bytes() for k in (0, 1)] == before
    assert all(r["skipped"] for r in json.loads((out / "summary.json").read_text())["rounds"])


def test_rejection_sampling_sft_trains_on_exactly_the_best_of_n_rows(tmp_path, sft_checkpoint, tokenizer, monkeypatch):
    from align.engine.core import Engine
    from align.trainers.sft import SFTTrainer

    run = tmp_path / "rs"
    recipe = load_recipe(SFTRecipe, SFT_REJECTION, [
        f"output_dir={run}", f"model.name_or_path={sft_checkpoint}", "rejection_sampling.num_prompts=8",
        "rejection_sampling.samples_per_prompt=4", "eval.enabled=false", "logging.wandb=false"])  # fmt: skip
    scripted(monkeypatch, tokenizer, recipe.rejection_sampling, recipe.data.synthetic)
    trainer = SFTTrainer(recipe, Engine.create(recipe))
    trainer.setup()

    saved = RolloutBuffer.load(run, "rollouts-rank0")
    kept = saved.best_of_n(require_correct=True)
    assert trainer.sampled_rows == sorted(kept, key=lambda r: json.dumps(r, sort_keys=True))
    assert len(kept) == 4  # odd prompts have no right answer; the cut-off right answers never count
    for row in kept:  # each kept answer is a right, complete sample of its own prompt
        source = [r for r in saved if r.prompt == row["messages"][:-1] and r.response == row["messages"][-1]["content"]]
        assert len(source) == 1 and source[0].correct and not source[0].truncated
    assert trainer.data_stats["rejection_sampling"] == {"distinct_prompts": 8, "samples": 32, "correct_share": 0.25, "truncated_share": 0.125,
                                                        "kept_rows": 4, "require_correct": True}  # fmt: skip
    assert len(trainer.samples) == 4 and trainer.data_stats["train"]["kept"] == 4  # data.train is []: only the kept rows
    assert all(s.origin.startswith("rejection-sampling:") for s in trainer.samples)
    answers = [tokenizer.decode([t for t, m in zip(s.input_ids, s.loss_mask) if m], skip_special_tokens=True) for s in trainer.samples]
    assert sorted(a.strip() for a in answers) == sorted(r["messages"][-1]["content"] for r in kept)  # the loss is on the kept answers


def test_new_recipes_load_and_online_settings_are_checked(tmp_path, capsys):
    from align.cli import main
    from align.trainers.online_mpo import check_online

    online = load_recipe(MPORecipe, MPO_ONLINE)
    assert online.mpo.sampled_pairs.rounds == 2 and online.mpo.sampled_pairs.enabled and not online.mpo.sampled_pairs.update_reference
    assert load_recipe(MPORecipe, MPO_QUICKSTART).mpo.sampled_pairs.rounds == 1  # the quickstart stays one offline job
    rs = load_recipe(SFTRecipe, SFT_REJECTION)
    assert rs.rejection_sampling.enabled and rs.rejection_sampling.require_correct and rs.data.train == []
    assert rs.model.name_or_path == "runs/sft-quickstart/model" and not load_recipe(SFTRecipe, None).rejection_sampling.enabled
    with pytest.raises(ConfigError, match="did you mean 'mpo.sampled_pairs.rounds'"):
        load_recipe(MPORecipe, MPO_ONLINE, ["mpo.sampled_pairs.round=3"])
    with pytest.raises(ConfigError, match="rejection_sampling.require_correct: expected bool"):
        load_recipe(SFTRecipe, SFT_REJECTION, ["rejection_sampling.require_correct=maybe"])
    with pytest.raises(ConfigError, match="needs mpo.sampled_pairs.enabled=true"):
        check_online(load_recipe(MPORecipe, MPO_ONLINE, ["mpo.sampled_pairs.enabled=false"]))
    with pytest.raises(ConfigError, match="update_reference=true"):
        check_online(load_recipe(MPORecipe, MPO_ONLINE, ["mpo.reference=adapters", "model.lora.enabled=true"]))
    args = ["mpo", "--config", str(MPO_ONLINE), "--set", "mpo.sampled_pairs.enabled=false", "--set", f"output_dir={tmp_path / 'x'}"]
    assert main(args) == 2
    assert "align: config error:" in capsys.readouterr().err and not (tmp_path / "x").exists()  # refused before any round starts
