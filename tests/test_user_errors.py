"""A user's mistake is one `align: ...` line with exit code 2, naming the file, row, field, setting or path to fix.

Covers the error classes (one base), unreadable and empty data, unknown MPO conditions, the run length
(max_steps / epochs), skipped rows and the truncation cap, 1-based row numbers, setting bounds, and
local-looking paths that do not exist.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from align.config import ConfigError, DataConfig, MPOConfig, MPORecipe, RLHFRecipe, SFTRecipe, SourceConfig, load_recipe
from data_builders.bad_rows import BadRowError, BadRowPolicy
from data_builders.errors import UserError
from data_builders.readers import read_rows, write_jsonl
from tests.conftest import ROOT

SFT = str(ROOT / "configs" / "sft" / "quickstart.yaml")
MPO = str(ROOT / "configs" / "mpo" / "quickstart.yaml")
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Final Answer: 1"}]}
PAIR = {"prompt": "1+1?", "chosen": "Final Answer: 2", "rejected": "Final Answer: 3", "condition": "math"}


def one_error_line(stderr: str) -> str:
    """The single `align:` line of a failed command (no traceback around it)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("align:")]
    assert len(lines) == 1, stderr
    return lines[0]


# ----------------------------------------------------------------------------- one class of user errors
def test_user_mistakes_share_one_base_class_and_keep_their_old_ones():
    from align.engine.plan import StepPlan  # noqa: F401 - the plan's errors are user errors too
    from data_builders.paths import MissingPathError
    from rewards.conditions import UnknownConditionError
    from rewards.loss_registry import get_loss

    assert issubclass(ConfigError, UserError) and issubclass(BadRowError, UserError) and issubclass(UserError, ValueError)
    assert issubclass(UnknownConditionError, UserError) and issubclass(UnknownConditionError, KeyError)
    assert issubclass(MissingPathError, UserError) and issubclass(MissingPathError, FileNotFoundError)
    with pytest.raises(UserError, match="unknown loss 'nope'"):
        get_loss("nope", "preference")
    from align.builtin import builtin_shape

    with pytest.raises(UserError, match="unknown built-in model 'builtin:huge'; choose one of builtin:tiny"):
        builtin_shape("builtin:huge")


def test_cli_prints_errors_after_the_recipe_check_as_one_line(tmp_path, capsys):
    """Batch arithmetic, a bad row, and nothing left after skipping: exit 2 and one line each, no traceback."""
    from align.cli import main

    base = ["sft", "--config", SFT, "--set", "model.name_or_path=builtin:tiny", "--set", "logging.wandb=false",
            "--set", "logging.progress=false", "--set", "train.micro_batch_size=2"]  # fmt: skip
    assert main([*base, "--set", f"output_dir={tmp_path / 'a'}", "--set", "train.global_batch_size=5"]) == 2
    assert "train.global_batch_size=5 is not a positive multiple" in one_error_line(capsys.readouterr().err)

    data = write_jsonl([GOOD, {"messages": [{"role": "user", "content": 5}]}], tmp_path / "train.jsonl")
    with_data = [*base, "--set", f"data.train=[{{path: {data}}}]", "--set", "train.global_batch_size=2"]
    assert main([*with_data, "--set", f"output_dir={tmp_path / 'b'}"]) == 2
    assert f"align: {data}: row 2: field 'messages[0].content'" in one_error_line(capsys.readouterr().err)

    write_jsonl([{"messages": []}, {"text": "no chat"}], data)
    out = tmp_path / "c"
    assert main([*with_data, "--set", f"output_dir={out}", "--set", "data.on_bad_row=skip"]) == 2
    err = capsys.readouterr().err
    line = one_error_line(err)
    assert "no usable train rows: all 2 were skipped as bad rows" in line and str(out / "quarantine.jsonl") in line
    assert len((out / "quarantine.jsonl").read_text().splitlines()) == 2  # written before the error, not lost with the run
    assert f"[data] 2 bad rows skipped (data.on_bad_row: skip); quarantined in {out / 'quarantine.jsonl'}" in err


