"""`align rm` end to end: from a local SFT-style checkpoint, 2-rank ZeRO-3, recipes, missing-checkpoint hint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForSequenceClassification

from align.config import RMRecipe, load_recipe
from tests.conftest import ALIGN, ROOT, run_env

RM_QUICKSTART = str(ROOT / "configs" / "rm" / "quickstart.yaml")


def rm_overrides(out: Path, model: Path | str, steps: int = 6, **extra: object) -> list[str]:
    base = {"output_dir": str(out), "model.name_or_path": str(model), "data.synthetic.train_rows": 120, "data.synthetic.eval_rows": 30,
            "train.max_steps": steps, "train.micro_batch_size": 2, "train.global_batch_size": 4, "train.log_every": 1,
            "logging.progress": False, "logging.wandb": False}
    base.update(extra)
    return [a for k, v in base.items() for a in ("--set", f"{k}={v}")]


def run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=600)


def test_rm_from_sft_checkpoint_writes_accuracy_by_condition(tmp_path, sft_checkpoint):
    out = tmp_path / "rm"
    proc = run(ALIGN + ["rm", "--config", RM_QUICKSTART] + rm_overrides(out, sft_checkpoint), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "pairwise accuracy" in proc.stdout
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert set(metrics["accuracy_by_condition"]) == {"math", "concise", "harmless"}
    assert all(0.0 <= v <= 1.0 for v in metrics["accuracy_by_condition"].values())
    assert set(metrics["reward_stats"]) == {"math", "concise", "harmless"} and 0.0 <= metrics["near_barrier_share"] <= 1.0
    stats = json.loads((out / "model" / "reward_stats.json").read_text())
    assert stats["stats"] == metrics["reward_stats"] and "math" in stats["conditions"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(out / "model")  # plain transformers
    assert reloaded.config.num_labels == 1


def test_missing_sft_checkpoint_says_which_command_makes_it(tmp_path):
    proc = run(ALIGN + ["rm", "--config", RM_QUICKSTART] + rm_overrides(tmp_path / "rm", "runs/no-such-sft/model"), tmp_path)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "align sft --config configs/sft/quickstart.yaml" in proc.stderr


def test_rm_two_rank_zero3(tmp_path, sft_checkpoint):
    out = tmp_path / "rm2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file",
           str(ROOT / "configs/accelerate/zero3.yaml"), "--main_process_port", "0", "-m", "align", "rm", "--config", RM_QUICKSTART]
    proc = run(cmd + rm_overrides(out, sft_checkpoint, steps=3), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["metrics"]
    assert summary["world_size"] == 2 and summary["deepspeed"] and metrics["eval_pairs"] == 30
    # the synthetic pairs' tags, gathered from both ranks: counts add up, and tag accuracies re-average to the overall one
    counts, by_tag = metrics["eval_pairs_by_tag"], metrics["accuracy_by_tag"]
    assert set(counts) == set(by_tag) and {"refuse_unsafe", "answer_safe"} <= set(counts) and sum(counts.values()) == 30
    assert abs(sum(by_tag[t] * n for t, n in counts.items()) / 30 - metrics["accuracy"]) < 1e-9
    assert "by tag:" in proc.stdout
    assert proc.stdout.count("pairwise accuracy") == 1  # one report per job


def test_internlm2_recipe_matches_paper():
    r = load_recipe(RMRecipe, ROOT / "configs" / "recipes" / "internlm2_conditional_rm.yaml")
    assert (r.reward.loss, r.reward.gamma, r.reward.barrier_weight, r.reward.bound) == ("focal_ranking", 2.0, 0.02, 5.0)
    assert r.data.max_length == 8192 and r.train.micro_batch_size * 2 * r.data.max_length == 16384
    assert (r.optim.lr, r.optim.lr * r.optim.min_lr_ratio, r.optim.weight_decay, r.train.epochs) == (1e-5, 5e-6, 0.01, 1.0)
    assert {"helpful", "harmless", "code", "math"} <= set(r.reward.conditions)
    assert load_recipe(RMRecipe, RM_QUICKSTART).reward.loss == "focal_ranking"


def test_rm_with_lora_trains_adapters_and_head_and_exports_a_plain_model(tmp_path, sft_checkpoint):
    """`model.lora` used to be ignored for reward models (the whole backbone trained); now adapters + the scalar head train,
    and the export is a plain sequence-classification model scoring exactly as the trained adapters did."""
    import torch

    from align.engine.checkpoint import export_model
    from align.engine.core import Engine
    from align.engine.loop import fit
    from align.trainers.rm import RMTrainer
    from rewards.model import pair_scores

    overrides = rm_overrides(tmp_path / "rm", sft_checkpoint, steps=3, **{"model.lora.enabled": True, "model.lora.r": 4,
                                                                        "optim.lr": 1e-2})[1::2]  # fmt: skip
    recipe = load_recipe(RMRecipe, RM_QUICKSTART, overrides)
    trainer = RMTrainer(recipe, Engine.create(recipe))
    trainer.setup()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".score." in n for n in trainable), sorted(trainable)[:5]
    assert any(".score." in n for n in trainable)

    result = fit(trainer.engine, trainer)
    result["logger"].close()
    out = export_model(trainer.engine.accelerator, trainer.model, trainer.tokenizer, tmp_path / "rm" / "model")
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any("lora" in k for k in plain.state_dict())
    batch = trainer.collate([0], "eval")
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(pair_scores(plain, batch.rows)), torch.stack(pair_scores(trainer.model, batch.rows)),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        assert float(torch.stack(pair_scores(plain, batch.rows)).abs().max()) > 0  # the zero-initialised head was trained
