"""End-to-end SFT runs: single process, 2-rank ZeRO-3, resume after SIGKILL, LoRA, local model paths."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import ALIGN, ROOT, run_env, tiny_overrides

QUICKSTART = str(ROOT / "configs" / "sft" / "quickstart.yaml")
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def align_sft(tmp_path: Path, overrides: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    cmd = ALIGN + ["sft", "--config", QUICKSTART] + [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=600, **kw)
    if check and proc.returncode:
        raise AssertionError(f"align sft failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_single_process_run_writes_summary_and_plain_model(tmp_path):
    out = tmp_path / "run"
    proc = align_sft(tmp_path, tiny_overrides(out, steps=8, **{"logging.wandb": True}))
    summary = json.loads((out / "summary.json").read_text())
    assert "task accuracy" in proc.stdout
    assert 0.0 <= summary["metrics"]["accuracy"] <= 1.0
    assert set(summary["metrics"]["accuracy_by_condition"]) == {"math", "concise", "harmless"}
    assert summary["steps"] == 8 and summary["tokens"] > 0 and summary["wall_s"] > 0
    assert (out / "config.yaml").exists() and "builtin:tiny" in (out / "config.yaml").read_text()
    assert list((out / "wandb").glob("offline-run-*")), "wandb should log offline into the run dir"
    series = losses(out)
    assert series[-1] < series[0]
    model = AutoModelForCausalLM.from_pretrained(summary["model_path"])  # plain transformers, no align code
    tok = AutoTokenizer.from_pretrained(summary["model_path"])
    assert model(**tok("1+1", return_tensors="pt")).logits.isfinite().all()


def test_two_rank_zero3_matches_one_process(tmp_path):
    steps = 4
    single = tmp_path / "one"
    align_sft(tmp_path, tiny_overrides(single, steps=steps, **{"eval.enabled": False}))
    double = tmp_path / "two"
    cmd = ACCELERATE + ["--num_processes", "2", "--config_file", str(ROOT / "configs/accelerate/zero3.yaml"), "--main_process_port", "0",
                        "-m", "align", "sft", "--config", QUICKSTART]
    cmd += [a for o in tiny_overrides(double, steps=steps) for a in ("--set", o)]
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((double / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["deepspeed"] is True
    torch.testing.assert_close(torch.tensor(losses(double)), torch.tensor(losses(single)), rtol=2e-4, atol=2e-4)
    reloaded = AutoModelForCausalLM.from_pretrained(summary["model_path"])
    reference = load_file(str(Path(json.loads((single / "summary.json").read_text())["model_path"]) / "model.safetensors"))
    for name, tensor in reloaded.state_dict().items():
        if name in reference:
            torch.testing.assert_close(tensor, reference[name], rtol=1e-3, atol=1e-4)


def test_two_ranks_see_their_own_shard_and_partitioned_params(tmp_path):
    out = tmp_path / "probe"
    out.mkdir()
    cmd = ACCELERATE + ["--num_processes", "2", "--config_file", str(ROOT / "configs/accelerate/zero3.yaml"), "--main_process_port", "0",
                        str(ROOT / "tests" / "dist_probe.py"), str(out), QUICKSTART] + tiny_overrides(tmp_path / "run", steps=2)
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [r["process_index"] for r in ranks] == [0, 1]
    assert all(r["num_processes"] == 2 and r["dist_world"] == 2 for r in ranks)
    assert not set(ranks[0]["rows_step0"]) & set(ranks[1]["rows_step0"])
    assert all(r["partitioned"] for r in ranks)
    assert ranks[0]["local_numel"] < ranks[0]["full_numel"] * 0.6
    assert all(r["frozen_partitioned"] and r["frozen_exact"] for r in ranks)


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    steps = 40
    extra = {"train.save_every": 4, "train.keep_last": 2, "eval.enabled": False}
    straight = tmp_path / "straight"
    align_sft(tmp_path, tiny_overrides(straight, steps=steps, **extra))

    killed = tmp_path / "killed"
    cmd = ALIGN + ["sft", "--config", QUICKSTART] + [a for o in tiny_overrides(killed, steps=steps, **extra) for a in ("--set", o)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "step-00000008").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    resumed = align_sft(tmp_path, tiny_overrides(killed, steps=steps, **extra))
    assert "resumed from" in resumed.stdout
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert len(kept) <= 2 and not [k for k in kept if k.endswith(".tmp")]
    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_lora_changes_only_adapters_and_merged_export_loads(tmp_path):
    out = tmp_path / "lora"
    align_sft(tmp_path, tiny_overrides(out, steps=4, **{"model.lora.enabled": True, "model.lora.r": 4, "optim.lr": 0.05, "eval.enabled": False}))
    from align.config import ModelConfig
    from align.engine.models import load_causal_lm, load_tokenizer

    cfg = ModelConfig(name_or_path="builtin:tiny")
    base = load_causal_lm(cfg, load_tokenizer(cfg), torch.float32, seed=0).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed, "LoRA training should change the merged attention projections"
    assert all(any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)


def test_local_model_path_and_eval_command(tmp_path):
    from align.config import ModelConfig
    from align.engine.models import load_causal_lm, load_tokenizer

    cfg = ModelConfig(name_or_path="builtin:tiny")
    tok = load_tokenizer(cfg)
    local = tmp_path / "local-model"
    load_causal_lm(cfg, tok, torch.float32, seed=3).save_pretrained(local)
    tok.save_pretrained(local)
    out = tmp_path / "from-local"
    align_sft(tmp_path, tiny_overrides(out, steps=2, **{"model.name_or_path": str(local), "eval.enabled": False}))
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    proc = subprocess.run(ALIGN + ["eval", "--model", str(out / "model"), "--set", "eval.num_prompts=6", "--set", "eval.max_new_tokens=4",
                                   "--set", f"output_dir={tmp_path / 'ev'}"],
                          cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["num_prompts"] == 6 and "accuracy_by_condition" in result


def test_config_error_exits_cleanly(tmp_path):
    proc = align_sft(tmp_path, ["optim.lrr=1"], check=False)
    assert proc.returncode == 2
    assert "unknown key 'optim.lrr'" in proc.stderr and "did you mean 'optim.lr'" in proc.stderr


@pytest.mark.parametrize("bad_steps", [{2, 3}])
def test_non_finite_guard_skips_and_stops(tmp_path, bad_steps, monkeypatch):
    from align.config import SFTRecipe, load_recipe
    from align.engine.core import Engine
    from align.engine.loop import NonFiniteLossError, fit
    from align.trainers.sft import SFTTrainer

    calls = {"n": 0}

    class Flaky(SFTTrainer):
        poison: set[int] = set()

        def loss(self, model, batch, totals):
            calls["n"] += 1
            loss, metrics = super().loss(model, batch, totals)
            step = (calls["n"] - 1) // 2 + 1  # 2 micro-batches per step
            return (loss * float("nan") if step in self.poison else loss), metrics

    def make(out: Path, poison: set[int], steps: int):
        calls["n"] = 0
        recipe = load_recipe(SFTRecipe, QUICKSTART, tiny_overrides(out, steps=steps, **{"eval.enabled": False, "train.save_every": 1}))
        engine = Engine.create(recipe)
        trainer = Flaky(recipe, engine)
        trainer.poison = poison
        trainer.setup()
        return engine, trainer

    engine, trainer = make(tmp_path / "a", bad_steps, 5)
    result = fit(engine, trainer)
    result["logger"].close()
    assert result["state"].skipped_steps == 2 and result["state"].step == 5
    assert all(p.isfinite().all() for p in trainer.model.parameters())

    engine, trainer = make(tmp_path / "b", {2, 3, 4}, 6)
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row"):
        fit(engine, trainer)
    saved = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert saved == ["step-00000001"]  # nothing was written once the loss went bad


def test_gradient_checkpointing_trains_identically(tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "gc"
    align_sft(tmp_path, tiny_overrides(plain, steps=3, **{"eval.enabled": False}))
    align_sft(tmp_path, tiny_overrides(checkpointed, steps=3, **{"eval.enabled": False, "model.gradient_checkpointing": True}))
    torch.testing.assert_close(torch.tensor(losses(checkpointed)), torch.tensor(losses(plain)), rtol=1e-5, atol=1e-5)


GUARD_SCRIPT = """
import json, sys
import torch
from align.config import SFTRecipe, load_recipe
from align.engine.core import Engine
from align.engine.loop import fit
from align.trainers.sft import SFTTrainer

