"""Reward losses against hand-computed values, and Bradley-Terry parity with trl's RewardTrainer."""

import math

import pytest
import torch

from rewards.losses import bradley_terry, focal_ranking, log_barrier, pair_losses


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_with_margin_by_hand():
    c, r, m = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5]), torch.tensor([0.5, 0.0])
    expected = [-math.log(sig(2.0 - 1.0 - 0.5)), -math.log(sig(0.5 - 1.5))]
    torch.testing.assert_close(bradley_terry(c, r, m), torch.tensor(expected))


def test_focal_ranking_by_hand():
    c, r = torch.tensor([3.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    expected = []
    for d in (2.0, 0.0, -2.0):
        p = sig(d)
        expected.append(-((1 - 2 * max(0.0, p - 0.5)) ** 2) * math.log(p))
    torch.testing.assert_close(focal_ranking(c, r, gamma=2.0), torch.tensor(expected))
    # a wrongly ranked pair keeps full weight: equals Bradley-Terry there
    torch.testing.assert_close(focal_ranking(c[2:], r[2:]), bradley_terry(c[2:], r[2:]))


def test_log_barrier_by_hand_and_clamped():
    s = torch.tensor([0.0, 3.0, -4.0, 7.0])
    expected = [-(math.log(5) + math.log(5)), -(math.log(8) + math.log(2)), -(math.log(1) + math.log(9)),
                -(math.log(10 - 1e-3) + math.log(1e-3))]
    torch.testing.assert_close(log_barrier(s), torch.tensor(expected), rtol=1e-4, atol=1e-4)  # fp32 at the clamp
    assert torch.isfinite(log_barrier(torch.tensor([5.0, -5.0, 1e6]))).all()


def test_total_is_rank_plus_lambda_mean_penalty():
    c, r = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0])
    total = pair_losses("focal_ranking", c, r, gamma=2.0, barrier_weight=0.02).mean()
    expected = focal_ranking(c, r).mean() + 0.02 * torch.cat([log_barrier(c), log_barrier(r)]).mean()
    torch.testing.assert_close(total, expected)


def test_unknown_loss_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown loss 'hinge_rm'"):
        pair_losses("hinge_rm", torch.zeros(1), torch.zeros(1))


def test_bradley_terry_matches_trl_reward_trainer(tmp_path, tokenizer):
    import datasets
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from rewards.model import sequence_scores

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForSequenceClassification(cfg)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    rows = [{"chosen": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "Final Answer: 2"}],
             "rejected": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "Final Answer: 3"}]}] * 2
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, max_length=64)
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=datasets.Dataset.from_list(rows))
    seqs = [[5, 6, 7, 8, 9], [5, 6, 7], [10, 11, 12, 13], [10, 11]]  # chosen_1, chosen_2, rejected_1, rejected_2
    width = max(map(len, seqs))
    input_ids = torch.full((4, width), tokenizer.pad_token_id)
    attention = torch.zeros((4, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)], attention[i, : len(s)] = torch.tensor(s), 1
    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, {"input_ids": input_ids, "attention_mask": attention})
        scores = sequence_scores(model, input_ids, attention)
    ours = bradley_terry(scores[:2], scores[2:]).mean()
    torch.testing.assert_close(ours, trl_loss, rtol=1e-6, atol=1e-6)
