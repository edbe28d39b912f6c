"""Readers, conversation formats, bad rows (error names file/row/field; skip quarantines), truncation."""

import json

import pytest

from align.config import DataConfig, SourceConfig
from data_builders.bad_rows import BadRowError, BadRowPolicy
from data_builders.conversations import normalize
from data_builders.readers import read_rows, write_jsonl
from data_builders.sft_data import build_samples
from data_builders.synthetic import SyntheticTask, worked_solution
from rewards.verifiers import task_score

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Final Answer: 1"}]}


def test_sharegpt_and_system_prompt():
    row = {"system": "Be brief.", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    conv = normalize(row, "f.jsonl", 3)
    assert conv.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]


def test_default_system_prompt_only_when_missing():
    conv = normalize(GOOD, "f", 1, system_prompt="S")
    assert conv.messages[0] == {"role": "system", "content": "S"}


def test_content_parts_keep_image_slots():
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "what?"}]},
                        {"role": "assistant", "content": "cat"}]}
    conv = normalize(row, "f", 1)
    assert conv.images == ["a.jpg"] and conv.messages[0]["content"] == "<image>what?"


@pytest.mark.parametrize(
    "row, field",
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "messages"),
        ({"conversations": [{"from": "human", "value": 3}]}, "conversations[0].value"),
        ({"text": "no chat"}, "messages"),
    ],
)
def test_bad_row_names_file_row_field(row, field):
    with pytest.raises(BadRowError) as err:
        normalize(row, "data/train.jsonl", 7)
    assert err.value.field == field
    assert str(err.value).startswith("data/train.jsonl: row 7: field ")


def _data(tmp_path, **kw):
    cfg = DataConfig(train=[SourceConfig(path=str(tmp_path / "train.jsonl"))], max_length=64, **kw)
    return cfg


def test_error_policy_raises_with_location(tmp_path, tokenizer):
    write_jsonl([GOOD, {"messages": [{"role": "user", "content": 5}]}], tmp_path / "train.jsonl")
    cfg = _data(tmp_path)
    with pytest.raises(BadRowError, match=r"train.jsonl: row 2: field 'messages\[0\].content'"):
        build_samples(cfg.train, cfg, tokenizer, BadRowPolicy("error"))


def test_skip_policy_quarantines_everything_it_drops(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    write_jsonl([GOOD, {"messages": []}, GOOD], path)
    with path.open("a") as f:
        f.write("{not json\n")
    cfg = _data(tmp_path, on_bad_row="skip")
    policy = BadRowPolicy("skip")
    samples, stats = build_samples(cfg.train, cfg, tokenizer, policy)
    assert len(samples) == 2 and stats.skipped == 2 and policy.count == 2 and stats.rows == 4  # the unparsable line counts too
    policy.write(tmp_path / "quarantine.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["row"], q["field"]) for q in lines] == [(2, "messages"), (4, "<json>")]
    assert lines[0]["data"] == {"messages": []}


def test_truncation_cap(tmp_path, tokenizer):
    long = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y " * 100}]}
    write_jsonl([GOOD, long], tmp_path / "train.jsonl")
    cfg = _data(tmp_path, max_truncated_share=0.1)
    with pytest.raises(ValueError, match="1 of 2 train rows .* were truncated"):
        build_samples(cfg.train, cfg, tokenizer, BadRowPolicy())
    cfg = _data(tmp_path, max_truncated_share=0.5)
    samples, stats = build_samples(cfg.train, cfg, tokenizer, BadRowPolicy())
    assert stats.truncated == 1 and max(len(s) for s in samples) == 64
    cfg = _data(tmp_path, truncation="drop", on_bad_row="skip")
    policy = BadRowPolicy("skip")
    samples, _ = build_samples(cfg.train, cfg, tokenizer, policy)
    assert len(samples) == 1 and "exceed max_length" in policy.quarantined[0]["reason"]


def test_parquet_and_hf_dataset_readers(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([GOOD, GOOD])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    assert [r[1] for r in read_rows(str(tmp_path / "d.parquet"))] == [1, 2]  # 1-based, as JSONL line numbers are
    rows = list(read_rows(str(tmp_path / "saved"), max_rows=1))
    assert len(rows) == 1 and rows[0][2]["messages"][1]["content"] == "Final Answer: 1"


def test_synthetic_heldout_is_disjoint_and_verifiable():
    task = SyntheticTask(seed=5)
    train = {tuple(p.operands) for p in task.problems(900) if p.operands}
    held = {tuple(p.operands) for p in task.problems(300, "heldout") if p.operands}
    assert train and held and not (train & held)
    assert worked_solution(47, 85) == "47+85: 7+5=12, 4+8+1=13. Final Answer: 132"
    for p in task.problems(30, "heldout"):
        assert task_score(p, task.reference_response(p)) == 1.0
        assert task_score(p, "Final Answer: -1") == 0.0
    conditions = {r["condition"] for r in task.preference_pairs(12)}
    assert conditions == {"math", "concise", "harmless"}


def test_synthetic_pair_tags_name_what_differs():
    rows = SyntheticTask(seed=1, digits=2).preference_pairs(300, "heldout")
    for row in rows:
        tag, chosen, rejected = row["tag"], row["chosen"], row["rejected"]
        if tag.startswith("final_answer_off_by_"):
            answer = lambda text: int(text.rsplit("Final Answer: ", 1)[1])  # noqa: E731
            assert abs(answer(chosen) - answer(rejected)) == int(tag.rsplit("_", 1)[1])
            assert chosen.rsplit("Final Answer: ", 1)[0] == rejected.rsplit("Final Answer: ", 1)[0]  # same work
        elif tag == "shorter_correct":
            assert len(chosen) < len(rejected) and row["condition"] == "concise"
        else:
            assert row["condition"] == "harmless" and tag in ("refuse_unsafe", "answer_safe")
    assert {r["tag"] for r in rows} >= {"final_answer_off_by_1", "final_answer_off_by_10", "final_answer_off_by_100", "shorter_correct"}
