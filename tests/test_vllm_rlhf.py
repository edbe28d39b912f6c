"""`align rlhf` with vLLM rollouts: one process and 2 ZeRO-3 ranks (an engine per rank), weights synced after every
optimizer step, the |vLLM − trainer| log-prob gap recorded per iteration. Needs vLLM (`make test-vllm`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ALIGN, ROOT, run_env

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
GRPO = str(ROOT / "configs" / "rlhf" / "grpo_quickstart.yaml")


@pytest.fixture(scope="module")
def small_policy(tmp_path_factory) -> Path:
    """builtin:small (head size 32, which vLLM's CPU attention takes), saved like an `align sft` export."""
    from align.config import ModelConfig
    from align.engine.models import load_causal_lm, load_tokenizer

    out = tmp_path_factory.mktemp("small") / "model"
    cfg = ModelConfig(name_or_path="builtin:small")
    tok = load_tokenizer(cfg)
    load_causal_lm(cfg, tok, torch.float32, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def overrides(out: Path, policy: Path, **extra: object) -> list[str]:
    base = {"output_dir": str(out), "model.name_or_path": str(policy), "rollout.engine": "vllm", "rollout.kv_cache_gib": 0.25,
            "rollout.max_model_len": 512, "ppo.iterations_per_round": 2, "ppo.prompts_per_iteration": 4, "ppo.samples_per_prompt": 2,
            "ppo.max_new_tokens": 8, "ppo.num_prompts": 40, "train.micro_batch_size": 4, "data.synthetic.train_rows": 48,
            "data.max_length": 128, "eval.num_prompts": 6, "eval.max_new_tokens": 8, "logging.progress": False, "optim.lr": 1e-3}  # fmt: skip
    base.update(extra)
    return [a for k, v in base.items() for a in ("--set", f"{k}={v}")]


def run(tmp_path: Path, args: list[str], launcher: list[str] | None = None) -> list[dict]:
    proc = subprocess.run((launcher or ALIGN) + ["rlhf", "--config", GRPO] + args, cwd=ROOT, env=run_env(tmp_path), capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = Path(args[args.index("--set") + 1].split("=", 1)[1])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def iterations(metrics: list[dict]) -> list[dict]:
    return [m for m in metrics if "time/generate" in m]


def test_grpo_on_vllm_rollouts_syncs_after_each_step_and_tracks_the_logprob_gap(tmp_path, small_policy):
    """On-policy GRPO (one step per iteration): the gap is measured on the trained forward itself."""
    metrics = iterations(run(tmp_path, overrides(tmp_path / "run", small_policy)))
    assert len(metrics) == 2
    for m in metrics:
        assert 0 <= m["sampler/logprob_diff_mean"] <= m["sampler/logprob_diff_max"] < 1e-3, m
    # the held-out evaluation before training started the engine on these weights; after the first step, a reload
    assert metrics[0]["time/weight_sync"] == 0.0 < metrics[1]["time/weight_sync"]
    assert (tmp_path / "run" / "vllm" / "weights" / "model.safetensors").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations"] == 2
    rollout = summary["rollout"]  # started once (before training), reloaded after each of the 2 steps
    assert rollout["engine"] == "vllm" and rollout["start_s"] > 0 and rollout["reloads"] == 2 and 0 < rollout["reload_mean_s"] < rollout["start_s"]


def test_zero3_two_ranks_each_with_an_engine(tmp_path, small_policy):
    """Two mini-batches per iteration (old log-probs computed): both ranks' engines reload the gathered weights."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file",
                str(ROOT / "configs" / "accelerate" / "zero3.yaml"), "--main_process_port", "0", "-m", "align"]  # fmt: skip
    out = tmp_path / "zero3"
    metrics = iterations(run(tmp_path, overrides(out, small_policy, **{"ppo.mini_batches": 2, "train.micro_batch_size": 2}), launcher))
    assert len(metrics) == 2 and all(m["sampler/logprob_diff_max"] < 1e-3 for m in metrics), metrics
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["deepspeed"] is True
    responses = [[r["response_ids"] for r in json.loads((out / f"rollouts-rank{k}.json").read_text())] for k in (0, 1)]
    assert len(responses[0]) == len(responses[1]) == 8 and responses[0] != responses[1]
