"""`align rlhf` (COOL RLHF): condition isolation, experience parity, reward normalisation, the fast and slow paths,
SIGKILL resume, and 2-rank ZeRO-3 with different response lengths per rank."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ALIGN, ROOT, run_env

QUICKSTART = str(ROOT / "configs" / "rlhf" / "quickstart.yaml")


@pytest.fixture(scope="session")
def stopping_policy(sft_checkpoint, tmp_path_factory) -> Path:
    """The tiny SFT model with its end-of-turn logit raised to ≈ 5.5 everywhere: it stops after a random number of tokens
    (about one in seven per step), so ranks sampling different prompts finish at different lengths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("stopping") / "model"
    model = AutoModelForCausalLM.from_pretrained(sft_checkpoint)
    tok = AutoTokenizer.from_pretrained(sft_checkpoint)
    with torch.no_grad():
        ids = tok("What is 12+30? Final Answer: 42", return_tensors="pt")["input_ids"]
        mean = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
        model.get_output_embeddings().weight[tok.eos_token_id] = 5.5 * mean / mean.pow(2).sum()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def rlhf_overrides(out: Path, sft: Path, rm: Path, **extra: object) -> list[str]:
    base = {"output_dir": str(out), "model.name_or_path": str(sft), "ppo.reward_model": str(rm), "ppo.rounds": 2,
            "ppo.iterations_per_round": 2, "ppo.prompts_per_iteration": 4, "ppo.samples_per_prompt": 2, "ppo.max_new_tokens": 8,
            "ppo.num_prompts": 40, "ppo.critic_warmup_iterations": 1, "ppo.rm_update_steps": 2, "ppo.mini_batches": 2,
            "train.micro_batch_size": 2, "data.synthetic.train_rows": 48, "data.max_length": 128, "eval.num_prompts": 6,
            "eval.max_new_tokens": 8, "logging.progress": False, "logging.wandb": False, "optim.lr": 1e-3}  # fmt: skip
    base.update(extra)
    return [a for k, v in base.items() for a in ("--set", f"{k}={v}")]


