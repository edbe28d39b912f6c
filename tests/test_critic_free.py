"""Critic-free RL on the PPO loop: GRPO, RLOO and REINFORCE++-baseline advantages against hand-computed values, the loss
normalisations against TRL's formulas, and runs that build no critic (and no reference without a KL)."""

from __future__ import annotations

import math

import pytest
import torch

from align.losses.advantages import grpo_advantages, k3_kl, returns_to_go, rloo_advantages, token_loss_weights
from align.rollout.buffer import Rollout
from align.rollout.experience import assign_group_advantages

SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])  # two prompts, four samples each


def test_grpo_advantages_by_hand():
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: mean 2.75, std 1.5
    s1, s2 = math.sqrt(1 / 3), 1.5
    expected = [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4),
                -0.75 / (s2 + 1e-4), -0.75 / (s2 + 1e-4), -0.75 / (s2 + 1e-4), 2.25 / (s2 + 1e-4)]  # fmt: skip
    torch.testing.assert_close(grpo_advantages(SCORES, 4), torch.tensor(expected), rtol=0, atol=1e-6)
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5, -0.75, -0.75, -0.75, 2.25])
    torch.testing.assert_close(grpo_advantages(SCORES, 4, "none"), centred)
    batch_std = float(SCORES.std())  # over the whole batch (every rank's scores, in a run)
    torch.testing.assert_close(grpo_advantages(SCORES, 4, "batch", batch_std), centred / (batch_std + 1e-4))
    assert torch.equal(grpo_advantages(torch.full((4,), 3.0), 4), torch.zeros(4))  # a group of equal scores teaches nothing
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        grpo_advantages(SCORES, 3)


def test_rloo_baseline_leaves_the_sample_out():
    # r_i − mean of the other three: group 1 [1 − 1/3, 0 − 2/3, 0 − 2/3, 1 − 1/3]; group 2 [2 − 3, 2 − 3, 2 − 3, 5 − 2]
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, -1.0, -1.0, -1.0, 3.0])
    torch.testing.assert_close(rloo_advantages(SCORES, 4), expected)
    torch.testing.assert_close(rloo_advantages(SCORES, 4), grpo_advantages(SCORES, 4, "none") * 4 / 3)  # k/(k−1) × centred


