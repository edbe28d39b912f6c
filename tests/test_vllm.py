"""vLLM rollouts against HF on the same weights: greedy parity, in-place weight sync, log-probs, prefixes and end flags.

These need vLLM (`make test-vllm` installs it into its own venv and runs them); without it they fail, never skip.
One engine serves the whole module: its start-up (15-50 s on 2 cores) is paid once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from align.config import ModelConfig, RolloutConfig
from align.engine.models import load_causal_lm, load_tokenizer
from align.rollout.generation import HFGenerator, SamplingParams
from align.rollout.vllm_engine import VLLMEngine
from align.rollout.vllm_generator import VLLMGenerator

pytestmark = pytest.mark.vllm

PROMPTS = [[{"role": "user", "content": text}] for text in ("What is 2 + 3?", "Name a colour.", "hi", "Add 17 and 25, then double it.",
                                                            "Tell me a long story about a cat who learns arithmetic.", "x")]  # fmt: skip


class Weights:
    """A version counter the test bumps whenever it changes the model (the trainer passes its optimizer-step count)."""

    def __init__(self) -> None:
        self.version = 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("vllm")
    tokenizer = load_tokenizer(ModelConfig(name_or_path="builtin:small"))
    torch.manual_seed(0)
    model = load_causal_lm(ModelConfig(name_or_path="builtin:small"), tokenizer, torch.float32).eval()
    with torch.no_grad():  # sharper logits: greedy picks far from ties, so parity is a strict check
        model.model.norm.weight.mul_(20.0)
    accelerator = Accelerator(cpu=True)
    weights = Weights()
    engine = VLLMEngine(root / "run" / "vllm", RolloutConfig(engine="vllm", kv_cache_gib=0.25, max_model_len=512), seed=0)
    generator = VLLMGenerator(engine, model, tokenizer, accelerator, version=lambda: weights.version)
    yield root, model, tokenizer, accelerator, generator, weights
    generator.close()


def hf_outputs(model, tokenizer, accelerator, params, prefixes=None):
    return HFGenerator(model, tokenizer, accelerator, batch_size=64).generate(PROMPTS, params, prefixes)


def test_greedy_equals_hf_greedy_and_everything_stays_in_the_run_dir(setup) -> None:
    root, model, tokenizer, accelerator, generator, _ = setup
    params = SamplingParams(max_new_tokens=16, n=2)
    ours = generator.generate(PROMPTS, params)
    theirs = hf_outputs(model, tokenizer, accelerator, params)
    assert [[g.response_ids for g in group] for group in ours] == [[g.response_ids for g in group] for group in theirs]
    assert [[g.text for g in group] for group in ours] == [[g.text for g in group] for group in theirs]
    assert all(g.prompt_ids == h.prompt_ids for a, b in zip(ours, theirs) for g, h in zip(a, b))
    run = root / "run" / "vllm"
    assert os.environ["VLLM_CACHE_ROOT"] == str(run / "cache") and os.environ["VLLM_RPC_BASE_PATH"].startswith(str(run))
    assert (run / "weights" / "model.safetensors").is_file() and any((run / "ipc").iterdir())
    assert generator.engine.sync_seconds and generator.engine.sync_seconds[0] > 0


def test_weight_sync_changes_outputs_exactly_as_the_new_weights_dictate(setup) -> None:
    _, model, tokenizer, accelerator, generator, weights = setup
    params = SamplingParams(max_new_tokens=12)
    before = [g[0].response_ids for g in generator.generate(PROMPTS, params)]
    starts = len(generator.engine.sync_seconds)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    same_version = [g[0].response_ids for g in generator.generate(PROMPTS, params)]
    assert same_version == before and len(generator.engine.sync_seconds) == starts  # version unchanged: no sync
    weights.version += 1
    after = [g[0].response_ids for g in generator.generate(PROMPTS, params)]
    assert len(generator.engine.sync_seconds) == starts + 1
    assert after == [g[0].response_ids for g in hf_outputs(model, tokenizer, accelerator, params)]
    assert after != before


@pytest.fixture
def soft_logits(setup):
    """The model without its sharpening, for varied samples (vLLM caps temperature at 2); synced before and after."""
    _, model, _, _, _, weights = setup
    with torch.no_grad():
        model.model.norm.weight.div_(20.0)
    weights.version += 1
    yield
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    weights.version += 1


def test_sampled_logprobs_match_the_trainers_forward(setup, soft_logits) -> None:
    _, model, tokenizer, _, generator, _ = setup
    torch.manual_seed(3)
    groups = generator.generate(PROMPTS, SamplingParams(max_new_tokens=10, n=3, temperature=1.0))
    worst = 0.0
    for group in groups:
        assert len({tuple(g.response_ids) for g in group}) > 1  # n samples, not copies
        for g in group:
            ids = torch.tensor([g.prompt_ids + g.response_ids])
            with torch.no_grad():
                logits = model(ids).logits[0, len(g.prompt_ids) - 1 : -1].float()
            ours = torch.log_softmax(logits, -1).gather(-1, torch.tensor(g.response_ids)[:, None])[:, 0]
            assert g.logprobs is not None and len(g.logprobs) == len(g.response_ids)
            worst = max(worst, float((ours - torch.tensor(g.logprobs)).abs().max()))
    assert worst < 1e-4, worst


def test_samples_follow_torch_seed(setup, soft_logits) -> None:
    _, _, _, _, generator, _ = setup
    params = SamplingParams(max_new_tokens=8, n=2, temperature=1.0)
    draws = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        draws.append([[g.response_ids for g in group] for group in generator.generate(PROMPTS, params)])
    assert draws[0] == draws[1] != draws[2]


def test_prefixes_stop_tokens_and_truncation(setup) -> None:
    _, model, tokenizer, accelerator, generator, _ = setup
    prefixes = ["The answer", "", "Sure, ", "17 + 25", "Once upon", "ok"]
    params = SamplingParams(max_new_tokens=6)
    ours = generator.generate(PROMPTS, params, prefixes)
    theirs = hf_outputs(model, tokenizer, accelerator, params, prefixes)
    assert [g[0].response_ids for g in ours] == [g[0].response_ids for g in theirs]
    assert [g[0].prompt_ids for g in ours] == [g[0].prompt_ids for g in theirs]
    assert all(g[0].truncated and len(g[0].response_ids) == 6 for g in ours)  # random weights never end a turn in 6 tokens
    stop = ours[0][0].response_ids[2]  # make the 3rd token of the first answer an end token
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    try:
        ended = generator.generate(PROMPTS[:1], params, prefixes[:1])[0][0]
        reference = hf_outputs(model, tokenizer, accelerator, params, prefixes)[0][0]
    finally:
        model.generation_config.eos_token_id = original
    assert ended.response_ids == ours[0][0].response_ids[: ours[0][0].response_ids.index(stop) + 1] == reference.response_ids
    assert not ended.truncated and not reference.truncated


def test_a_temperature_above_vllms_limit_is_one_clear_error(setup) -> None:
    from data_builders.errors import UserError

    with pytest.raises(UserError, match="temperature at most 2 .*got 2.5"):
        setup[4].generate(PROMPTS, SamplingParams(temperature=2.5))


def test_a_head_size_vllm_cannot_run_on_cpu_is_one_clear_error(tmp_path: Path) -> None:
    from align.rollout.vllm_engine import check_head_size
    from data_builders.errors import UserError

    tokenizer = load_tokenizer(ModelConfig(name_or_path="builtin:tiny"))
    model = load_causal_lm(ModelConfig(name_or_path="builtin:tiny"), tokenizer, torch.float32)
    with pytest.raises(UserError, match="head sizes .*this model's is 16"):
        check_head_size(model.config)