def test_mpo_rejects_an_unknown_condition_like_the_rm(tmp_path, capsys):
    """`align mpo` on a pair naming a condition nothing knows: a bad row naming file, row and field, not a silent accept."""
    from align.cli import main

    data = write_jsonl([PAIR, {**PAIR, "condition": "poetry"}], tmp_path / "pairs.jsonl")
    args = ["mpo", "--config", MPO, "--set", "model.name_or_path=builtin:tiny", "--set", f"output_dir={tmp_path / 'mpo'}",
            "--set", f"data.train=[{{path: {data}}}]", "--set", "data.eval=[]", "--set", "mpo.sampled_pairs.enabled=false",
            "--set", "mpo.reference=model", "--set", "logging.wandb=false", "--set", "eval.enabled=false"]  # fmt: skip
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{data}: row 2: field 'condition': unknown condition 'poetry'" in line and "'math'" in line


def test_preference_pairs_check_conditions_under_the_bad_row_policy(tmp_path, tokenizer):
    from data_builders.preference_data import build_preference_pairs
    from rewards.conditions import DEFAULT_CONDITIONS

    assert MPOConfig().conditions == sorted(DEFAULT_CONDITIONS)  # MPO's default: the reward model's condition names
    write_jsonl([PAIR, {**PAIR, "condition": "poetry"}, {**PAIR, "condition": 3}], tmp_path / "p.jsonl")
    data = DataConfig(train=[SourceConfig(path=str(tmp_path / "p.jsonl"))], max_length=128)
    with pytest.raises(BadRowError, match=r"p.jsonl: row 2: field 'condition': unknown condition 'poetry'"):
        build_preference_pairs(data.train, data, tokenizer, BadRowPolicy(), conditions=MPOConfig().conditions)
    policy = BadRowPolicy("skip")
    pairs = build_preference_pairs(data.train, data, tokenizer, policy, conditions=MPOConfig().conditions)
    assert len(pairs) == 1 and [(q["row"], q["field"]) for q in policy.quarantined] == [(2, "condition"), (3, "condition")]


