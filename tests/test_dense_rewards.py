"""A process reward model as an RL reward route: each step's score lands on the token that closes the step (dense
rewards into GAE or REINFORCE++'s returns), and leaves the sequence score, which keeps the other routes' parts."""

from __future__ import annotations

import pytest
import torch

from align.rollout.buffer import Rollout
from align.rollout.experience import assign_advantages
from align.rollout.process_rewards import dense_step_rewards, outcome_reward

WEIGHT = 0.5


@pytest.fixture(scope="module")
def tiny_prm(sft_checkpoint, tmp_path_factory):
    from align.config import ModelConfig
    from align.engine.models import load_reward_model, load_tokenizer
    from rewards.conditions import DEFAULT_CONDITIONS
    from rewards.prm import SYNTHETIC_SEPARATOR, PRMInfo

    out = tmp_path_factory.mktemp("prm") / "model"
    cfg = ModelConfig(name_or_path=str(sft_checkpoint))
    tok = load_tokenizer(cfg)
    model = load_reward_model(cfg, tok)
    with torch.no_grad():
        torch.manual_seed(1)
        torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    PRMInfo(SYNTHETIC_SEPARATOR, dict(DEFAULT_CONDITIONS)).write(out)
    return out


def test_dense_rewards_enter_gae_at_their_tokens():
    r = Rollout([1], [5, 6, 7], [], "", "p", 0, logprobs=torch.zeros(3), ref_logprobs=torch.zeros(3), values=torch.zeros(3))
    assign_advantages([r], torch.tensor([1.0]), 0.0, "k1", gamma=1.0, lam=1.0, dense=[torch.tensor([0.0, 0.25, 0.0])])
    assert r.advantages.tolist() == [1.25, 1.25, 1.0]  # γ = λ = 1, V = 0: the reward to go


def test_prm_step_scores_are_token_rewards_and_leave_the_sequence_score(tmp_path, sft_checkpoint, tiny_rm, tiny_prm):
    from rewards.prm import step_spans
    from tests.test_rlhf import in_process_trainer

    routes = f"{{default: {{rm: 1.0, prm: {WEIGHT}}}}}"
    trainer = in_process_trainer(tmp_path, sft_checkpoint, tiny_rm, **{"ppo.routes": routes, "ppo.process_reward_model": str(tiny_prm),
                                                                       "ppo.critic_warmup_iterations": 0, "ppo.rm_update_steps": 0})  # fmt: skip
    assert trainer.ppo.dense_process_rewards and trainer.router.process_scorer is not None
    trainer.run_iteration(0)
    rollouts = trainer.buffer.rollouts
    dense = dense_step_rewards(trainer.router, rollouts)
    scorer, separator = trainer.router.process_scorer, trainer.router.process_scorer.info.step_separator
    samples = [{"condition": r.condition or "default", "prompt": r.prompt, "response": r.response} for r in rollouts]
    for r, tokens, probabilities in zip(rollouts, dense, scorer.step_scores(samples), strict=True):
        assert len(tokens) == len(r.response_ids)
        assert int((tokens != 0).sum()) <= len(step_spans(r.response, separator)) + 1  # one closing token per step (+ end of turn)
        assert float(tokens.sum()) == pytest.approx(WEIGHT * sum(probabilities), abs=1e-5)
        assert outcome_reward(trainer.router, r, trainer.ppo.dense_process_rewards) == pytest.approx(r.reward - WEIGHT * r.reward_parts["prm"])
        assert r.reward_parts["prm"] == pytest.approx(sum(probabilities) / len(probabilities), abs=1e-5)  # the mean aggregate


def test_prm_routes_need_a_process_reward_model():
    from align.config import ConfigError, RLHFRecipe, load_recipe

    with pytest.raises(ConfigError, match="ppo.process_reward_model: is null but ppo.routes use 'prm'"):
        load_recipe(RLHFRecipe, None, ["ppo.routes={default: {rm: 1.0, prm: 0.5}}"])
    grpo = load_recipe(RLHFRecipe, None, ["ppo.routes={default: {prm: 1.0}}", "ppo.process_reward_model=x", "ppo.reward_model=null",
                                          "ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4"])  # fmt: skip
    assert not grpo.ppo.dense_process_rewards  # a group baseline over sequences: the aggregate joins the sequence score
