"""The shared rollout buffer: validation, token-budget batches, cross-rank advantage whitening, round trip, views."""

from __future__ import annotations

import torch

from align.rollout.buffer import Rollout, RolloutBuffer

PROMPT = [{"role": "user", "content": "What is 2+3?"}]


def rollout(prompt_id="p", group=0, response="Final Answer: 5", reward=1.0, correct=True, n_prompt=5, n_resp=3, **kw) -> Rollout:
    return Rollout(list(range(n_prompt)), list(range(n_resp)), PROMPT, response, prompt_id, group, "math", reward=reward, correct=correct, **kw)


def test_step_fields_must_match_the_response_length():
    buffer = RolloutBuffer()
    buffer.add([rollout(logprobs=torch.zeros(3))])
    try:
        buffer.add([rollout(values=torch.zeros(2))])
    except ValueError as err:
        assert "values has 2 values for 3 response tokens" in str(err)
    else:
        raise AssertionError("a mismatched step field must be refused")


def test_micro_batches_respect_the_token_budget_and_keep_every_sample():
    buffer = RolloutBuffer([rollout(n_prompt=p, n_resp=r) for p, r in [(10, 5), (3, 2), (20, 30), (8, 8), (1, 1)]])
    groups = buffer.micro_batches(token_budget=20)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    for g in groups:
        assert sum(buffer[i].num_tokens for i in g) <= 20 or len(g) == 1  # the 50-token sample rides alone


class TwoRankAccelerator:
    """Stands in for a 2-rank all-reduce: adds the other rank's (sum, sum of squares, count)."""

    num_processes = 2
    device = "cpu"

    def __init__(self, other: torch.Tensor):
        self.other = other.double()

    def reduce(self, stats, op):
        assert op == "sum"
        return stats + torch.stack([self.other.sum(), (self.other**2).sum(), torch.tensor(float(self.other.numel()))])


def test_advantages_are_whitened_with_statistics_of_every_rank():
    mine, other = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0])
    buffer = RolloutBuffer([rollout(n_resp=3, advantages=mine.clone())])
    mean, std = buffer.normalize_advantages(TwoRankAccelerator(other))
    everything = torch.cat([mine, other]).double()
    assert mean == torch.mean(everything).item() and abs(std - everything.std(unbiased=False).item()) < 1e-9
    torch.testing.assert_close(buffer[0].advantages, ((mine.double() - mean) / (std + 1e-8)).float())


def test_save_and_load_round_trip_is_exact(tmp_path):
    original = RolloutBuffer([rollout(logprobs=torch.randn(3), ref_logprobs=torch.randn(3), values=torch.randn(3), truncated=True,
                                      reward_parts={"rm": 0.5, "math": 1.0}, round=2, policy_version=7),
                              rollout(prompt_id="q", reward=None, correct=None)])  # fmt: skip
    original.save(tmp_path)
    loaded = RolloutBuffer.load(tmp_path)
    assert len(loaded) == 2 and not list(tmp_path.glob(".*tmp*"))
    for a, b in zip(original.rollouts, loaded.rollouts):
        assert a.episode_fields() == b.episode_fields()
        for name in ("logprobs", "ref_logprobs", "values", "advantages", "returns"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y)


def test_preference_pairs_put_correct_over_wrong_within_each_group():
    buffer = RolloutBuffer([rollout("p", 0, "right", 0.2, True), rollout("p", 0, "wrong", 0.9, False), rollout("p", 1, "also wrong", 0.1, False),
                            rollout("q", 0, "high", 2.0, None), rollout("q", 0, "low", -1.0, None), rollout("q", 0, "mid", 0.5, None)])  # fmt: skip
    rows = buffer.preference_pairs(max_pairs_per_prompt=5)
    pairs = {(r["prompt_id"], r["chosen"], r["rejected"]) for r in rows}
    assert pairs == {("p#0", "right", "wrong"), ("q#0", "high", "low"), ("q#0", "high", "mid")}  # group p#1 has nothing right


