"""Packing: rows never mix documents' attention, and packed per-document loss equals unpacked loss."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from align.losses.logprobs import target_logprobs
from data_builders.packing import collate_rows, pack_best_fit
from data_builders.render import render_conversation
from data_builders.samples import Sample
from data_builders.synthetic import SyntheticTask


def tiny_model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    return LlamaForCausalLM(cfg).eval()


def samples(tokenizer, n=6):
    rows = SyntheticTask(3).sft_conversations(n)
    out = []
    for row in rows:
        r = render_conversation(tokenizer, row["messages"])
        out.append(Sample(r.input_ids, r.loss_mask))
    return out


def test_best_fit_respects_capacity_and_keeps_everything():
    lengths = [5, 9, 3, 7, 2, 8, 1, 4]
    bins = pack_best_fit(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 39 tokens: 4 bins of 10 is optimal


def test_targets_stay_inside_their_document(tokenizer):
    docs = samples(tokenizer, 3)
    batch = collate_rows([docs], tokenizer.pad_token_id)
    starts = [0, len(docs[0]), len(docs[0]) + len(docs[1])]
    for s in starts[1:]:
        assert batch.targets[0, s - 1] == -100  # last token of a document predicts nothing
        assert batch.position_ids[0, s] == 0


def test_packed_loss_per_document_equals_unpacked(tokenizer):
    model = tiny_model(len(tokenizer))
    docs = samples(tokenizer, 6)
    with torch.no_grad():
        packed = collate_rows([docs[:3], docs[3:]], tokenizer.pad_token_id)
        lp_packed, mask = target_logprobs(model, packed)
        doc_of_target = packed.doc_ids[mask]
        for d, doc in enumerate(docs):
            alone = collate_rows([[doc]], tokenizer.pad_token_id)
            lp_alone, _ = target_logprobs(model, alone)
            torch.testing.assert_close(lp_packed[doc_of_target == d].sum(), lp_alone.sum(), rtol=1e-5, atol=1e-5)


def test_packing_without_restarting_positions_would_leak(tokenizer):
    """The guard above can fail: with one position run across documents, losses differ."""
    model = tiny_model(len(tokenizer))
    docs = samples(tokenizer, 2)
    with torch.no_grad():
        packed = collate_rows([docs], tokenizer.pad_token_id)
        leaky = collate_rows([docs], tokenizer.pad_token_id)
        leaky.position_ids = torch.arange(leaky.input_ids.shape[1]).unsqueeze(0)
        a, mask = target_logprobs(model, packed)
        b, _ = target_logprobs(model, leaky)
        second = packed.doc_ids[mask] == 1
        assert not torch.allclose(a[second], b[second])


def test_chunked_logprobs_match_unchunked(tokenizer):
    model = tiny_model(len(tokenizer))
    batch = collate_rows([samples(tokenizer, 4)], tokenizer.pad_token_id)
    full, _ = target_logprobs(model, batch, chunk_tokens=10_000)
    chunked, _ = target_logprobs(model, batch, chunk_tokens=7)
    torch.testing.assert_close(full, chunked)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    mask = batch.targets != -100
    ref = torch.log_softmax(logits[mask], -1).gather(-1, batch.targets[mask][:, None]).squeeze(-1)
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)
