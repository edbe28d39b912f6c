"""Reward scoring invariances (padding side, batch composition, pad == eos), conditions, pair data."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from align.config import DataConfig, SourceConfig
from align.trainers.rm import collate_pairs
from data_builders.bad_rows import BadRowError, BadRowPolicy
from data_builders.readers import write_jsonl
from rewards.conditions import DEFAULT_CONDITIONS, condition_messages, render_for_reward
from rewards.data import Pair, build_pairs, parse_comparison
from rewards.model import pair_scores, sequence_scores

PROMPT = [{"role": "user", "content": "What is 12+30?"}]


def model_for(tokenizer, pad_token_id=None):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, num_labels=1, pad_token_id=tokenizer.pad_token_id if pad_token_id is None else pad_token_id)
    m = LlamaForSequenceClassification(cfg).eval()
    torch.nn.init.normal_(m.score.weight, std=1.0)
    return m


def ids(tokenizer, response, condition="math"):
    return render_for_reward(tokenizer, DEFAULT_CONDITIONS, condition, PROMPT, response)


def pad(seqs, pad_id, left=False):
    width = max(map(len, seqs))
    x = torch.full((len(seqs), width), pad_id)
    m = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        x[i, sl], m[i, sl] = torch.tensor(s), 1
    return x, m


@torch.no_grad()
def test_score_ignores_padding_side(tokenizer):
    model = model_for(tokenizer)
    seqs = [ids(tokenizer, "Final Answer: 42"), ids(tokenizer, "12+30: 2+0=2, 1+3=4. Final Answer: 42")]
    right = sequence_scores(model, *pad(seqs, tokenizer.pad_token_id))
    left = sequence_scores(model, *pad(seqs, tokenizer.pad_token_id, left=True))
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_score_ignores_batch_composition_padded_and_packed(tokenizer):
    model = model_for(tokenizer)
    short, long = ids(tokenizer, "Final Answer: 42"), ids(tokenizer, "12+30: 2+0=2, 1+3=4. Final Answer: 42" * 3)
    alone = sequence_scores(model, *pad([short], tokenizer.pad_token_id))
    beside_long = sequence_scores(model, *pad([short, long], tokenizer.pad_token_id))[:1]
    torch.testing.assert_close(beside_long, alone, rtol=1e-5, atol=1e-5)
    for share_prefix in (True, False):
        batch = collate_pairs([[Pair(short, long, "math")], [Pair(long, short, "math")]], tokenizer.pad_token_id, share_prefix)
        chosen, rejected = pair_scores(model, batch.rows)
        torch.testing.assert_close(torch.stack([chosen[0], rejected[1]]), alone.repeat(2), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_score_ignores_pad_equal_to_eos(tokenizer):
    """With pad == eos, HF's pad-token pooling reads the wrong token (RLHFlow#49, TRL#3750); ours does not."""
    seqs = [ids(tokenizer, "Final Answer: 42"), ids(tokenizer, "Final Answer: 41, no wait")]
    model = model_for(tokenizer, pad_token_id=tokenizer.eos_token_id)
    x, m = pad(seqs, tokenizer.pad_token_id)
    x_eos, _ = pad(seqs, tokenizer.eos_token_id)
    ours = sequence_scores(model, x_eos, m)
    torch.testing.assert_close(ours, sequence_scores(model, x, m), rtol=1e-5, atol=1e-5)
    hf_pooled = model(input_ids=x_eos, attention_mask=m).logits.squeeze(-1)
    assert not torch.allclose(hf_pooled, ours, atol=1e-4), "the reference bug should show, or this test proves nothing"


def test_condition_prompt_goes_first_and_merges_with_system():
    assert condition_messages({"c": "C"}, "c", PROMPT)[0] == {"role": "system", "content": "C"}
    merged = condition_messages({"c": "C"}, "c", [{"role": "system", "content": "S"}, *PROMPT])
    assert merged[0] == {"role": "system", "content": "C\nS"} and len(merged) == 2
    assert condition_messages({"c": "C"}, None, PROMPT) == PROMPT


def test_render_ends_at_end_of_turn(tokenizer):
    toks = ids(tokenizer, "Final Answer: 42")
    assert toks[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "careful math grader" in tokenizer.decode(toks)


def test_unknown_condition_names_the_row(tmp_path, tokenizer):
    write_jsonl([{"prompt": "1+1?", "chosen": "2", "rejected": "3", "condition": "math"},
                 {"prompt": "1+1?", "chosen": "2", "rejected": "3", "condition": "poetry"}], tmp_path / "p.jsonl")
    data = DataConfig(train=[SourceConfig(path=str(tmp_path / "p.jsonl"))], max_length=128)
    with pytest.raises(BadRowError, match=r"p.jsonl: row 2: field 'condition': unknown condition 'poetry'"):
        build_pairs(data.train, data, DEFAULT_CONDITIONS, tokenizer, BadRowPolicy())
    policy = BadRowPolicy("skip")
    assert len(build_pairs(data.train, data, DEFAULT_CONDITIONS, tokenizer, policy)) == 1 and policy.count == 1


def test_implicit_prompt_and_identical_pairs():
    conv = lambda a: [*PROMPT, {"role": "assistant", "content": a}]  # noqa: E731
    prompt, chosen, rejected, _, _, _ = parse_comparison({"chosen": conv("42"), "rejected": conv("41")}, "f", 1)
    assert prompt == PROMPT and (chosen, rejected) == ("42", "41")
    with pytest.raises(BadRowError, match="identical to chosen"):
        parse_comparison({"prompt": "q", "chosen": "a", "rejected": "a"}, "f", 2)


def test_tag_is_optional_text_and_a_bad_one_names_row_and_field():
    assert parse_comparison({"prompt": "q", "chosen": "a", "rejected": "b", "tag": "style"}, "f", 1)[5] == "style"
    assert parse_comparison({"prompt": "q", "chosen": "a", "rejected": "b"}, "f", 1)[5] is None
    with pytest.raises(BadRowError, match=r"f: row 3: field .tag.: expected a string, got int"):
        parse_comparison({"prompt": "q", "chosen": "a", "rejected": "b", "tag": 7}, "f", 3)