def test_best_of_n_keeps_the_best_correct_untruncated_sample_per_group():
    buffer = RolloutBuffer([rollout("p", 0, "a", 0.1, True), rollout("p", 0, "b", 0.9, True), rollout("p", 0, "c", 5.0, False),
                            rollout("p", 0, "d", 9.0, True, truncated=True), rollout("q", 0, "e", 1.0, False)])  # fmt: skip
    rows = buffer.best_of_n()
    assert [r["messages"][-1]["content"] for r in rows] == ["b"]  # q has no correct sample


def test_comparisons_reject_late_samples_that_the_reward_overrates():
    early = [rollout("p", 0, "honest", 0.3, True, round=0)]
    late = [rollout("p", 1, "hacked", 0.8, False, round=0), rollout("p", 1, "fine", 0.9, True), rollout("q", 1, "x", 0.1, False)]
    rows = RolloutBuffer().comparisons(early, late)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("honest", "hacked")]


def test_hf_generator_flags_truncation_and_groups_n_per_prompt(tokenizer):
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.rollout.generation import HFGenerator, SamplingParams

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()

    def always(token_id):  # an LM head that always prefers `token_id`
        head = torch.nn.Linear(16, len(tokenizer), bias=True)
        torch.nn.init.zeros_(head.weight)
        head.bias.data = torch.nn.functional.one_hot(torch.tensor(token_id), len(tokenizer)).float() * 10
        model.lm_head = head

    generator = HFGenerator(model, tokenizer, Accelerator(cpu=True), batch_size=2)
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer question here"}], [{"role": "user", "content": "x"}]]
    always(tokenizer.eos_token_id)
    out = generator.generate(prompts, SamplingParams(max_new_tokens=5, n=2))
    assert [len(g) for g in out] == [2, 2, 2]
    assert all(g.response_ids == [tokenizer.eos_token_id] and not g.truncated and g.text == "" for group in out for g in group)
    seven = tokenizer.convert_tokens_to_ids("7")
    always(seven)
    out = generator.generate(prompts[:1], SamplingParams(max_new_tokens=5, n=1), prefixes=["Final Answer: "])
    g = out[0][0]
    assert g.truncated and g.response_ids == [seven] * 5 and g.text == "77777"
    assert tokenizer.decode(g.prompt_ids).endswith("Final Answer: ")


def test_prompt_ids_are_fixed_before_sharding_so_ranks_never_share_one(tmp_path, tokenizer):
    """Prompts without a uid get their index in the file before any rank takes its shard; each rank's rollouts then carry
    pool-wide ids (a rank-local fallback gave both ranks ids 0, 1, ... and paired answers to different prompts)."""
    import json

    import pytest

    from align.evaluation import load_prompts
    from align.rollout.collect import collect_rollouts, verifier_routes
    from align.rollout.generation import SamplingParams
    from rewards.router import RewardRouter
    from tests.conftest import ScriptedGenerator

    path = tmp_path / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i}+1?"}], "condition": "math", "answer": i + 1, "unsafe": False}
            for i in range(6)]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows))
    problems = load_prompts(str(path), None, 6)
    assert [p["uid"] for p in problems] == [f"prompt-{i}" for i in range(6)]
    router = RewardRouter(verifier_routes(["math"]))
    ids = []
    for rank in range(2):
        shard = problems[rank::2]
        rollouts = collect_rollouts(ScriptedGenerator(tokenizer, shard, lambda i: ["right", "wrong"]), router, shard, SamplingParams(8, 2))
        ids.append({r.prompt_id for r in rollouts})
    assert ids == [{"prompt-0", "prompt-2", "prompt-4"}, {"prompt-1", "prompt-3", "prompt-5"}]
    with pytest.raises(ValueError, match="no uid"):
        collect_rollouts(ScriptedGenerator(tokenizer, rows, lambda i: ["right"]), router, rows, SamplingParams(8, 1))
