"""PPO pieces against hand-computed values: KL estimators, token rewards, GAE, clipped policy and value losses."""

from __future__ import annotations

import math

import pytest
import torch

from align.losses.ppo import explained_variance, gae, kl_estimate, policy_loss, token_rewards, value_loss


def test_kl_estimators_by_hand():
    lp, ref = torch.tensor([0.1, -0.2]), torch.tensor([0.0, 0.0])
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), torch.tensor([0.1, -0.2]))
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), torch.tensor([math.exp(-0.1) - 1 + 0.1, math.exp(0.2) - 1 - 0.2]))
    assert (kl_estimate(torch.randn(100), torch.randn(100), "k3") >= 0).all()  # k3 is never negative
    with pytest.raises(ValueError, match="k1 or k3"):
        kl_estimate(lp, ref, "k2")


def test_token_rewards_put_the_score_on_the_last_response_token():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards = token_rewards(torch.tensor([2.0, -1.0]), torch.tensor([[0.1, 0.2, 9.0], [0.0, 0.0, 0.5]]), mask, kl_coef=0.01)
    torch.testing.assert_close(rewards, torch.tensor([[-0.001, 2.0 - 0.002, 0.0], [0.0, 0.0, -1.0 - 0.005]]))


def test_gae_by_hand_and_padding_is_inert():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.6, 0.7, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.9)
    torch.testing.assert_close(adv, torch.tensor([[0.433, 0.37, 0.3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.933, 0.97, 1.0, 0.0]]))
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)  # λ = 1: return-to-go minus value
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.4, 0.3, 0.0]]))
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=0.0)  # λ = 0: one-step TD error
    torch.testing.assert_close(adv, torch.tensor([[0.5 * 0.6 - 0.5, 0.5 * 0.7 - 0.6, 1.0 - 0.7, 0.0]]))


def test_policy_loss_clips_by_hand():
    lp, old = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, 0.0]])
    loss, clip_fraction = policy_loss(lp, old, torch.tensor([[1.0, -1.0]]), torch.tensor([[1, 1]]), clip=0.2)
    assert loss.item() == pytest.approx((-1.2 + math.exp(0.5)) / 2)  # A>0 is clipped at 1.2; A<0 keeps the larger ratio
    assert clip_fraction.item() == pytest.approx(0.5)


def test_value_loss_with_and_without_clipping_by_hand():
    v, old, ret, mask = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.5, 1.0]]), torch.tensor([[1, 1]])
    assert value_loss(v, old, ret, mask).item() == pytest.approx(0.5 * (0.25 + 1.0) / 2)
    # clipping: V may move only 0.2 from the old value, and the larger error counts
    v, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert value_loss(v, old, ret, mask).item() == pytest.approx(0.5 * (0.0 + 1.0) / 2)
    assert value_loss(v, old, ret, mask, clip=0.2).item() == pytest.approx(0.5 * ((0.2 - 1.0) ** 2 + 1.0) / 2)


def test_explained_variance():
    ret, mask = torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), ret, mask) == pytest.approx(0.0)


def test_internlm2_cool_rlhf_recipe_matches_paper():
    from align.config import RLHFRecipe, load_recipe
    from tests.conftest import ROOT

    r = load_recipe(RLHFRecipe, ROOT / "configs" / "recipes" / "internlm2_cool_rlhf.yaml")
    p = r.ppo
    assert (r.optim.lr, p.critic_lr, p.kl_coef, p.lam, p.gamma, p.top_p) == (1e-6, 5e-6, 0.01, 0.99, 1.0, 0.9)
    assert (p.critic_warmup_iterations, p.ptx_coef, p.rounds, p.value_clip, p.whiten_advantages) == (50, 0.5, 3, None, False)
