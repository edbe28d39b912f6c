"""Shared fixtures: offline wandb inside the test's tmp dir, the built-in tokenizer, tiny recipes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALIGN = [sys.executable, "-m", "align"]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from align.builtin import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def tiny_overrides(out_dir: Path, steps: int = 6, **extra: object) -> list[str]:
    """--set overrides that make the quickstart a seconds-long run on builtin:tiny."""
    base = {
        "output_dir": str(out_dir),
        "model.name_or_path": "builtin:tiny",
        "data.synthetic.train_rows": 240,
        "data.synthetic.eval_rows": 24,
        "data.max_length": 256,
        "train.max_steps": steps,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 4,
        "train.log_every": 1,
        "eval.num_prompts": 12,
        "eval.max_new_tokens": 8,
        "logging.progress": False,
        "logging.wandb": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="session")
def sft_checkpoint(tmp_path_factory) -> Path:
    """A tiny causal LM saved like `align sft` saves its export (weights + tokenizer)."""
    import torch

    from align.config import ModelConfig
    from align.engine.models import load_causal_lm, load_tokenizer

    out = tmp_path_factory.mktemp("sft") / "model"
    cfg = ModelConfig(name_or_path="builtin:tiny")
    tok = load_tokenizer(cfg)
    load_causal_lm(cfg, tok, torch.float32, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out
