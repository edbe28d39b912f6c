"""The reward router: per-condition routes of RM and verifiers, batching-invariant, with a breakdown."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from rewards.conditions import DEFAULT_CONDITIONS, render_for_reward
from rewards.model import sequence_scores
from rewards.router import RewardRouter
from rewards.verifiers import is_refusal, length_penalty, math_correct, parse_final_answer

Q = [{"role": "user", "content": "What is 12+30? Show your work."}]
SAMPLES = [
    {"condition": "math", "prompt": Q, "response": "12+30: 2+0=2, 1+3=4. Final Answer: 42", "answer": 42, "unsafe": False},
    {"condition": "math", "prompt": Q, "response": "Final Answer: 41", "answer": 42, "unsafe": False},
    {"condition": "harmless", "prompt": [{"role": "user", "content": "[UNSAFE] Please steal a password."}],
     "response": "I can't help with that request.", "answer": None, "unsafe": True},
    {"condition": "concise", "prompt": Q, "response": "Final Answer: 42", "answer": 42, "unsafe": False},
]


def rm(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForSequenceClassification(cfg).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model


def test_verifier_contracts():
    assert parse_final_answer("x. Final Answer: 1,234.") == 1234.0 and parse_final_answer("none") is None
    assert math_correct("Final Answer: 42", 42) == 1.0 and math_correct("Final Answer: 42", 43) == 0.0
    assert is_refusal("I can't help with that request.") and not is_refusal("Final Answer: 3")
    assert length_penalty(10, 16) == 0.0 and length_penalty(20, 16, 0.5) == -2.0


def test_routes_mix_rm_and_verifiers(tokenizer):
    model = rm(tokenizer)
    router = RewardRouter({"math": {"rm": 1.0, "math": 2.0}, "harmless": {"refusal": 1.0}, "concise": {"task": 1.0, "length": 1.0}},
                          reward_model=model, tokenizer=tokenizer, conditions=DEFAULT_CONDITIONS)
    result = router.score(SAMPLES)
    # the RM component is exactly the reward model on the same rendering used in RM training
    for i in (0, 1):
        s = SAMPLES[i]
        ids = torch.tensor([render_for_reward(tokenizer, DEFAULT_CONDITIONS, "math", s["prompt"], s["response"])])
        expected = sequence_scores(model, ids, torch.ones_like(ids))
        torch.testing.assert_close(result.components["rm"][i], expected[0], rtol=1e-5, atol=1e-5)
    assert result.components["math"][:2].tolist() == [1.0, 0.0]
    torch.testing.assert_close(result.scores[:2], result.components["rm"][:2] + 2 * result.components["math"][:2])
    assert result.scores[2] == 1.0 and result.scores[3] == 1.0
    assert torch.isnan(result.components["rm"][2])  # not on the harmless route
    assert result.by_condition["math"]["count"] == 2 and result.by_condition["math"]["math"] == 0.5


def test_scores_do_not_depend_on_batching(tokenizer):
    router = RewardRouter({"default": {"rm": 1.0}}, reward_model=rm(tokenizer), tokenizer=tokenizer, conditions=DEFAULT_CONDITIONS,
                          row_tokens=64)
    together = router.score(SAMPLES).scores
    alone = torch.cat([router.score([s]).scores for s in SAMPLES])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_normalisation_and_errors(tokenizer):
    model = rm(tokenizer)
    raw = RewardRouter({"math": {"rm": 1.0}}, model, tokenizer, DEFAULT_CONDITIONS).score(SAMPLES[:2]).scores
    normed = RewardRouter({"math": {"rm": 1.0}}, model, tokenizer, DEFAULT_CONDITIONS, stats={"math": {"mean": 1.0, "std": 2.0}})
    torch.testing.assert_close(normed.score(SAMPLES[:2]).scores, (raw - 1.0) / 2.0)
    with pytest.raises(ValueError, match="unknown components \\['vibes'\\]"):
        RewardRouter({"math": {"vibes": 1.0}})
    with pytest.raises(ValueError, match="uses 'rm' but no reward model"):
        RewardRouter({"math": {"rm": 1.0}})
    with pytest.raises(KeyError, match="no route for condition 'harmless'"):
        RewardRouter({"math": {"math": 1.0}}).score(SAMPLES[2:3])
