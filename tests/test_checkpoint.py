"""Checkpoints verify before resume (manifest, fallback, older checkpoints), refuse another recipe's, and LoRA exports merge exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from align.config import SFTRecipe, load_recipe
from align.engine.checkpoint import STATE_FILE, Checkpointer, verify_checkpoint
from align.run_state import MANIFEST, RecipeChanged


def recipe(*overrides: str) -> SFTRecipe:
    return load_recipe(SFTRecipe, None, list(overrides))


@pytest.fixture
def saved(tmp_path) -> tuple[Checkpointer, list[Path]]:
    """Steps 2 and 4 of a prepared tiny model (weights, optimizer, scheduler, RNG) under one recipe."""
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = acc.prepare(model, optimizer)
    ckpt = Checkpointer(acc, tmp_path / "checkpoints", keep_last=3, recipe=recipe())
    paths = [ckpt.save(step, {"loop": {"step": step}}) for step in (2, 4)]
    return ckpt, paths


def test_manifest_is_written_last_and_lists_every_file(saved):
    ckpt, (_, newest) = saved
    manifest = json.loads((newest / MANIFEST).read_text())
    on_disk = {p.relative_to(newest).as_posix(): p.stat().st_size for p in newest.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert {k: v["size"] for k, v in manifest["files"].items()} == on_disk
    assert STATE_FILE in on_disk and "model.safetensors" in on_disk
    assert all("crc32" in v for v in manifest["files"].values())  # small files carry a checksum
    assert manifest["step"] == 4 and manifest["fingerprint"] == ckpt.fingerprint
    assert verify_checkpoint(newest) is None


@pytest.mark.parametrize("damage", ["truncate weights", "remove state", "flip a byte"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(saved, capsys, damage):
    ckpt, (older, newest) = saved
    weights = newest / "model.safetensors"
    if damage == "truncate weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "remove state":
        (newest / STATE_FILE).unlink()
    else:
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    assert verify_checkpoint(newest) is not None
    assert ckpt.resume_point(True) == older
    lines = [line for line in capsys.readouterr().out.splitlines() if "damaged" in line]
    assert len(lines) == 1 and "step-00000004" in lines[0] and "resuming from the older step-00000002" in lines[0]
    assert ckpt.load(older)["loop"]["step"] == 2


def test_saving_after_a_fallback_removes_the_damaged_later_checkpoint(saved):
    ckpt, (older, newest) = saved
    (newest / STATE_FILE).unlink()
    assert ckpt.latest() == older
    ckpt.save(3, {"loop": {"step": 3}})
    assert [p.name for p in ckpt.complete()] == ["step-00000002", "step-00000003"]


def test_checkpoint_without_manifest_is_accepted_if_its_state_parses(saved, capsys):
    ckpt, (older, newest) = saved
    (newest / MANIFEST).unlink()  # as written before manifests existed
    assert ckpt.latest() == newest
    assert "has no manifest.json (written by an older align); accepted" in capsys.readouterr().out
    (newest / STATE_FILE).write_text("{not json")
    assert ckpt.latest() == older
    weights = older / "model.safetensors"
    (older / MANIFEST).unlink()
    weights.write_bytes(weights.read_bytes()[:100])  # an old checkpoint with truncated weights: the safetensors header tells
    assert "model.safetensors" in verify_checkpoint(older)
    assert ckpt.latest() is None
    assert "no checkpoint" in capsys.readouterr().out


def test_a_checkpoint_of_another_recipe_is_refused_unless_forced(saved, capsys):
    ckpt, (_, newest) = saved
    changed = Checkpointer(ckpt.accelerator, ckpt.root, 3, recipe=recipe("optim.lr=0.001"))
    with pytest.raises(
        RecipeChanged, match=r"written by another recipe \(optim.lr 0.0001 → 0.001\).*train.resume=false.*train.resume=force"
    ):
        changed.resume_point(True)
    assert changed.resume_point("force") == newest
    assert "train.resume=force: resuming" in capsys.readouterr().out
    assert changed.resume_point(False) is None
    # where it lives, how it logs and how often it checkpoints do not change what it trains
    same = recipe("output_dir=elsewhere", "logging.wandb=false", "train.save_every=7", "train.keep_last=5", "train.resume=force")
    assert Checkpointer(ckpt.accelerator, ckpt.root, 3, recipe=same).resume_point(True) == newest


# ----------------------------------------------------------------------------- LoRA export
def _lora_model(tokenizer):
    from peft import LoraConfig, get_peft_model

    from align.config import ModelConfig
    from align.engine.models import load_causal_lm

    base = load_causal_lm(ModelConfig(name_or_path="builtin:tiny"), tokenizer, torch.float32, seed=0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B ≠ 0: a real delta
    return get_peft_model(base, config)


def test_lora_export_is_base_plus_the_adapter_deltas(tmp_path, tokenizer):
    from safetensors.torch import load_file

    from align.engine.checkpoint import export_model

    model = _lora_model(tokenizer)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    export_model(Accelerator(cpu=True), model, tokenizer, tmp_path / "model")
    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    scale = 8 / 4
    prefix = "base_model.model."
    for key, value in exported.items():
        module = key.removesuffix(".weight")
        a, b = state.get(f"{prefix}{module}.lora_A.default.weight"), state.get(f"{prefix}{module}.lora_B.default.weight")
        base = state.get(f"{prefix}{module}.base_layer.weight", state.get(f"{prefix}{key}"))
        expected = base + scale * b @ a if a is not None else base
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=key)
    assert any(".q_proj." in k for k in exported) and not any("lora" in k for k in exported)


def test_lora_export_refuses_a_base_weight_missing_from_the_trained_state(tokenizer):
    from align.engine.checkpoint import _merged_copy

    model = _lora_model(tokenizer)
    state = model.state_dict()
    dropped = "base_model.model.model.layers.0.mlp.up_proj.weight"
    with pytest.raises(RuntimeError, match=r"1 weights of the model are not in the trained state.*layers\.0\.mlp\.up_proj"):
        _merged_copy(model, {k: v for k, v in state.items() if k != dropped})
    tied = "base_model.model.lm_head.weight"  # tied to the input embeddings: covered by them
    merged = _merged_copy(model, {k: v for k, v in state.items() if k != tied})
    assert torch.equal(merged.lm_head.weight, state["base_model.model.model.embed_tokens.weight"])
