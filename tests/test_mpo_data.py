"""MPO data: preference rows and their bad-row policy, InternVL's pair builders, and pairs from the policy's own samples."""

from __future__ import annotations

import json

import pytest

from align.config import DataConfig, SourceConfig
from data_builders.bad_rows import BadRowError, BadRowPolicy
from data_builders.pair_builders import GeneratedSample, correctness_pairs, drop_evidence, dropout_ntp_pairs, truncate_words
from data_builders.preference_data import build_preference_pairs, tokenize_preference
from data_builders.readers import write_jsonl

PROMPT = [{"role": "user", "content": "What is 2+3?"}]


def test_prompt_is_shared_and_response_tokens_end_with_end_of_turn(tokenizer):
    pair = tokenize_preference(tokenizer, PROMPT, "Final Answer: 5", "Final Answer: 6", 256, "right")
    assert pair.chosen[: pair.prompt_length] == pair.rejected[: pair.prompt_length]
    assert tokenizer.decode(pair.chosen[pair.prompt_length :]) == "Final Answer: 5<|im_end|>"
    assert pair.chosen_tokens == len(pair.chosen) - pair.prompt_length


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"prompt": PROMPT, "chosen": "Final Answer: 5", "rejected": "Final Answer: 5"}, "rejected"),
        ({"prompt": PROMPT, "chosen": "   ", "rejected": "Final Answer: 5"}, "chosen"),
        ({"prompt": [{"role": "user", "content": "long " * 300}], "chosen": "a", "rejected": "b"}, "prompt"),
        ({"prompt": PROMPT, "rejected": "b"}, "chosen"),
    ],
)
def test_bad_rows_name_file_row_and_field_or_go_to_quarantine(tmp_path, tokenizer, row, field):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": PROMPT, "chosen": "Final Answer: 5", "rejected": "Final Answer: 6"}
    write_jsonl([good, row], path)
    data = DataConfig(train=[SourceConfig(path=str(path))], max_length=64)
    with pytest.raises(BadRowError) as err:
        build_preference_pairs(data.train, data, tokenizer, BadRowPolicy("error"))
    assert (err.value.origin, err.value.row, err.value.field) == (str(path), 2, field)  # JSONL rows are line numbers
    policy = BadRowPolicy("skip")
    assert len(build_preference_pairs(data.train, data, tokenizer, policy)) == 1 and policy.count == 1
    policy.write(tmp_path / "quarantine.jsonl")
    assert json.loads((tmp_path / "quarantine.jsonl").read_text().splitlines()[0])["field"] == field


def test_response_over_max_length_is_cut_dropped_or_an_error(tokenizer):
    long = "Final Answer: " + "9" * 200
    pair = tokenize_preference(tokenizer, PROMPT, long, "Final Answer: 5", 64, "right")
    assert len(pair.chosen) == 64 and len(pair.rejected) < 64
    with pytest.raises(BadRowError, match="exceed max_length"):
        tokenize_preference(tokenizer, PROMPT, long, "Final Answer: 5", 64, "drop")


def samples(prompt_id, responses, correct):
    return [GeneratedSample(prompt_id, PROMPT, r, c, "math") for r, c in zip(responses, correct)]


def test_correctness_pairs_pair_distinct_right_against_wrong_at_most_k():
    group = samples("a", ["x", "x", "y", "z", "w", "", "  "], [True, True, True, False, False, False, False])  # empty: no row
    rows = correctness_pairs(group + samples("b", ["x", "y"], [True, True]), max_pairs_per_prompt=3)
    assert len(rows) == 3  # 2 right × 2 wrong = 4 candidates, capped at 3; prompt b (all right) gives none
    assert all(r["chosen"] in {"x", "y"} and r["rejected"] in {"z", "w"} and r["prompt_id"] == "a" for r in rows)
    assert len({(r["chosen"], r["rejected"]) for r in rows}) == 3


def test_dropout_ntp_continues_half_the_words_without_the_question():
    seen = {}

    def continue_without_evidence(prompts, prefixes):
        seen["prompts"], seen["prefixes"] = prompts, prefixes
        return [" Answer: 7" for _ in prompts]

    good = samples("a", ["2+3: 2+3=5. Final Answer: 5"], [True]) + samples("b", ["wrong one here"], [False])
    rows = dropout_ntp_pairs(good, continue_without_evidence)
    assert seen["prefixes"] == [truncate_words("2+3: 2+3=5. Final Answer: 5")] == ["2+3: 2+3=5. Final"]  # ceil(5 words / 2)
    assert seen["prompts"] == [[{"role": "user", "content": ""}]]  # text-only: the question is the dropped evidence
    assert rows == [{"prompt": PROMPT, "chosen": "2+3: 2+3=5. Final Answer: 5", "rejected": "2+3: 2+3=5. Final Answer: 7",
                     "condition": "math", "builder": "dropout_ntp", "prompt_id": "a"}]  # fmt: skip


def test_drop_evidence_removes_images_and_keeps_the_text():
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    assert drop_evidence(msgs) == [{"role": "user", "content": [{"type": "text", "text": "What is shown?"}]}]


def test_mpo_builds_pairs_from_its_own_samples(tmp_path, sft_checkpoint, tokenizer, monkeypatch):
    """The sampled-pairs path end to end in-process, with generation replaced by half-right answers."""
    import align.trainers.mpo as mpo
    import align.trainers.policy_samples as policy_samples
    from align.config import MPORecipe, load_recipe
    from align.engine.core import Engine
    from align.evaluation import load_prompts
    from tests.conftest import ROOT, ScriptedGenerator

    recipe = load_recipe(MPORecipe, ROOT / "configs" / "mpo" / "quickstart.yaml", [
        f"output_dir={tmp_path / 'run'}", f"model.name_or_path={sft_checkpoint}", "mpo.sampled_pairs.num_prompts=12",
        "mpo.sampled_pairs.samples_per_prompt=4", "mpo.sampled_pairs.dropout_ntp_share=1.0", "data.synthetic.eval_rows=6",
        "eval.enabled=false", "logging.wandb=false", "mpo.reference=model"])  # fmt: skip
    problems = load_prompts(None, recipe.data.synthetic, 12, split="train")
    generator = ScriptedGenerator(tokenizer, problems, lambda i: ["right", "wrong"] * 2)
    monkeypatch.setattr(policy_samples, "make_generator", lambda *args, **kwargs: generator)
    trainer = mpo.MPOTrainer(recipe, Engine.create(recipe))
    trainer.setup()
    stats = trainer.data_stats["sampled_pairs"]
    assert stats["samples"] == 48 and stats["correct_share"] == 0.5
    assert stats["by_builder"]["correctness"] == 12  # one distinct right and one distinct wrong answer per prompt
    assert stats["by_builder"]["dropout_ntp"] >= 1 and len(trainer.pairs) == stats["pairs"]
