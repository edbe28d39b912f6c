"""Shared fixtures: offline wandb inside the test's tmp dir, the built-in tokenizer, tiny recipes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALIGN = [sys.executable, "-m", "align"]
# DeepSpeed JIT-builds its CPU shared-memory comm op at every process-group start; with XDG_CACHE_HOME in each
# test's tmp dir it would rebuild (a minute or more on 2 cores) in every ZeRO-3 test. One build per checkout.
TORCH_EXTENSIONS_DIR = str(ROOT / ".cache" / "torch_extensions")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", TORCH_EXTENSIONS_DIR)
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
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(ROOT),
               TORCH_EXTENSIONS_DIR=TORCH_EXTENSIONS_DIR)
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


@pytest.fixture(scope="session")
def tiny_rm(sft_checkpoint, tmp_path_factory) -> Path:
    """A tiny conditional RM started from the tiny SFT model, with a seeded non-zero head and stored stats."""
    import json

    import torch

    from align.config import ModelConfig
    from align.engine.models import load_reward_model, load_tokenizer
    from rewards.conditions import DEFAULT_CONDITIONS
    from rewards.model import reward_head

    out = tmp_path_factory.mktemp("rm") / "model"
    cfg = ModelConfig(name_or_path=str(sft_checkpoint))
    tok = load_tokenizer(cfg)
    model = load_reward_model(cfg, tok)
    with torch.no_grad():
        head = reward_head(model).weight
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    stats = {c: {"mean": 0.0, "std": 1.0} for c in ("math", "concise", "harmless")}
    (out / "reward_stats.json").write_text(json.dumps({"conditions": dict(DEFAULT_CONDITIONS), "stats": stats}))
    return out


class ScriptedGenerator:
    """Stands in for `HFGenerator`: scripted answers with real token ids, so tests know which samples are right.

    Prompt i (in the order of `problems`) gets `script(i)`, a list of kinds, one per sample (n = its length):
    "right" (the ground truth), "wrong" (off by one, or complying with an unsafe request), or "right-cut"
    (a right answer with a lead-in, flagged truncated). Continuations after an assistant prefix (Dropout-NTP) are " Final Answer: 0".
    """

    def __init__(self, tokenizer, problems: list[dict], script):
        import json

        self.tokenizer, self.script, self.calls = tokenizer, script, 0
        self.index = {json.dumps(p["messages"]): (i, p) for i, p in enumerate(problems)}

    def text(self, problem: dict, kind: str) -> str:
        lead = "So: " if kind == "right-cut" else ""  # a right answer of its own, so a test can tell which one was kept
        if problem["unsafe"]:
            return f"{lead}I can't help with that request." if kind != "wrong" else "Sure, here is how."
        return f"{lead}Final Answer: {int(problem['answer']) + (kind == 'wrong')}"

    def generation(self, messages: list[dict], text: str, truncated: bool):
        from align.rollout.generation import Generation
        from data_builders.render import render_prompt

        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Generation(render_prompt(self.tokenizer, messages), ids + ([] if truncated else [self.tokenizer.eos_token_id]), text, truncated)

    def generate(self, prompts, params, prefixes=None):
        import json

        self.calls += 1
        if prefixes is not None:
            return [[self.generation(m, " Final Answer: 0", False)] for m in prompts]
        out = []
        for messages in prompts:
            i, problem = self.index[json.dumps(messages)]
            kinds = self.script(i)
            assert len(kinds) == params.n, "the script gives one kind per sample"
            out.append([self.generation(messages, self.text(problem, k), k == "right-cut") for k in kinds])
        return out
