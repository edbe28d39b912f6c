"""Shared-prefix pair rows: layout, mask, and scores equal to separate forwards (sdpa and eager)."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from data_builders.pair_rows import collate_pair_rows, pack_pair_units, shared_prefix_length, unit_length
from rewards.model import pair_scores, sequence_scores


def test_shared_prefix_length_keeps_one_own_token_per_side():
    assert shared_prefix_length([1, 2, 3, 4], [1, 2, 5]) == 2
    assert shared_prefix_length([1, 2, 3], [1, 2, 3, 4]) == 2  # chosen is a prefix of rejected: keep its last token
    assert shared_prefix_length([1, 2], [1, 2]) == 1
    assert shared_prefix_length([7], [8, 9]) == 0
    assert unit_length([1, 2, 3, 4], [1, 2, 5], True) == 5 and unit_length([1, 2, 3, 4], [1, 2, 5], False) == 7


def test_layout_positions_and_mask():
    rows = collate_pair_rows([[([1, 2, 3, 4], [1, 2, 5]), ([6, 7], [8])]], pad_id=0, multiple_of=4)
    a, b = rows.spans
    assert (a.start, a.prefix, a.chosen, a.rejected) == (0, 2, 2, 1) and (b.start, b.prefix, b.chosen, b.rejected) == (5, 0, 2, 1)
    assert rows.input_ids[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert rows.position_ids[0].tolist() == [0, 1, 2, 3, 2, 0, 1, 0]  # rejected continues from the prefix
    assert a.rejected_index() == [0, 1, 4] and a.chosen_index() == [0, 1, 2, 3]
    assert rows.ends().tolist() == [[0, 3], [0, 4], [0, 6], [0, 7]]
    assert (rows.num_tokens, rows.sequence_tokens) == (8, 10)
    m = rows.attention_mask[0, 0]
    assert m[4].tolist() == [True, True, False, False, True, False, False, False]  # rejected: prefix + itself, not chosen
    assert m[3].tolist() == [True, True, True, True, False, False, False, False]
    assert m[6].tolist() == [False] * 5 + [True, True, False]  # second unit sees nothing of the first
    assert m[7].tolist() == [False] * 7 + [True]  # its rejected shares no prefix: only itself


def test_padding_rows_attend_to_themselves_only():
    rows = collate_pair_rows([[([1, 2, 3], [1, 2, 4])], [([5, 6], [7])]], pad_id=0, multiple_of=8)
    m = rows.attention_mask[:, 0]
    assert m.any(-1).all(), "a fully masked query row makes sdpa return NaN"
    assert not m[1, 3:, :3].any() and m[1, 5, 5]


def test_long_unit_gets_its_own_row_not_dropped():
    bins = pack_pair_units([30, 10, 9, 5], capacity=20)
    assert sorted(sorted(b) for b in bins) == [[0], [1, 2], [3]]


def random_pairs(rng, n, vocab):
    pairs = []
    for _ in range(n):
        prefix = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))]
        c = prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 6))]
        r = prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 6))]
        pairs.append((c, r))
    return pairs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_shared_prefix_scores_equal_separate_forwards(attn):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_labels=1, pad_token_id=0, attn_implementation=attn)
    model = LlamaForSequenceClassification(cfg).eval()
    torch.nn.init.normal_(model.score.weight)
    pairs = random_pairs(random.Random(1), 7, 50)
    rows = [pairs[:3], pairs[3:4], pairs[4:]]  # several units per row, and a lone unit padded to the longest row
    shared_c, shared_r = pair_scores(model, collate_pair_rows(rows, 0, share_prefix=True))
    plain_c, plain_r = pair_scores(model, collate_pair_rows(rows, 0, share_prefix=False))
    ref = torch.stack([torch.cat([sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in pair])
                       for pair in pairs])
    torch.testing.assert_close(torch.stack([shared_c, shared_r], 1), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack([plain_c, plain_r], 1), ref, rtol=1e-5, atol=1e-5)


def test_shared_prefix_gradients_equal_separate_forwards():
    """The backward pass sees the same function: the prefix's gradient is the sum over both sides."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_labels=1, pad_token_id=0)
    model = LlamaForSequenceClassification(cfg)
    pairs = random_pairs(random.Random(2), 4, 50)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    c, r = pair_scores(model, collate_pair_rows([pairs[:2], pairs[2:]], 0, share_prefix=True))
    shared = grads((c - 2 * r).sum())
    sep = [torch.cat([sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in p]) for p in pairs]
    separate = grads(sum(s[0] - 2 * s[1] for s in sep))
    torch.testing.assert_close(shared, separate, rtol=1e-4, atol=1e-5)