calls = {"n": 0}

class Flaky(SFTTrainer):
    def loss(self, model, batch, totals):
        calls["n"] += 1
        loss, metrics = super().loss(model, batch, totals)
        step = (calls["n"] - 1) // 2 + 1  # 2 micro-batches per rank per step
        return (loss * float("nan") if step == 2 and self.engine.rank == 1 else loss), metrics

recipe = load_recipe(SFTRecipe, sys.argv[1], sys.argv[3:])
engine = Engine.create(recipe)
trainer = Flaky(recipe, engine)
trainer.setup()
result = fit(engine, trainer)
result["logger"].close()
params = [p for p in trainer.model.parameters()]
import deepspeed
with deepspeed.zero.GatheredParameters(params):
    finite = all(bool(torch.isfinite(p).all()) for p in params)
out = {"rank": engine.rank, "skipped": result["state"].skipped_steps, "steps": result["state"].step, "finite": finite}
print("RESULT " + json.dumps(out), flush=True)
"""


def test_zero3_two_ranks_skip_a_step_poisoned_on_one_rank(tmp_path):
    """Under ZeRO-3 a NaN loss on one rank is backpropagated (its gradients are reduced into every rank's partition), then
    the one per-step reduction makes both ranks discard that step; the next steps train on clean, finite weights."""
    script = tmp_path / "guard.py"
    script.write_text(GUARD_SCRIPT)
    overrides = tiny_overrides(tmp_path / "run", steps=4, **{"eval.enabled": False, "train.global_batch_size": 8})
    cmd = ACCELERATE + ["--num_processes", "2", "--config_file", str(ROOT / "configs" / "accelerate" / "zero3.yaml"),
                        "--main_process_port", "0", str(script), QUICKSTART, "--"] + overrides  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the two ranks print to one pipe: their lines may interleave, so each flat {...} after RESULT is read on its own
    results = sorted((json.loads(m) for m in re.findall(r"RESULT (\{[^{}]*\})", proc.stdout)), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["skipped"] == 1 and r["steps"] == 4 and r["finite"] for r in results), results
    series = losses(tmp_path / "run")
    assert len(series) == 3 and all(map(torch.isfinite, torch.tensor(series)))
