"""Loss reductions against hand-computed values."""

import math

import pytest
import torch

from align.trainers.sft import weighted_nll
from data_builders.packing import collate_rows, token_weight
from data_builders.samples import Sample

# Two documents: A has 3 targets, B has 1 (loss_mask[0] never counts: nothing predicts it).
DOC_A = Sample([1, 2, 3, 4, 5], [0, 0, 1, 1, 1])
DOC_B = Sample([6, 7, 8], [0, 0, 1])
NLL_A = [1.0, 2.0, 3.0]
NLL_B = [4.0]


def reduced(reduction: str) -> float:
    batch = collate_rows([[DOC_A, DOC_B]], pad_id=0, reduction=reduction)
    mask = batch.targets != -100
    logprobs = -torch.tensor(NLL_A + NLL_B)
    weights = batch.weights[mask]
    total = float(weights.sum())
    return float(weighted_nll(logprobs, weights, total))


def test_token_mean():
    assert reduced("token") == pytest.approx((1 + 2 + 3 + 4) / 4)


def test_sample_mean():
    assert reduced("sample") == pytest.approx(((1 + 2 + 3) / 3 + 4 / 1) / 2)


def test_sqrt_reweighting_internvl3():
    wa, wb = 1 / math.sqrt(3), 1 / math.sqrt(1)
    expected = (wa * (1 + 2 + 3) + wb * 4) / (3 * wa + 1 * wb)
    assert reduced("sqrt") == pytest.approx(expected)


def test_weights_land_on_target_positions():
    batch = collate_rows([[DOC_A, DOC_B]], pad_id=0, reduction="sample")
    assert batch.targets[0, :8].tolist() == [-100, 3, 4, 5, -100, -100, 8, -100]
    assert batch.weights[0, :8].tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3, 0, 0, 1, 0])


def test_token_weight_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="unknown loss reduction"):
        token_weight(3, "median")


def test_split_normalisation_equals_whole_batch():
    """Shares of the step mean summed over micro-batches equal the mean over the whole batch."""
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    w = torch.tensor([1.0, 1.0, 0.5, 0.5, 2.0])
    whole = float(weighted_nll(-nll, w, float(w.sum())))
    parts = sum(float(weighted_nll(-nll[i:j], w[i:j], float(w.sum()))) for i, j in ((0, 2), (2, 5)))
    assert parts == pytest.approx(whole)


def test_token_mean_matches_transformers_labels_loss(tokenizer):
    """Same batch, same loss as `model(input_ids, labels=...)`, the loss TRL's SFTTrainer reports."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.losses.logprobs import target_logprobs
    from data_builders.render import render_conversation
    from data_builders.synthetic import SyntheticTask

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    docs = [render_conversation(tokenizer, r["messages"]) for r in SyntheticTask(1).sft_conversations(3)]
    samples = [Sample(d.input_ids, d.loss_mask) for d in docs]
    batch = collate_rows([[s] for s in samples], tokenizer.pad_token_id, "token")
    with torch.no_grad():
        logprobs, mask = target_logprobs(model, batch)
        ours = weighted_nll(logprobs, batch.weights[mask], float(batch.weights.sum()))
        labels = torch.full_like(batch.input_ids, -100)
        for r, s in enumerate(samples):
            labels[r, : len(s)] = torch.where(torch.tensor(s.loss_mask, dtype=torch.bool), torch.tensor(s.input_ids), -100)
        attention = (batch.doc_ids >= 0).long()
        reference = model(input_ids=batch.input_ids, attention_mask=attention, labels=labels).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