def align_rlhf(tmp_path: Path, args: list[str], launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run((launcher or ALIGN) + ["rlhf", "--config", QUICKSTART] + args, cwd=ROOT, env=run_env(tmp_path),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def in_process_trainer(tmp_path: Path, sft: Path, rm: Path, **extra: object):
    from align.config import RLHFRecipe, load_recipe
    from align.trainers.rlhf import RLHFTrainer

    args = rlhf_overrides(tmp_path / "run", sft, rm, **extra)
    trainer = RLHFTrainer(load_recipe(RLHFRecipe, QUICKSTART, args[1::2]))
    trainer.setup()
    return trainer


def test_condition_prompt_reaches_the_reward_model_only(tmp_path, sft_checkpoint, tiny_rm):
    """COOL RLHF: the condition's system prompt is in every reward-model input and in no actor, critic or reference input."""
    trainer = in_process_trainer(tmp_path, sft_checkpoint, tiny_rm, **{"ppo.ptx_coef": 0})
    seen: dict[str, list[torch.Tensor]] = {"actor": [], "critic": [], "reference": [], "reward": []}
    inner = trainer.engine.accelerator.unwrap_model(trainer.model)
    modules = {"actor": inner.actor, "critic": inner.critic, "reference": trainer.reference, "reward": trainer.reward_model}
    hooks = [m.get_input_embeddings().register_forward_hook(lambda _m, args, _o, k=k: seen[k].append(args[0].detach().cpu()))
             for k, m in modules.items()]  # fmt: skip
    trainer.run_iteration(trainer.ppo.critic_warmup_iterations)  # an iteration that trains actor and critic
    for h in hooks:
        h.remove()
    tok = trainer.tokenizer
    texts = {k: [tok.decode(row) for batch in v for row in batch] for k, v in seen.items()}
    conditions = trainer.conditions
    assert all(texts[k] for k in texts), {k: len(v) for k, v in texts.items()}
    for k in ("actor", "critic", "reference"):
        assert not any(prompt in t for t in texts[k] for prompt in conditions.values()), k
    # the reward model scored every sample with its own condition's prompt
    scored = sum(t.count(prompt) for t in texts["reward"] for prompt in conditions.values())
    assert scored == trainer.ppo.prompts_per_iteration * trainer.ppo.samples_per_prompt


def test_packed_experience_equals_separate_forwards(tmp_path, sft_checkpoint, tiny_rm):
    """Packed log-probs and values of several rollouts equal one plain forward per rollout."""
    from align.rollout.experience import actor_logprobs, collate_rollouts, critic_values

    trainer = in_process_trainer(tmp_path, sft_checkpoint, tiny_rm)
    from align.rollout.collect import collect_rollouts
    from align.rollout.generation import SamplingParams

    params = SamplingParams(8, 2, 1.0)
    torch.manual_seed(0)
    rollouts = collect_rollouts(trainer.generator(), trainer.router, trainer.iteration_prompts(0), params)
    inner = trainer.engine.accelerator.unwrap_model(trainer.model)
    pad = trainer.tokenizer.pad_token_id
    with torch.no_grad():
        packed = collate_rollouts(rollouts, pad, 512)
        assert len(packed.tokens.input_ids) < len(rollouts)  # really packed
        lp = packed.per_rollout(actor_logprobs(inner, packed)[0], len(rollouts))
        values = packed.per_rollout(critic_values(inner, packed, inner.critic, role="critic"), len(rollouts))
        for i, r in enumerate(rollouts):
            alone = collate_rollouts([r], pad, 1)
            torch.testing.assert_close(lp[i], actor_logprobs(inner, alone)[0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(values[i], critic_values(inner, alone, inner.critic, role="critic"), atol=2e-5, rtol=1e-4)
            full = torch.tensor([r.prompt_ids + r.response_ids])
            logits = inner.actor(input_ids=full).logits[0, len(r.prompt_ids) - 1 : -1].log_softmax(-1)
            torch.testing.assert_close(lp[i], logits.gather(-1, torch.tensor(r.response_ids)[:, None])[:, 0], atol=2e-5, rtol=1e-4)


def test_running_moments_match_the_whole_stream():
    from align.losses.ppo import RunningMoments

    stream = [torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * n + n for n in (5, 17, 3, 40)]
    moments = RunningMoments()
    for x in stream:
        moments.update(float(x.sum()), float((x**2).sum()), float(len(x)))
    flat = torch.cat(stream).double()
    assert moments.mean == pytest.approx(float(flat.mean()), rel=1e-9)
    assert moments.std == pytest.approx(float(flat.std(unbiased=False)), rel=1e-6)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.normalize(torch.tensor([flat.mean().item()])).abs().item() < 1e-6


def test_detectors_flag_reward_hacking_and_blowups():
    from align.config import DetectorConfig
    from align.rollout.buffer import Rollout
    from align.rollout.detectors import detect_hacking, is_repetitive, split_early_late

    def r(version, reward, correct, length, text="Final Answer: 3"):
        return Rollout([1], [2] * length, [], text, "p", version, policy_version=version, reward=reward, correct=correct)

    early = [r(0, 0.0, True, 10), r(1, 0.1, True, 10)]
    late = [r(2, 1.0, False, 30, "so so so so so so so"), r(3, 1.2, False, 30, "so so so so so so so")]
    split = split_early_late(early + late)
    assert [x.policy_version for x in split[0]] == [0, 1] and [x.policy_version for x in split[1]] == [2, 3]
    report = detect_hacking(early, late, DetectorConfig())
    assert set(report["flags"]) == {"reward_up_accuracy_down", "length_blowup", "repetition"}
    assert report["late"]["accuracy"] == 0.0 and report["early"]["length"] == 10
    assert detect_hacking(early, early, DetectorConfig())["flags"] == []
    assert is_repetitive("a b c a b c a b c") and not is_repetitive("7+5=12, 4+8+1=13. Final Answer: 132")


def test_slow_path_rows_are_checked_and_the_rm_update_fixes_them(tmp_path, sft_checkpoint, tiny_rm, tokenizer):
    from align.config import ModelConfig, RewardConfig
    from align.engine.models import load_reward_model
    from align.trainers.rm_update import comparison_pairs, pairwise_accuracy, read_comparison_files, update_reward_model
    from data_builders.bad_rows import BadRowError, BadRowPolicy
    from rewards.conditions import DEFAULT_CONDITIONS

    folder = tmp_path / "comparisons"
    folder.mkdir()
    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+1?"}], "chosen": f"Final Answer: {i + 1}",
             "rejected": f"Final Answer: {i + 7}", "condition": "math"} for i in range(12)]  # fmt: skip
    (folder / "a.jsonl").write_text("\n".join(json.dumps(x) for x in rows))
    (folder / "b.jsonl").write_text(json.dumps({**rows[0], "condition": "poetry"}))
    found = read_comparison_files(folder, set())
    assert [Path(p).name for p, _ in found] == ["a.jsonl", "b.jsonl"]
    assert read_comparison_files(folder, {p for p, _ in found}) == []
    with pytest.raises(BadRowError, match=r"b\.jsonl: row 1: field 'condition'"):
        comparison_pairs(found[1][1], tokenizer, DEFAULT_CONDITIONS, found[1][0], BadRowPolicy("error"), 256)
    pairs = comparison_pairs(found[0][1], tokenizer, DEFAULT_CONDITIONS, found[0][0], BadRowPolicy("error"), 256)
    model = load_reward_model(ModelConfig(name_or_path=str(tiny_rm)), tokenizer).eval().requires_grad_(False)
    report = update_reward_model(model, pairs, tokenizer.pad_token_id, RewardConfig(), steps=30, lr=1e-3, batch_pairs=6, seed=0)
    assert report["accuracy_after"] == 1.0 and report["accuracy_after"] > report["accuracy_before"]
    assert report["loss_last"] < report["loss_first"]
    assert pairwise_accuracy(model, pairs, tokenizer.pad_token_id, True) == 1.0
    assert not any(p.requires_grad for p in model.parameters())


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("model", "critic", "reward_model"):
        if (run / part).exists():
            out |= {f"{part}/{k}": v for k, v in load_file(str(run / part / "model.safetensors")).items()}
    return out


def test_sigkill_mid_round_then_resume_is_bit_identical(tmp_path, sft_checkpoint, tiny_rm):
    """An uninterrupted run and one killed mid-round (after iteration 3 of 2×3) then resumed end with identical actor,
    critic and (fast-path-updated) reward model, identical metrics, the same round reports and the same buffer."""
    folder = tmp_path / "comparisons"
    folder.mkdir()
    row = {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": "Final Answer: 4", "rejected": "Final Answer: 5", "condition": "math"}
    (folder / "labels.jsonl").write_text(json.dumps(row))
    extra = {"ppo.iterations_per_round": 3, "train.save_every": 1, "ppo.comparisons_dir": str(folder)}
    full = tmp_path / "full"
    proc = align_rlhf(tmp_path, rlhf_overrides(full, sft_checkpoint, tiny_rm, **extra))
    assert "held-out reward" in proc.stdout and "iterations" in proc.stdout

    killed = tmp_path / "killed"
    cmd = ALIGN + ["rlhf", "--config", QUICKSTART] + rlhf_overrides(killed, sft_checkpoint, tiny_rm, **extra)
    child = subprocess.Popen(cmd, cwd=ROOT, env=run_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "step-00000004").exists() and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    resumed = align_rlhf(tmp_path, rlhf_overrides(killed, sft_checkpoint, tiny_rm, **extra))
    assert "resumed from" in resumed.stdout

    a, b = _weights(full), _weights(killed)
    assert set(a) == set(b) and any(k.startswith("reward_model/") for k in a)  # the fast/slow path changed the RM
    for key in a:
        assert torch.equal(a[key], b[key]), key
    sa, sb = (json.loads((run / "summary.json").read_text()) for run in (full, killed))
    assert sa["metrics"] == sb["metrics"] and sa["rounds"] == sb["rounds"]
    assert sa["rounds"][0]["slow_path_pairs"] == 1 and "rm_update" in sa["rounds"][0]
    for k in ("reward_before", "reward_after", "accuracy_before", "accuracy_after", "kl"):
        assert k in sa["metrics"]
    ma = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    mb = {r["step"]: r for r in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines())}
    for rec in ma:
        for key in ("reward", "kl", "value_loss", "policy_loss", "verifier_accuracy"):
            if key in rec:
                assert rec[key] == mb[rec["step"]][key], (rec["step"], key)
    assert (full / "rollouts-rank0.json").read_text() == (killed / "rollouts-rank0.json").read_text()


# grpo: no critic, the batch std over both ranks, the reference's k3 KL in the loss, old log-probs computed (2 mini-batches)
CRITIC_FREE = {"ppo.advantage_estimator": "grpo", "ppo.critic_warmup_iterations": 0, "ppo.scale_rewards": "batch", "ppo.kl_penalty": "loss",
               "ppo.rm_update_steps": 0}  # fmt: skip


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_zero3_two_ranks_with_different_response_lengths(tmp_path, stopping_policy, tiny_rm, estimator):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file",
                str(ROOT / "configs" / "accelerate" / "zero3.yaml"), "--main_process_port", "0", "-m", "align"]  # fmt: skip
    out = tmp_path / "zero3"
    extra = {"ppo.max_new_tokens": 16, "ppo.rounds": 1} | (CRITIC_FREE if estimator == "grpo" else {})
    align_rlhf(tmp_path, rlhf_overrides(out, stopping_policy, tiny_rm, **extra), launcher)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["deepspeed"] is True and summary["iterations"] == 2
    assert (summary["critic_path"] is None) == (estimator == "grpo") and (out / "critic").exists() == (estimator == "gae")
    lengths = [[len(r["response_ids"]) for r in json.loads((out / f"rollouts-rank{k}.json").read_text())] for k in (0, 1)]
    assert len(lengths[0]) == len(lengths[1]) == 8  # 2 iterations × 2 prompts × 2 samples on each rank
    assert sorted(lengths[0]) != sorted(lengths[1]) and min(min(lengths)) < 16  # ranks stopped at different lengths
    state = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def test_a_nan_ppo_step_is_skipped_and_counted_and_k_in_a_row_stop_without_a_checkpoint(tmp_path, sft_checkpoint, tiny_rm, monkeypatch):
    """PPO goes through the same guarded step as every trainer: a NaN importance-ratio loss skips that optimizer step on
    every rank (weights untouched, count kept), the other steps apply, and `train.max_bad_steps` in a row stop the run
    before any checkpoint is written."""
    import align.trainers.rlhf as rlhf
    from align.config import RLHFRecipe, load_recipe
    from align.engine.loop import NonFiniteLossError

    real, calls, bad = rlhf.policy_loss_tokens, {"n": 0}, {1}

    def flaky(logprobs, old, advantages, clip, clip_high=None):  # 2 micro-batches per optimizer step
        calls["n"] += 1
        per_token, clipped = real(logprobs, old, advantages, clip, clip_high)
        return (per_token * float("nan") if (calls["n"] - 1) // 2 in bad else per_token), clipped

    monkeypatch.setattr(rlhf, "policy_loss_tokens", flaky)
    extra = {"ppo.ptx_coef": 0, "ppo.critic_warmup_iterations": 0, "train.max_bad_steps": 2, "ppo.rm_update_steps": 0}
    trainer = in_process_trainer(tmp_path, sft_checkpoint, tiny_rm, **extra)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.run_iteration(0)
    steps = trainer.ppo.ppo_epochs * trainer.ppo.mini_batches
    assert steps > 1 and trainer.state.optimizer_steps == steps and trainer.stepper.skipped_steps == 1 and metrics["skipped_steps"] == 1.0
    after = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the good step was applied
    assert trainer.state.tokens > 0  # trained response tokens are counted (the summary used to say 0)

    bad.update(range(100))
    calls["n"] = 0
    args = rlhf_overrides(tmp_path / "stops", sft_checkpoint, tiny_rm, **extra, **{"train.save_every": 1, "eval.enabled": False})
    run = rlhf.RLHFTrainer(load_recipe(RLHFRecipe, QUICKSTART, args[1::2]))
    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row"):
        run.run()
    assert not list((tmp_path / "stops" / "checkpoints").glob("step-*"))



def test_rlhf_scores_at_the_reward_token_the_rm_was_trained_with(tmp_path, sft_checkpoint, tiny_rm, monkeypatch):
    """`align rm` stores its reward token beside the model; RLHF's router and the fast/slow-path comparisons then append it,
    so the RM is scored where it was trained to be (the token used to be dropped outside `align rm`)."""
    import align.trainers.rlhf as rlhf

    rm = tmp_path / "rm"
    shutil.copytree(tiny_rm, rm)
    info = json.loads((rm / "reward_stats.json").read_text())
    (rm / "reward_stats.json").write_text(json.dumps({**info, "reward_token": "<|im_start|>"}))
    folder = tmp_path / "comparisons"
    folder.mkdir()
    row = {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": "Final Answer: 4", "rejected": "Final Answer: 5", "condition": "math"}
    (folder / "labels.jsonl").write_text(json.dumps(row))
    seen = []
    real = rlhf.update_reward_model
    monkeypatch.setattr(rlhf, "update_reward_model", lambda model, pairs, *a, **k: seen.extend(pairs) or real(model, pairs, *a, **k))
    trainer = in_process_trainer(tmp_path, sft_checkpoint, rm, **{"ppo.comparisons_dir": str(folder), "ppo.rm_update_steps": 1})
    token = trainer.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert trainer.router.reward_token_id == token
    trainer.run_iteration(0)
    trainer.between_rounds(0)
    assert seen and all(p.chosen[-1] == token and p.rejected[-1] == token for p in seen)
    with pytest.raises(ValueError, match="was trained with '<\\|im_start\\|>'"):
        in_process_trainer(tmp_path / "other", sft_checkpoint, rm, **{"reward.reward_token": "<|endoftext|>"})


def test_fast_path_rm_update_keeps_fp32_master_weights_and_renormalises(tmp_path, sft_checkpoint, tiny_rm):
    """With a bf16 compute dtype the RM replica that the fast path trains stays fp32 (a 1e-5 AdamW step survives; in bf16
    most elements would round back), scores under autocast, and its per-condition stats are re-measured after the update."""
    folder = tmp_path / "comparisons"
    folder.mkdir()
    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+2?"}], "chosen": f"Final Answer: {i + 2}",
             "rejected": f"Final Answer: {i + 3}", "condition": "math"} for i in range(8)]  # fmt: skip
    (folder / "labels.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    from accelerate.state import AcceleratorState

    extra = {"model.dtype": "bfloat16", "ppo.comparisons_dir": str(folder), "ppo.rm_update_steps": 2, "ppo.rm_update_lr": 1e-5}
    AcceleratorState._reset_state(reset_partial_state=True)  # earlier in-process tests set fp32 mixed precision
    trainer = in_process_trainer(tmp_path, sft_checkpoint, tiny_rm, **extra)
    assert trainer.engine.dtype == torch.bfloat16 and trainer.reference.dtype == torch.bfloat16
    assert {p.dtype for p in trainer.reward_model.parameters()} == {torch.float32}
    before = {k: v.clone() for k, v in trainer.reward_model.state_dict().items()}
    stats_before = json.loads(json.dumps(trainer.router.stats))
    trainer.run_iteration(0)
    report = trainer.between_rounds(0)
    assert report["rm_update"]["steps"] == 2
    moved = [float((v != before[k]).float().mean()) for k, v in trainer.reward_model.state_dict().items() if v.is_floating_point()]
    assert max(moved) > 0.5  # most elements of the trained matrices moved
    assert trainer.router.stats == trainer.state.reward_stats == report["reward_stats"] != stats_before
    assert set(trainer.router.stats) <= {"math", "concise", "harmless"}
    AcceleratorState._reset_state(reset_partial_state=True)


def test_sampling_draws_from_the_full_distribution_not_transformers_default_top_k(sft_checkpoint):
    """The losses score samples with the full softmax: generation must not truncate it to transformers' top-k of 50."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.rollout.generation import HFGenerator, SamplingParams

    model, tok = AutoModelForCausalLM.from_pretrained(sft_checkpoint), AutoTokenizer.from_pretrained(sft_checkpoint)
    seen = {}
    real = model.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    model.generate = spy
    HFGenerator(model, tok, Accelerator(cpu=True)).generate([[{"role": "user", "content": "1+1?"}]], SamplingParams(4, 2, 1.0))
    assert seen["do_sample"] is True and seen["top_k"] == 0 and seen["top_p"] == 1.0