def test_returns_to_go_and_k3():
    rewards = torch.tensor([[0.1, 0.2, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])
    torch.testing.assert_close(returns_to_go(rewards, mask, 1.0), torch.tensor([[1.3, 1.2, 1.0, 0.0], [0.5, 0, 0, 0]]))
    torch.testing.assert_close(returns_to_go(rewards, mask, 0.5), torch.tensor([[0.1 + 0.5 * (0.2 + 0.5), 0.2 + 0.5, 1.0, 0], [0.5, 0, 0, 0]]))
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(k3_kl(logp, ref), torch.exp(ref - logp) - (ref - logp) - 1)
    assert torch.equal(k3_kl(logp, logp), torch.zeros(2))


def _rollouts(lengths, logprobs=None, ref=None):
    out = []
    for i, n in enumerate(lengths):
        lp = torch.full((n,), -1.0) if logprobs is None else logprobs[i]
        out.append(Rollout([1, 2], list(range(3, 3 + n)), [], "", f"p{i // 2}", 0, logprobs=lp, ref_logprobs=lp if ref is None else ref[i]))
    return out


def test_group_advantages_reach_every_token_and_the_kl_goes_into_the_score():
    rollouts = _rollouts([2, 3, 1, 2])
    scores = torch.tensor([1.0, 0.0, 3.0, 1.0])
    assign_group_advantages(rollouts, scores, "rloo", 2, kl_coef=0.0, kl_estimator="k1")
    assert [r.advantages.tolist() for r in rollouts] == [[1.0, 1.0], [-1.0, -1.0, -1.0], [2.0], [-2.0, -2.0]]
    # k1 KL of 0.5 per token, coefficient 0.2: rollout 0 loses 0.2 (2 tokens), rollout 1 0.3 (3 tokens)
    rollouts = _rollouts([2, 3, 1, 2], ref=[torch.full((n,), -1.5) for n in (2, 3, 1, 2)])
    kl = assign_group_advantages(rollouts, scores, "rloo", 2, kl_coef=0.2, kl_estimator="k1")
    torch.testing.assert_close(kl, torch.tensor([1.0, 1.5, 0.5, 1.0]))
    torch.testing.assert_close(rollouts[0].advantages, torch.full((2,), (1.0 - 0.2) - (0.0 - 0.3)))


def test_reinforce_baseline_is_the_centred_score_to_go_with_the_kl_per_token():
    rollouts = _rollouts([2, 2], ref=[torch.tensor([-1.5, -1.0]), torch.tensor([-1.0, -1.0])])
    assign_group_advantages(rollouts, torch.tensor([2.0, 0.0]), "reinforce_baseline", 2, kl_coef=0.1, kl_estimator="k1")
    # rollout 0: centred score +1 at its last token, −0.1·KL per token (KL = 0.5, 0): returns to go [1 − 0.05, 1]
    torch.testing.assert_close(rollouts[0].advantages, torch.tensor([0.95, 1.0]))
    torch.testing.assert_close(rollouts[1].advantages, torch.tensor([-1.0, -1.0]))


def _trl_reduction(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int) -> torch.Tensor:
    """TRL GRPOTrainer's aggregation for one micro-batch and one process (grpo_trainer.py, `_compute_loss`)."""
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    return (per_token * mask).sum() / mask.sum()  # dapo: the accumulated batch's tokens (here one micro-batch)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_loss_weights_give_trls_aggregation(loss_type):
    lengths = [3, 1, 4]
    per_token = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    totals = {"tokens": 8.0, "sequences": 3.0, "micro_batches": 1.0}
    [weights] = token_loss_weights([[(n, True) for n in lengths]], loss_type, totals, max_new_tokens=6)
    ours = sum((per_token[i, :n] * w).sum() for i, (n, w) in enumerate(zip(lengths, weights, strict=True)))
    torch.testing.assert_close(ours, _trl_reduction(per_token, mask, loss_type, 6))


def test_loss_weights_over_a_step_of_several_micro_batches_and_untrained_rollouts():
    micro = [[(2, True), (3, False)], [(1, True), (4, True)]]
    totals = {"tokens": 7.0, "sequences": 3.0, "micro_batches": 2.0}
    dapo = token_loss_weights(micro, "dapo", totals, 8)
    assert dapo[0][1].tolist() == [0.0, 0.0, 0.0]  # a dropped truncated answer trains nothing
    assert sum(float(w.sum()) for part in dapo for w in part) == pytest.approx(1.0)  # a token mean over the step
    grpo = token_loss_weights(micro, "grpo", totals, 8)
    assert [float(w.sum()) for part in grpo for w in part] == pytest.approx([1 / 3, 0.0, 1 / 3, 1 / 3])  # each sequence counts once
    bnpo = token_loss_weights(micro, "bnpo", totals, 8)
    assert [float(w.sum()) for part in bnpo for w in part] == pytest.approx([0.5, 0.0, 0.1, 0.4])  # micro-batch means, averaged


# ----------------------------------------------------------------------------- runs on the PPO loop
def _trainer(tmp_path, sft, rm, **extra):
    from tests.test_rlhf import in_process_trainer

    base = {"ppo.advantage_estimator": "grpo", "ppo.ptx_coef": 0, "ppo.rm_update_steps": 0, "ppo.mini_batches": 1, "ppo.ppo_epochs": 1,
            "ppo.routes": "{default: {rm: 1.0}}", "ppo.kl_coef": 0.0, "ppo.normalize_reward": False, "ppo.critic_warmup_iterations": 0}  # fmt: skip
    return in_process_trainer(tmp_path, sft, rm, **(base | extra))


def test_grpo_builds_no_critic_and_no_reference_without_a_kl(tmp_path, sft_checkpoint, tiny_rm):
    """Scored by the reward model (a seeded random head: scores differ within a group), trained without a critic."""
    trainer = _trainer(tmp_path, sft_checkpoint, tiny_rm)
    assert trainer.critic is None and trainer.reference is None and trainer.reward_model is not None and trainer.on_policy
    params = {n for n, _ in trainer.model.named_parameters()}
    assert params and all(n.startswith("actor.") for n in params)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.run_iteration(0)
    assert "value_loss" not in metrics and math.isfinite(metrics["policy_loss"]) and metrics["actor_trained"] == 1.0
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    fresh = [r for r in trainer.buffer.rollouts if r.advantages is not None]
    groups = [fresh[i : i + trainer.ppo.samples_per_prompt] for i in range(0, len(fresh), trainer.ppo.samples_per_prompt)]
    for group in groups:  # the same advantage on each token of a sample, and a group's advantages sum to 0
        assert all(torch.all(r.advantages == r.advantages[0]) for r in group)
        assert abs(sum(float(r.advantages[0]) for r in group)) < 1e-4


def test_verifier_only_grpo_loads_no_reward_model(tmp_path, sft_checkpoint):
    trainer = _trainer(tmp_path, sft_checkpoint, "unused", **{"ppo.routes": "{default: {task: 1.0}}", "ppo.reward_model": "null"})
    assert trainer.reward_model is None and trainer.critic is None and trainer.router.routes == {"default": {"task": 1.0}}


def test_on_policy_shortcut_equals_recomputing_the_old_logprobs(tmp_path, sft_checkpoint, tiny_rm, monkeypatch):
    """One step per iteration: the detached forward's own log-probs as the old ones give the update the separate
    old-log-prob pass would (ratio 1, same gradient), one forward cheaper."""
    import align.trainers.rlhf as rlhf

    states = []
    for shortcut in (True, False):
        monkeypatch.setattr(rlhf.RLHFTrainer, "on_policy", property(lambda self, s=shortcut: s))
        trainer = _trainer(tmp_path / str(shortcut), sft_checkpoint, tiny_rm, **{"ppo.kl_coef": 0.05, "ppo.kl_penalty": "loss"})
        trainer.run_iteration(0)
        states.append(trainer.model.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=2e-6)


def test_critic_free_settings_are_checked_in_the_recipe():
    from align.config import ConfigError, RLHFRecipe, load_recipe

    def load(**over):
        return load_recipe(RLHFRecipe, None, [f"{k}={v}" for k, v in over.items()])

    assert load(**{"ppo.advantage_estimator": "grpo", "ppo.samples_per_prompt": 4}).ppo.critic_warmup_iterations == 0
    assert load().ppo.critic_warmup_iterations == 50  # with a critic: InternLM2's warm-up
    with pytest.raises(ConfigError, match="ppo.samples_per_prompt: must be >= 2 for rloo"):
        load(**{"ppo.advantage_estimator": "rloo", "ppo.samples_per_prompt": 1})
    with pytest.raises(ConfigError, match="ppo.critic_warmup_iterations: must be 0 or null: grpo trains no critic"):
        load(**{"ppo.advantage_estimator": "grpo", "ppo.samples_per_prompt": 4, "ppo.critic_warmup_iterations": 3})
    with pytest.raises(ConfigError, match="ppo.reward_model: is null but ppo.routes use 'rm'"):
        load(**{"ppo.advantage_estimator": "grpo", "ppo.samples_per_prompt": 4, "ppo.reward_model": "null"})
    with pytest.raises(ConfigError, match="ppo.reward_model: is null but the gae critic starts from it"):
        load(**{"ppo.reward_model": "null", "ppo.routes": "{default: {task: 1.0}}"})


def test_a_crashed_grpo_run_resumes_to_the_same_weights_metrics_and_buffer(tmp_path, sft_checkpoint, tiny_rm, monkeypatch):
    """Checkpoints of a critic-free run (no critic, no reference, placeholders in the buffer) resume exactly."""
    import json

    import align.trainers.rlhf as rlhf
    from align.config import RLHFRecipe, load_recipe
    from tests.test_rlhf import QUICKSTART, rlhf_overrides

    extra = {"ppo.advantage_estimator": "grpo", "ppo.ptx_coef": 0, "ppo.rm_update_steps": 0, "ppo.mini_batches": 1, "ppo.ppo_epochs": 1,
             "ppo.routes": "{default: {rm: 1.0}}", "ppo.kl_coef": 0.02, "ppo.critic_warmup_iterations": 0, "ppo.rounds": 1,
             "ppo.iterations_per_round": 3, "train.save_every": 1, "eval.enabled": False, "ppo.scale_rewards": "batch"}  # fmt: skip

    def recipe(out):
        return load_recipe(RLHFRecipe, QUICKSTART, rlhf_overrides(out, sft_checkpoint, tiny_rm, **extra)[1::2])

    full = rlhf.RLHFTrainer(recipe(tmp_path / "full")).run()
    real, calls = rlhf.RLHFTrainer.run_iteration, {"n": 0}

    def crash_at_the_third(self, iteration):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed after the checkpoint of iteration 2
        return real(self, iteration)

    monkeypatch.setattr(rlhf.RLHFTrainer, "run_iteration", crash_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        rlhf.RLHFTrainer(recipe(tmp_path / "crashed")).run()
    calls["n"] = -100  # no more crashes; count what the resumed run does
    resumed = rlhf.RLHFTrainer(recipe(tmp_path / "crashed")).run()
    assert calls["n"] == -99  # it resumed after iteration 2: one iteration left to run
    assert full["critic_path"] is None and not (tmp_path / "full" / "critic").exists()
    assert json.dumps(full["metrics"]) == json.dumps(resumed["metrics"]) and full["optimizer_steps"] == resumed["optimizer_steps"] == 3
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("full", "crashed"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "rollouts-rank0.json").read_text() == (tmp_path / "crashed" / "rollouts-rank0.json").read_text()
    ma = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    mb = {r["step"]: r for r in map(json.loads, (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines())}
    assert all(rec["policy_loss"] == mb[rec["step"]]["policy_loss"] and rec["kl_loss"] == mb[rec["step"]]["kl_loss"] for rec in ma)


def test_rloo_runs_rounds_with_the_fast_path_updating_the_reward_model(tmp_path, sft_checkpoint, tiny_rm):
    """Critic-free, the rounds still end in COOL RLHF's fast and slow paths: detectors, comparisons, a reward-model update."""
    import json

    import align.trainers.rlhf as rlhf
    from align.config import RLHFRecipe, load_recipe
    from tests.test_rlhf import QUICKSTART, rlhf_overrides

    folder = tmp_path / "comparisons"  # the slow path: one externally labelled pair, so the update always has data
    folder.mkdir()
    row = {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": "Final Answer: 4", "rejected": "Final Answer: 5", "condition": "math"}
    (folder / "labels.jsonl").write_text(json.dumps(row))
    extra = {"ppo.advantage_estimator": "rloo", "ppo.critic_warmup_iterations": 0, "ppo.rounds": 2, "ppo.iterations_per_round": 1,
             "ppo.rm_update_steps": 2, "eval.enabled": False, "ppo.routes": "{default: {rm: 1.0, task: 1.0}}",
             "ppo.comparisons_dir": str(folder)}  # fmt: skip
    trainer = rlhf.RLHFTrainer(load_recipe(RLHFRecipe, QUICKSTART, rlhf_overrides(tmp_path / "run", sft_checkpoint, tiny_rm, **extra)[1::2]))
    before = {k: v.clone() for k, v in load_reward(tiny_rm).items()}
    summary = trainer.run()
    report = summary["rounds"][0]
    assert summary["critic_path"] is None and len(summary["rounds"]) == 1 and report["slow_path_pairs"] == 1 and "rm_update" in report
    after = load_reward(tmp_path / "run" / "reward_model")  # the updated replica is exported beside the policy
    assert any(not torch.equal(before[k], after[k]) for k in before)


def load_reward(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))