# ----------------------------------------------------------------------------- unreadable and empty data
def test_a_line_that_is_not_utf8_is_one_bad_row(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n" + b'{"messages": "caf\xe9"}\n' + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(BadRowError, match=r"train.jsonl: row 2: field '<utf-8>': not valid UTF-8"):
        list(read_rows(str(path)))
    policy = BadRowPolicy("skip")
    rows = list(read_rows(str(path), policy=policy))
    assert [r[1] for r in rows] == [1, 3] and rows[0][2] == GOOD  # a byte-order mark on line 1 is fine
    assert [(q["row"], q["field"]) for q in policy.quarantined] == [(2, "<utf-8>")]
    assert "caf" in policy.quarantined[0]["data"]  # kept (with a replacement character) for the quarantine file
    policy.write(tmp_path / "q.jsonl")
    assert json.loads((tmp_path / "q.jsonl").read_text())["field"] == "<utf-8>"


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_an_empty_data_file_is_an_error_naming_it(tmp_path, content):
    from data_builders.readers import EmptyDataError

    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(EmptyDataError, match=rf"{path}: data file is empty"):
        list(read_rows(str(path)))


# ----------------------------------------------------------------------------- how long a run trains
def test_max_steps_minus_one_means_no_limit_and_nothing_trains_zero_steps():
    from align.engine.accelerator import BatchShape
    from align.engine.plan import StepPlan

    shape = BatchShape(2, 1, 1)
    assert StepPlan(20, shape, 0, epochs=2, max_steps=-1).total_steps == 20  # transformers' "no limit": epochs decide
    assert StepPlan(20, shape, 0, epochs=0.5, max_steps=None).total_steps == 5
    assert StepPlan(20, shape, 0, epochs=0, max_steps=3).total_steps == 3
    for epochs, max_steps, match in [(1, -2, "train.max_steps must be >= 1, or -1"), (1, 0, "train.max_steps must be >= 1"),
                                     (0, None, "train.epochs must be > 0"), (-1, -1, "train.epochs must be > 0")]:  # fmt: skip
        with pytest.raises(UserError, match=match):
            StepPlan(20, shape, 0, epochs=epochs, max_steps=max_steps)


def test_recipe_check_refuses_a_run_length_that_trains_nothing():
    assert load_recipe(SFTRecipe, SFT, ["train.max_steps=-1"]).train.max_steps == -1
    assert load_recipe(SFTRecipe, SFT, ["train.epochs=0", "train.max_steps=4"]).train.epochs == 0
    with pytest.raises(ConfigError, match=r"train.max_steps: must be >= 1 or -1, got -5"):
        load_recipe(SFTRecipe, SFT, ["train.max_steps=-5"])
    with pytest.raises(ConfigError, match=r"train.epochs: must be > 0 unless train.max_steps >= 1 sets the length, got 0"):
        load_recipe(SFTRecipe, SFT, ["train.epochs=0"])


# ----------------------------------------------------------------------------- skipped rows and the truncation cap
def test_skipped_rows_never_count_as_truncated_and_are_reported(tmp_path, tokenizer, capsys):
    from data_builders.sft_data import build_samples

    # the user turn alone fills max_length: truncated, then no assistant token is left, so the row is skipped (not truncated)
    crowded = {"messages": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "Final Answer: 1"}]}
    write_jsonl([GOOD, GOOD, GOOD, crowded], tmp_path / "train.jsonl")
    data = DataConfig(train=[SourceConfig(path=str(tmp_path / "train.jsonl"))], max_length=64, max_truncated_share=0.0, on_bad_row="skip")
    samples, stats = build_samples(data.train, data, tokenizer, BadRowPolicy("skip"))
    assert (len(samples), stats.kept, stats.truncated, stats.skipped, stats.rows) == (3, 3, 0, 1, 4)
    policy = BadRowPolicy.for_run("skip", tmp_path / "run", is_main=True)
    build_samples(data.train, data, tokenizer, policy)
    assert policy.write() == tmp_path / "run" / "quarantine.jsonl"
    assert json.loads((tmp_path / "run" / "quarantine.jsonl").read_text())["row"] == 4
    assert f"1 bad row skipped (data.on_bad_row: skip); quarantined in {tmp_path / 'run' / 'quarantine.jsonl'}" in capsys.readouterr().err


def test_truncation_cap_counts_kept_rows_and_leaves_the_quarantine(tmp_path, tokenizer):
    from data_builders.sft_data import build_samples

    long = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y " * 100}]}
    write_jsonl([GOOD, long, {"messages": []}], tmp_path / "train.jsonl")
    data = DataConfig(train=[SourceConfig(path=str(tmp_path / "train.jsonl"))], max_length=64, max_truncated_share=0.4, on_bad_row="skip")
    policy = BadRowPolicy.for_run("skip", tmp_path / "run", is_main=True)
    with pytest.raises(UserError, match=r"1 of 2 train rows \(50.0%\) were truncated.*1 bad rows skipped, not counted; quarantined in"):
        build_samples(data.train, data, tokenizer, policy)
    assert (tmp_path / "run" / "quarantine.jsonl").exists()


