"""`rollout.engine`: which generator a job gets, the errors when vLLM is missing, and the weights vLLM is sent
(LoRA merged without touching the model). Runs without vLLM: its absence and presence are both simulated."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest
import torch

import align.rollout.engines as engines
import align.rollout.vllm_engine as vllm_engine
from align.config import ModelConfig, RolloutConfig
from align.engine.models import load_causal_lm, load_tokenizer
from align.rollout.generation import HFGenerator
from align.rollout.vllm_generator import policy_weights
from data_builders.errors import UserError
from tests.conftest import ALIGN, ROOT, run_env


@pytest.fixture
def installed(monkeypatch):
    def set_installed(value: bool) -> None:
        monkeypatch.setattr(engines, "vllm_installed", lambda: value)
        monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: value)

    return set_installed


def test_auto_picks_vllm_only_when_installed_and_the_model_can_run_on_it(installed, monkeypatch) -> None:
    installed(False)
    kind, note = engines.resolve_engine(RolloutConfig(), takes_images=False)
    assert kind == "hf" and "vLLM is not installed" in note and 'pip install -e ".[vllm]"' in note
    installed(True)
    assert engines.resolve_engine(RolloutConfig(), takes_images=False) == ("vllm", None)
    kind, note = engines.resolve_engine(RolloutConfig(), takes_images=True)
    assert kind == "hf" and "text-only" in note
    assert engines.resolve_engine(RolloutConfig(engine="hf"), takes_images=False) == ("hf", None)

    def unsupported(config):
        raise UserError("rollout.engine=vllm: vLLM's CPU attention takes head sizes 32, 64; this model's is 16 (...); use rollout.engine=hf")

    monkeypatch.setattr(engines, "check_head_size", unsupported)
    kind, note = engines.resolve_engine(RolloutConfig(), takes_images=False, config=object())
    assert kind == "hf" and note.endswith("generating with HF: vLLM's CPU attention takes head sizes 32, 64; this model's is 16 (...)")
    with pytest.raises(UserError, match="this model's is 16"):
        engines.resolve_engine(RolloutConfig(engine="vllm"), takes_images=False, config=object())
    with pytest.raises(UserError, match="text-only models so far"):
        engines.resolve_engine(RolloutConfig(engine="vllm"), takes_images=True)
    installed(False)
    with pytest.raises(UserError, match=r"vLLM is not installed; install it with pip install -e \".\[vllm\]\""):
        engines.resolve_engine(RolloutConfig(engine="vllm"), takes_images=False)


def test_the_fallback_line_is_printed_once_and_hf_generates(installed, capsys, monkeypatch) -> None:
    installed(False)
    monkeypatch.setattr(engines, "_announced", set())
    job = SimpleNamespace(recipe=SimpleNamespace(rollout=RolloutConfig()), is_main=True, accelerator=None)
    for _ in range(2):
        assert isinstance(engines.make_generator(torch.nn.Linear(1, 1), None, job, 4), HFGenerator)
    assert capsys.readouterr().out.count("rollout.engine=auto: vLLM is not installed") == 1


def test_asking_for_vllm_without_it_is_one_line_before_any_model_loads(tmp_path) -> None:
    env = run_env(tmp_path)
    probe = subprocess.run([*ALIGN[:1], "-c", "import importlib.util as u; print(u.find_spec('vllm') is not None)"], env=env,
                           capture_output=True, text=True)  # fmt: skip
    if probe.stdout.strip() == "True":
        pytest.fail("this venv has vLLM: run this test in the main venv (make test), where it is absent")
    proc = subprocess.run([*ALIGN, "rlhf", "--config", str(ROOT / "configs" / "rlhf" / "grpo_quickstart.yaml"), "--set", "rollout.engine=vllm",
                           "--set", f"output_dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("align: ") and "rollout.engine: is vllm but vLLM is not installed" in line and 'pip install -e ".[vllm]"' in line
    assert "Traceback" not in proc.stderr


def test_policy_weights_merge_lora_like_peft_and_leave_the_model_alone() -> None:
    from peft import LoraConfig, get_peft_model

    cfg = ModelConfig(name_or_path="builtin:tiny")
    tok = load_tokenizer(cfg)
    base = load_causal_lm(cfg, tok, torch.float32, seed=0)
    plain = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ours = policy_weights(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched, adapters still unmerged
    merged = get_peft_model(load_causal_lm(cfg, tok, torch.float32, seed=0), model.peft_config["default"])
    merged.load_state_dict(before)
    reference = merged.merge_and_unload().state_dict()
    assert ours.keys() == reference.keys() == plain.keys()
    for k in reference:
        torch.testing.assert_close(ours[k], reference[k], atol=1e-6, rtol=0)
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], plain["model.layers.0.self_attn.q_proj.weight"])
    fresh = load_causal_lm(cfg, tok, torch.float32, seed=0)
    assert all(torch.equal(v, plain[k]) for k, v in policy_weights(fresh).items())  # no adapters: the model's own weights
