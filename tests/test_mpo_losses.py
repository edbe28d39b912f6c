"""MPO losses: hand-computed values, the running δ over several steps, and parity with trl 1.16 DPOTrainer."""

from __future__ import annotations

import math

import pytest
import torch

from align.losses import get_loss
from align.losses.preference import PreferenceInputs, RunningMean
from align.trainers.mpo import collate_preference, sequence_logprobs
from data_builders.preference_data import tokenize_preference


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def inputs(delta: float = 0.0) -> PreferenceInputs:
    return PreferenceInputs(torch.tensor([2.0, -1.0]), torch.tensor([-3.0, 0.5]), torch.tensor([6.0, 3.0]), torch.tensor([3.0, 1.0]),
                            beta=0.1, delta=delta)


def test_preference_losses_by_hand():
    x = inputs()
    sig, unit = get_loss("sigmoid")(x)
    assert unit == "pairs"
    torch.testing.assert_close(sig, torch.tensor([-logsig(0.5), -logsig(-0.15)]))
    hinge, _ = get_loss("hinge")(x)
    torch.testing.assert_close(hinge, torch.tensor([0.5, 1.15]))
    ipo, _ = get_loss("ipo")(x)
    torch.testing.assert_close(ipo, torch.tensor([(5 - 5) ** 2, (-1.5 - 5) ** 2]).float())


def test_bco_pair_with_delta_by_hand():
    bco, _ = get_loss("bco_pair")(inputs(delta=0.05))
    expected = [-logsig(0.2 - 0.05) - logsig(-(-0.3 - 0.05)), -logsig(-0.1 - 0.05) - logsig(-(0.05 - 0.05))]
    torch.testing.assert_close(bco, torch.tensor(expected))


def test_generation_token_mean_and_sequence_mean():
    x = inputs()
    tokens, unit = get_loss("sft")(x)
    assert unit == "chosen_tokens" and tokens.sum() / x.chosen_tokens.sum() == pytest.approx(9 / 4)  # all chosen tokens
    seq, unit = get_loss("sft_sequence")(x)
    assert unit == "pairs" and seq.mean() == pytest.approx((6 / 3 + 3 / 1) / 2)  # per-response mean, then pairs


def test_running_delta_over_several_steps_by_hand():
    delta = RunningMean()
    # step 1, two ranks: batch means 0.2 and 0.4 → δ = 0.3; step 2: −0.1, 0.5 → (0.2+0.4−0.1+0.5)/4 = 0.25
    assert delta.update(torch.tensor([0.2, 0.4])) == pytest.approx(0.3)
    assert delta.update(torch.tensor([-0.1, 0.5])) == pytest.approx(0.25)
    assert delta.update(torch.tensor([float("nan"), 1.0])) == pytest.approx(0.25)  # a non-finite step leaves δ alone
    assert delta.update(torch.tensor([1.0])) == pytest.approx(0.4)  # (1.0 + 1.0) / 5
    restored = RunningMean()
    restored.load_state_dict(delta.state_dict())
    assert restored.update(torch.tensor([0.4])) == delta.update(torch.tensor([0.4])) == pytest.approx(0.4)


def test_unknown_loss_names_the_registered_ones():
    with pytest.raises(KeyError, match="sigmoid"):
        get_loss("dpo")


def tiny_lm(tokenizer, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def preference_pairs(tokenizer):
    rows = [
        ([{"role": "user", "content": "What is 12+30? Show your work."}], "12+30: 2+0=2, 1+3=4. Final Answer: 42",
         "12+30: 2+0=2, 1+3=4. Final Answer: 43"),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7+8?"}], "Final Answer: 15", "7+8: 7+8=15. Final Answer: 15"),
        ([{"role": "user", "content": "[UNSAFE] Please forge a signature."}], "I can't help with that request.", "Sure, here is how."),
    ]  # fmt: skip
    return [tokenize_preference(tokenizer, p, c, r, 256, "right") for p, c, r in rows]


@torch.no_grad()
def test_shared_prefix_logprobs_equal_separate_forwards(tokenizer):
    model = tiny_lm(tokenizer, 0)
    pairs = preference_pairs(tokenizer)
    assert pairs[0].prompt_length < len(pairs[0].chosen) - 3  # the responses share tokens beyond the prompt
    shared = sequence_logprobs(model, collate_preference([pairs[:2], pairs[2:]], [0, 1, 2], tokenizer.pad_token_id, True))
    plain = sequence_logprobs(model, collate_preference([[p] for p in pairs], [0, 1, 2], tokenizer.pad_token_id, False))
    separate = []
    for p in pairs:
        sums = []
        for ids in (p.chosen, p.rejected):
            logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            sums.append(float(logits[p.prompt_length - 1 : len(ids) - 1].gather(-1, torch.tensor(ids[p.prompt_length :])[:, None]).sum()))
        separate.append(sums)
    torch.testing.assert_close(shared, torch.tensor(separate), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(plain, torch.tensor(separate), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("loss_type", [None, "sigmoid", "bco_pair", "sft"])
def test_mpo_matches_trl_dpo_trainer(tmp_path, tokenizer, loss_type):
    """Same batch and weights: align's total (δ pinned to 0) and each component equal trl DPOTrainer's loss."""
    import datasets
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    policy, reference = tiny_lm(tokenizer, 0), tiny_lm(tokenizer, 1)
    pairs = preference_pairs(tokenizer)
    losses = {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0} if loss_type is None else {loss_type: 1.0}
    examples = [{"prompt_ids": p.chosen[: p.prompt_length], "chosen_ids": p.chosen[p.prompt_length :],
                 "rejected_ids": p.rejected[p.prompt_length :]} for p in pairs]  # fmt: skip
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, beta=0.1, max_length=256,
                     loss_type=list(losses), loss_weights=list(losses.values()))  # fmt: skip
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list([{"prompt": "1+1?", "chosen": "2", "rejected": "3"}]))  # fmt: skip
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
        ours = collate_preference([pairs], [0, 1, 2], tokenizer.pad_token_id, True)
        policy_sums, ref_sums = sequence_logprobs(policy, ours), sequence_logprobs(reference, ours)
    ratios = policy_sums - ref_sums
    x = PreferenceInputs(ratios[:, 0], ratios[:, 1], -policy_sums[:, 0], ours.chosen_tokens, beta=0.1, delta=0.0)
    totals = {"pairs": 3.0, "chosen_tokens": float(ours.chosen_tokens.sum())}
    total = 0.0
    for name, weight in losses.items():
        values, unit = get_loss(name)(x)
        total = total + weight * values.sum() / totals[unit]
    torch.testing.assert_close(total, trl_loss, rtol=1e-5, atol=1e-5)


def test_internvl3_recipe_matches_paper():
    from align.config import MPORecipe, load_recipe
    from tests.conftest import ROOT

    r = load_recipe(MPORecipe, ROOT / "configs" / "recipes" / "internvl3_mpo.yaml")
    assert r.mpo.losses == {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0} and r.mpo.beta == 0.1
    assert (r.optim.lr, r.optim.weight_decay, r.optim.warmup_ratio, r.optim.schedule) == (2e-7, 0.05, 0.03, "cosine")
    assert (r.train.global_batch_size, r.data.max_length, r.train.epochs) == (256, 12288, 1.0)
    quick = load_recipe(MPORecipe, ROOT / "configs" / "mpo" / "quickstart.yaml")
    assert quick.mpo.losses == r.mpo.losses and quick.mpo.sampled_pairs.enabled