# ----------------------------------------------------------------------------- 1-based row numbers everywhere
def test_row_numbers_are_one_based_in_every_reader(tmp_path, tokenizer):
    import datasets

    from align.trainers.rm_update import comparison_pairs, read_comparison_files
    from rewards.conditions import DEFAULT_CONDITIONS
    from rewards.data import build_pairs

    rows = [PAIR, {**PAIR, "condition": "poetry"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for path in ("p.parquet", "saved"):
        data = DataConfig(train=[SourceConfig(path=str(tmp_path / path))], max_length=128)
        with pytest.raises(BadRowError, match=rf"{path}: row 2: field 'condition'"):
            build_pairs(data.train, data, DEFAULT_CONDITIONS, tokenizer, BadRowPolicy())
    folder = tmp_path / "comparisons"
    folder.mkdir()
    (folder / "c.jsonl").write_text(json.dumps(PAIR) + "\n\n" + json.dumps(rows[1]) + "\n")  # a blank line 2
    [(name, found)] = read_comparison_files(folder, set())
    with pytest.raises(BadRowError, match=r"c.jsonl: row 3: field 'condition'"):  # the line number, as `align rm` names it
        comparison_pairs(found, tokenizer, DEFAULT_CONDITIONS, name, BadRowPolicy(), 256)
    with pytest.raises(BadRowError, match=r"fast: row 2: field 'condition'"):
        comparison_pairs(rows, tokenizer, DEFAULT_CONDITIONS, "fast", BadRowPolicy(), 256)
    (folder / "d.jsonl").write_bytes(b"\n\xff\n")
    with pytest.raises(BadRowError, match=r"d.jsonl: row 2: field '<utf-8>'"):
        read_comparison_files(folder, {name})


# ----------------------------------------------------------------------------- settings nothing checked
@pytest.mark.parametrize("recipe, override, message", [
    (SFTRecipe, "optim.lr=0", "optim.lr: must be > 0, got 0"),
    (SFTRecipe, "optim.lr=-1e-4", "optim.lr: must be > 0, got -1e-4"),
    (SFTRecipe, "data.max_length=0", "data.max_length: must be >= 1, got 0"),
    (SFTRecipe, "train.micro_batch_size=0", "train.micro_batch_size: must be >= 1, got 0"),
    (SFTRecipe, "optim.warmup_steps=-3", "optim.warmup_steps: must be >= 0, got -3"),
    (SFTRecipe, "train.keep_last=0", "train.keep_last: must be >= 1, got 0"),
    (SFTRecipe, "train.log_every=0", "train.log_every: must be >= 1, got 0"),
    (SFTRecipe, "data.max_truncated_share=1.5", "data.max_truncated_share: must be in [0, 1], got 1.5"),
    (SFTRecipe, "data.synthetic.concise_share=-0.1", "data.synthetic.concise_share: must be in [0, 1], got -0.1"),
    (SFTRecipe, "optim.betas=[0.9, 1.0]", r"optim.betas[1]: must be in [0, 1), got 1.0"),
    (SFTRecipe, "data.train=[{path: synthetic, max_rows: 0}]", "data.train[0].max_rows: must be >= 1, got 0"),
    (SFTRecipe, "rejection_sampling.top_p=0", "rejection_sampling.top_p: must be in (0, 1], got 0"),
    (MPORecipe, "mpo.sampled_pairs.dropout_ntp_share=2", "mpo.sampled_pairs.dropout_ntp_share: must be in [0, 1], got 2"),
    (MPORecipe, "mpo.sampled_pairs.temperature=-0.5", "mpo.sampled_pairs.temperature: must be >= 0, got -0.5"),
    (MPORecipe, "mpo.losses={sigmoid: -1}", "mpo.losses.sigmoid: must be >= 0, got -1"),
    (MPORecipe, "mpo.beta=0", "mpo.beta: must be > 0, got 0"),
    (RLHFRecipe, "ppo.top_p=1.5", "ppo.top_p: must be in (0, 1], got 1.5"),
    (RLHFRecipe, "ppo.lam=1.2", "ppo.lam: must be in [0, 1], got 1.2"),
    (RLHFRecipe, "ppo.critic_lr=0", "ppo.critic_lr: must be > 0, got 0"),
])  # fmt: skip
def test_out_of_range_settings_fail_at_load_naming_the_key(recipe, override, message):
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe, None, [override])
    assert message in str(err.value)
    assert time.perf_counter() - started < 0.5


def test_mpo_losses_must_be_preference_losses(tmp_path, capsys):
    """Checked by `align mpo` before the trainer (or a model, or data) loads."""
    from align.cli import main

    out = tmp_path / "mpo"
    args = ["mpo", "--config", MPO, "--set", "model.name_or_path=builtin:tiny", "--set", f"output_dir={out}"]
    assert main([*args, "--set", "mpo.losses={sigmoid: 1.0, bradley_terry: 0.5}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "mpo.losses.bradley_terry: loss 'bradley_terry' is a ranking loss, not a preference loss" in line
    assert main([*args, "--set", "mpo.losses={sigmod: 1.0}"]) == 2
    assert "mpo.losses.sigmod: unknown loss 'sigmod'" in one_error_line(capsys.readouterr().err)
    assert not out.exists()  # nothing started


# ----------------------------------------------------------------------------- local paths that do not exist
def test_local_looking_paths_are_checked_and_hub_names_are_left_to_the_hub(tmp_path, monkeypatch):
    from align.config import ModelConfig
    from align.model_paths import check_tokenizer_path
    from data_builders.paths import MissingPathError, looks_local
    from data_builders.readers import check_data_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert not any(map(looks_local, ["Qwen/Qwen2.5-0.5B", "gpt2", "org/name"]))
    assert all(map(looks_local, ["./tok", "/abs/tok", "~/tok", "a/b/c", "tok/tokenizer.json", "models/missing", "models\\tok"]))

    check_tokenizer_path(ModelConfig(name_or_path="builtin:tiny"))
    check_tokenizer_path(ModelConfig(name_or_path="builtin:tiny", tokenizer="org/name"))  # a hub name: not checked here
    with pytest.raises(MissingPathError, match=r"model.tokenizer './no-such-tok' does not exist"):
        check_tokenizer_path(ModelConfig(name_or_path="builtin:tiny", tokenizer="./no-such-tok"))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(MissingPathError, match=r"model.name_or_path 'ckpt' has no tokenizer files .*set model.tokenizer"):
        check_tokenizer_path(ModelConfig(name_or_path="ckpt"))

    for ok in ("synthetic", "org/dataset", "models"):
        check_data_path(ok)
    with pytest.raises(MissingPathError, match=r"data.train\[0\].path './data/train' does not exist"):
        check_data_path("./data/train", "data.train[0].path")
    (tmp_path / "train").write_text(json.dumps(GOOD))
    with pytest.raises(UserError, match=r"data path 'train' has no file suffix"):
        list(read_rows("train"))
    with pytest.raises(MissingPathError, match=r"'models/train' does not exist"):  # never sent to the hub
        list(read_rows("models/train"))


def test_load_tokenizer_names_a_missing_path(tmp_path):
    from align.config import ModelConfig
    from align.engine.models import load_tokenizer
    from data_builders.paths import MissingPathError

    with pytest.raises(MissingPathError, match=rf"model.tokenizer '{tmp_path}/tok' does not exist"):
        load_tokenizer(ModelConfig(name_or_path="builtin:tiny", tokenizer=str(Path(tmp_path) / "tok")))


def test_a_prompts_file_is_read_like_every_data_file(tmp_path):
    """RLHF / eval / bon / sampling prompt files: a bad line or a row without messages names file and row (it was a
    bare JSONDecodeError traceback); good rows get their uid before sharding."""
    from align.evaluation import load_prompts
    from data_builders.readers import EmptyDataError

    good = {"messages": [{"role": "user", "content": "1+1?"}], "answer": 2}
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(BadRowError, match=rf"{path}: row 2: field '<json>': invalid JSON"):
        load_prompts(str(path), None, 10)
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "no messages"}) + "\n")
    with pytest.raises(BadRowError, match=rf"{path}: row 2: field 'messages': a prompt row needs a non-empty `messages` list"):
        load_prompts(str(path), None, 10)
    assert [p["uid"] for p in load_prompts(str(path), None, 1)] == ["prompt-0"]  # only the rows asked for are read
    path.write_text("")
    with pytest.raises(EmptyDataError, match="data file is empty"):
        load_prompts(str(path), None, 10)


def test_a_run_directory_given_as_a_model_points_at_its_export(tmp_path):
    from align.model_paths import MissingPathError, check_model_path

    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "config.json").write_text("{}")
    with pytest.raises(MissingPathError, match=r"bon.reward_model '.*run' is a directory without a config.json.*model/ directory"):
        check_model_path(str(tmp_path / "run"), "bon.reward_model")
    check_model_path(str(tmp_path / "run" / "model"), "bon.reward_model")  # the export itself is fine
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingPathError, match="not a saved model$"):
        check_model_path(str(tmp_path / "empty"))
