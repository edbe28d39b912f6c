"""Resume and reproducibility: one recipe fingerprint, finished runs, fresh starts, reused samples, wandb ids, reference dtype, EOS ids."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from align.config import MPORecipe, RLHFRecipe, SFTRecipe, load_recipe, save_resolved
from align.run_state import POLICY_ROWS, SUMMARY, RecipeChanged, check_run_dir, recipe_fingerprint, start_over
from tests.conftest import ALIGN, ROOT, ScriptedGenerator, run_env, tiny_overrides

SFT_QUICKSTART = ROOT / "configs" / "sft" / "quickstart.yaml"


def sft(*overrides: str) -> SFTRecipe:
    return load_recipe(SFTRecipe, None, list(overrides))


# ----------------------------------------------------------------------------- the fingerprint
def test_fingerprint_counts_what_is_trained_not_where_or_how_it_is_logged():
    base = recipe_fingerprint(sft())
    same = ["output_dir=x", "logging.wandb=false", "logging.project=p", "train.resume=false", "train.save_every=3", "train.keep_last=9",
            "train.log_every=2", "train.eval_every=5", "train.max_bad_steps=7"]  # fmt: skip
    assert all(recipe_fingerprint(sft(o)) == base for o in same)
    changed = ["optim.lr=0.001", "train.seed=1", "model.dtype=bfloat16", "data.train=[{path: a.jsonl}]", "train.max_steps=3"]
    assert len({recipe_fingerprint(sft(o)) for o in changed} | {base}) == len(changed) + 1
    assert recipe_fingerprint(load_recipe(MPORecipe, None, ["mpo.cache_dir=elsewhere"])) == recipe_fingerprint(MPORecipe())
    assert recipe_fingerprint(MPORecipe()) != recipe_fingerprint(RLHFRecipe())


# ----------------------------------------------------------------------------- finished runs and fresh starts
def finish(run_dir: Path, recipe, fingerprint: bool = True) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(recipe, run_dir / "config.yaml")
    summary = {"job": "sft", "metrics": {}, "steps": 2} | ({"recipe_fingerprint": recipe_fingerprint(recipe)} if fingerprint else {})
    (run_dir / SUMMARY).write_text(json.dumps(summary))
    return summary


def test_a_finished_run_is_reported_once_and_another_recipe_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    summary = finish(run, sft(f"output_dir={run}"))
    assert check_run_dir(sft(f"output_dir={run}", "logging.wandb=false")) == summary
    assert capsys.readouterr().out.count("already finished this recipe") == 1
    with pytest.raises(RecipeChanged, match=r"finished run of another recipe \(optim.lr 0.0001 → 0.002\).*train.resume=false"):
        check_run_dir(sft(f"output_dir={run}", "optim.lr=0.002"))
    assert check_run_dir(sft(f"output_dir={run}", "train.resume=false")) is None  # asked to train again
    assert check_run_dir(sft(f"output_dir={run}", "optim.lr=0.002", "train.resume=force")) is None
    legacy = tmp_path / "legacy"  # summary.json from before the fingerprint: its config.yaml (older than the summary) tells
    assert check_run_dir(sft(f"output_dir={legacy}"), is_main=False) is None
    finish(legacy, sft(f"output_dir={legacy}"), fingerprint=False)
    assert check_run_dir(sft(f"output_dir={legacy}"), is_main=False)["steps"] == 2


def test_a_checkpoint_of_another_recipe_is_refused_before_setup(tmp_path):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text(json.dumps({"fingerprint": "old", "recipe": {"optim.lr": 0.01}, "files": {}}))
    with pytest.raises(RecipeChanged, match=r"step-00000004 was written by another recipe \(optim.lr 0.01 → 0.0001\)"):
        check_run_dir(sft(f"output_dir={run}"))
    assert check_run_dir(sft(f"output_dir={run}", "train.resume=force")) is None


def test_starting_over_removes_the_previous_runs_state_only(tmp_path, capsys):
    for name in ("checkpoints/step-00000002", "model", "wandb"):
        (tmp_path / name).mkdir(parents=True)
    for name in (SUMMARY, "metrics.jsonl", "wandb_run_id", POLICY_ROWS, "config.yaml", "quarantine.jsonl"):
        (tmp_path / name).write_text("{}")
    assert start_over(tmp_path) == ["checkpoints", SUMMARY, "metrics.jsonl", "wandb_run_id", POLICY_ROWS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "model", "quarantine.jsonl", "wandb"]
    assert "starting over" in capsys.readouterr().out


def align_sft(tmp_path: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    cmd = ALIGN + ["sft", "--config", str(SFT_QUICKSTART)] + [a for o in overrides for a in ("--set", o)]
    return subprocess.run(cmd, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=600)


def test_rerunning_a_finished_command_does_not_train_again(tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(out, steps=2, **{"eval.enabled": False, "data.synthetic.train_rows": 32, "data.synthetic.eval_rows": 8})
    assert align_sft(tmp_path, args).returncode == 0
    summary, weights = (out / SUMMARY).read_bytes(), (out / "model" / "model.safetensors").stat().st_mtime_ns
    assert json.loads(summary)["recipe_fingerprint"] == recipe_fingerprint(load_recipe(SFTRecipe, SFT_QUICKSTART, args))
    again = align_sft(tmp_path, args)
    assert again.returncode == 0 and "already finished this recipe" in again.stdout and "[sft] 2 steps" in again.stdout
    assert (out / SUMMARY).read_bytes() == summary and (out / "model" / "model.safetensors").stat().st_mtime_ns == weights
    changed = align_sft(tmp_path, args + ["optim.lr=0.002"])
    assert changed.returncode == 2 and "holds a finished run of another recipe (optim.lr 0.003 → 0.002)" in changed.stderr
    assert "Traceback" not in changed.stderr
    fresh = align_sft(tmp_path, args + ["optim.lr=0.002", "train.resume=false"])
    assert fresh.returncode == 0 and "starting over" in fresh.stdout
    assert json.loads((out / SUMMARY).read_text())["recipe_fingerprint"] != json.loads(summary)["recipe_fingerprint"]


def test_a_finished_rlhf_run_returns_its_summary_without_setup(tmp_path):
    from align.trainers.rlhf import RLHFTrainer

    run = tmp_path / "rlhf"
    overrides = [f"output_dir={run}", "ppo.reward_model=missing-rm", "model.name_or_path=missing-policy", "logging.wandb=false",
                 "ppo.prompts_per_iteration=4", "train.micro_batch_size=2"]  # fmt: skip
    trainer = RLHFTrainer(load_recipe(RLHFRecipe, None, overrides))
    summary = finish(run, trainer.recipe)  # the recipe as the trainer resolved it (batch fields)
    assert trainer.run() == summary  # setup would fail on the missing model paths


# ----------------------------------------------------------------------------- the pipeline starts a changed stage clean
def test_pipeline_skips_unchanged_resumes_interrupted_and_starts_changed_stages_clean(tmp_path):
    from align.pipeline import STAGE_FILE, Stage, fingerprint, legacy_fingerprint, stage_plan

    stage, d = Stage("sft", "sft", str(SFT_QUICKSTART)), tmp_path / "sft"
    sets = [f"output_dir={d}"]
    digest = fingerprint(stage, sets)
    d.mkdir()
    assert stage_plan(stage, sets, d, False) == (False, False, digest)  # never ran
    (d / STAGE_FILE).write_text(json.dumps({"fingerprint": digest}))
    (d / SUMMARY).write_text(json.dumps({"recipe_fingerprint": digest}))
    assert stage_plan(stage, sets, d, False)[:2] == (True, False)
    assert stage_plan(stage, sets, d, True)[:2] == (False, True)  # an earlier stage re-ran: new inputs behind the same path
    assert stage_plan(stage, [*sets, "optim.lr=0.002"], d, False)[:2] == (False, True)
    (d / STAGE_FILE).write_text(json.dumps({"fingerprint": legacy_fingerprint(stage, sets)}))  # written by older align
    assert stage_plan(stage, sets, d, False)[:2] == (True, False)
    (d / STAGE_FILE).unlink()
    (d / SUMMARY).unlink()
    step = d / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text(json.dumps({"fingerprint": digest}))
    assert stage_plan(stage, sets, d, False)[:2] == (False, False)  # interrupted, unchanged: resume
    assert stage_plan(stage, [*sets, "optim.lr=0.002"], d, False)[:2] == (False, True)


# ----------------------------------------------------------------------------- wandb
def test_a_resumed_run_continues_its_wandb_run(tmp_path):
    from align.config import LoggingConfig
    from align.engine.logger import RunLogger

    run = tmp_path / "run"
    run.mkdir()
    cfg = LoggingConfig(wandb=True, wandb_mode="offline", progress=False)
    ids = []
    for step in (1, 2):  # a start, then a resumed start of the same run dir
        logger = RunLogger(cfg, run, {"optim.lr": 1e-4}, 2, True, "sft")
        logger.log(step, {"loss": 1.0 / step})
        ids.append(logger.run.id)
        logger.close()
    assert ids[0] == ids[1] == (run / "wandb_run_id").read_text().strip()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(f"-{ids[0]}" in p.name for p in offline)  # `wandb sync` merges them into one run


# ----------------------------------------------------------------------------- policy samples are read back, not drawn again
def _scripted(monkeypatch, tokenizer, sampling, synthetic, script) -> ScriptedGenerator:
    import align.trainers.policy_samples as policy_samples
    from align.evaluation import load_prompts

    generator = ScriptedGenerator(tokenizer, load_prompts(sampling.prompts_path, synthetic, sampling.num_prompts, split="train"), script)
    monkeypatch.setattr(policy_samples, "make_generator", lambda *args, **kwargs: generator)
    return generator


def _first_draw(i: int) -> list[str]:
    return ["right", "wrong", "wrong", "right-cut"] if i % 2 == 0 else ["wrong"] * 4


def _other_draw(i: int) -> list[str]:  # what other hardware might sample: another outcome for every prompt
    return ["wrong", "right", "right-cut", "wrong"] if i % 2 else ["wrong"] * 4


@pytest.mark.parametrize("job", ["mpo", "sft"])
def test_a_resumed_start_trains_on_the_rows_it_sampled_first(tmp_path, sft_checkpoint, tokenizer, monkeypatch, capsys, job):
    from align.engine.core import Engine
    from align.trainers.mpo import MPOTrainer
    from align.trainers.sft import SFTTrainer

    run = tmp_path / "run"
    if job == "mpo":
        recipe = load_recipe(MPORecipe, ROOT / "configs" / "mpo" / "quickstart.yaml", [
            f"output_dir={run}", f"model.name_or_path={sft_checkpoint}", "mpo.sampled_pairs.num_prompts=8",
            "mpo.sampled_pairs.samples_per_prompt=4", "mpo.sampled_pairs.dropout_ntp_share=1.0", "data.synthetic.eval_rows=6",
            "eval.enabled=false", "logging.wandb=false", "mpo.reference=model"])  # fmt: skip
        trainer_cls, sampling, stats = MPOTrainer, recipe.mpo.sampled_pairs, "sampled_pairs"
    else:
        recipe = load_recipe(SFTRecipe, ROOT / "configs" / "sft" / "rejection_sampling.yaml", [
            f"output_dir={run}", f"model.name_or_path={sft_checkpoint}", "rejection_sampling.num_prompts=8",
            "rejection_sampling.samples_per_prompt=4", "eval.enabled=false", "logging.wandb=false"])  # fmt: skip
        trainer_cls, sampling, stats = SFTTrainer, recipe.rejection_sampling, "rejection_sampling"
    _scripted(monkeypatch, tokenizer, sampling, recipe.data.synthetic, _first_draw)
    first = trainer_cls(recipe, Engine.create(recipe))
    first.setup()
    assert first.sampled_rows

    other = _scripted(monkeypatch, tokenizer, sampling, recipe.data.synthetic, _other_draw)
    resumed = trainer_cls(recipe, Engine.create(recipe))
    resumed.setup()
    assert other.calls == 0 and "not sampling again" in capsys.readouterr().out
    assert resumed.sampled_rows == first.sampled_rows and resumed.data_stats[stats] == first.data_stats[stats]
    assert resumed.train_rows == first.train_rows and resumed.buffer is None and (run / POLICY_ROWS).exists()

    changed = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, seed=1))  # another recipe samples anew
    fresh = trainer_cls(changed, Engine.create(changed))
    fresh.setup()
    assert other.calls >= 1 and fresh.sampled_rows != first.sampled_rows


# ----------------------------------------------------------------------------- MPO's reference: compute dtype, keyed by what was resolved
def test_reference_cache_key_follows_the_resolved_dtype_and_attention(monkeypatch):
    from align.config import ModelConfig
    from align.trainers.reference_cache import ReferenceCache, model_identity

    cfg = ModelConfig(name_or_path="builtin:tiny")  # dtype and attention: auto
    on_cpu = ReferenceCache("cache", cfg, 0).path_for({"train": []})
    assert model_identity(cfg, 0)["dtype"] == "torch.float32" and model_identity(cfg, 0)["attention"] == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the same recipe on a GPU machine (with bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert model_identity(cfg, 0)["dtype"] == "torch.bfloat16"
    assert ReferenceCache("cache", cfg, 0).path_for({"train": []}) != on_cpu
    pinned = ModelConfig(name_or_path="builtin:tiny", dtype="float32", attn_implementation="sdpa")
    assert ReferenceCache("cache", pinned, 0).path_for({"train": []}) == on_cpu  # resolved alike: the same cache


def test_mpo_reference_loads_in_the_compute_dtype(tokenizer):
    from types import SimpleNamespace

    from align.trainers.mpo import MPOTrainer

    recipe = load_recipe(MPORecipe, None, ["model.name_or_path=builtin:tiny"])
    trainer = MPOTrainer(recipe, SimpleNamespace(dtype=torch.bfloat16))
    trainer.tokenizer = tokenizer
    trainer.model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))  # the policy the reference follows
    reference = trainer._load_reference()
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- several EOS ids
def test_every_eos_id_of_the_model_ends_generation_and_counts_as_complete(tmp_path, tokenizer):
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.config import ModelConfig
    from align.engine.models import load_causal_lm
    from align.rollout.generation import HFGenerator, SamplingParams

    im_end, endoftext = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert im_end != endoftext
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[im_end, endoftext],
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "qwen-style")  # generation_config.json: eos_token_id [im_end, endoftext]
    model = load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "qwen-style")), tokenizer, torch.float32).eval()
    assert model.generation_config.eos_token_id == [im_end, endoftext]

    bias = torch.nn.functional.one_hot(torch.tensor(endoftext), len(tokenizer)).float() * 10
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)  # always prefers the second EOS
    out = HFGenerator(model, tokenizer, Accelerator(cpu=True)).generate(
        [[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=5)
    )
    g = out[0][0]
    assert g.response_ids == [endoftext] and not g.truncated


def test_config_file_round_trip_keeps_resume_force(tmp_path):
    recipe = sft("train.resume=force")
    save_resolved(recipe, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["resume"] == "force"
    assert load_recipe(SFTRecipe, tmp_path / "config.yaml").train.resume == "force"
