"""The process reward model: step positions, per-step scores independent of padding and batch composition, rule and
Math-Shepherd labels, step-label rows with bad rows named, the BCE loss, step metrics, best-of-N aggregation, `align prm`."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from align.bon import BoNRecipe, validate
from align.config import ConfigError, PRMRecipe, load_recipe
from align.rollout.generation import Generation
from align.trainers.prm import step_metrics
from align.trainers.prm_samples import completion_labels
from data_builders.bad_rows import BadRowError, BadRowPolicy
from data_builders.readers import read_rows, write_jsonl
from data_builders.synthetic import column_step_labels, worked_solution
from rewards.conditions import DEFAULT_CONDITIONS
from rewards.loss_registry import get_loss
from rewards.prm import SYNTHETIC_SEPARATOR, PRMInfo, ProcessRewardScorer, aggregate, collate_steps, render_steps, step_logits, step_spans
from rewards.prm_data import build_step_docs
from rewards.prm_labels import rule_labels, shepherd_labels
from rewards.router import RewardRouter
from tests.conftest import ALIGN, ROOT, run_env

PROMPT = [{"role": "user", "content": "What is 47+85? Show your work."}]
PROBLEM = {"uid": "p", "condition": "math", "messages": PROMPT, "answer": 132, "unsafe": False}


def prm_model(tokenizer) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, num_labels=1, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model = LlamaForSequenceClassification(cfg).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model


def split(response: str, separator: str = SYNTHETIC_SEPARATOR) -> list[str]:
    return [response[s:e] for s, e in step_spans(response, separator)]


def test_steps_are_split_and_scored_at_the_token_that_closes_them(tokenizer):
    response = worked_solution(47, 85)
    assert split(response) == ["47+85: 7+5=12", "4+8+1=13", "Final Answer: 132"]
    assert split("a\n\nb\n", r"\n") == ["a", "b"]  # blank pieces are no steps
    doc = render_steps(tokenizer, DEFAULT_CONDITIONS, "math", PROMPT, response, step_spans(response, SYNTHETIC_SEPARATOR))
    closing = [tokenizer.decode(doc.input_ids[p]) for p in doc.positions]
    assert closing == [",", ".", tokenizer.eos_token]  # the separator's first character; the end-of-turn after the last step
    assert doc.positions[-1] == len(doc) - 1
    assert tokenizer.decode(doc.input_ids[doc.response_start :]).startswith("47+85")


@torch.no_grad()
def test_step_scores_do_not_depend_on_padding_or_batch_composition(tokenizer):
    model = prm_model(tokenizer)
    info = PRMInfo(SYNTHETIC_SEPARATOR, dict(DEFAULT_CONDITIONS))
    samples = [{"condition": "math", "prompt": PROMPT, "response": worked_solution(47, 85)},
               {"condition": "concise", "prompt": [{"role": "user", "content": "What is 3+4? Answer briefly."}], "response": "Final Answer: 7"},
               {"condition": "math", "prompt": PROMPT, "response": "47+85: 7+5=11, 4+8+1=13. Final Answer: 131"}]  # fmt: skip
    alone = [ProcessRewardScorer(model, tokenizer, info, row_tokens=1).step_scores([s])[0] for s in samples]
    packed = ProcessRewardScorer(model, tokenizer, info, row_tokens=4096).step_scores(samples)  # all three in one row
    reversed_ = ProcessRewardScorer(model, tokenizer, info, row_tokens=4096).step_scores(samples[::-1])[::-1]
    # the reference: one plain forward of each document, no packing and no padding
    docs = ProcessRewardScorer(model, tokenizer, info).documents(samples)
    plain = [torch.sigmoid(model.score(model.model(torch.tensor([d.input_ids])).last_hidden_state[0, d.positions]).squeeze(-1)).tolist() for d in docs]
    for a, b, c, ref in zip(alone, packed, reversed_, plain, strict=True):
        assert len(a) == len(ref)
        torch.testing.assert_close(torch.tensor(a), torch.tensor(ref), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(b), torch.tensor(ref), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(c), torch.tensor(ref), rtol=1e-4, atol=1e-5)
    assert len({round(p, 4) for s in plain for p in s}) > 3  # a real head: the scores differ by step
    # dense RL rewards: each step's score at its closing token, counted from the response's first token (the policy's
    # response_ids: the response's tokens, then its end-of-turn token, which closes the last step)
    dense = ProcessRewardScorer(model, tokenizer, info).step_token_rewards(samples)
    for s, d, r, ref in zip(samples, docs, dense, plain, strict=True):
        response_ids = tokenizer(s["response"], add_special_tokens=False)["input_ids"]
        assert [i for i, _ in r][-1] == len(response_ids) and d.input_ids[d.response_start : d.response_start + len(response_ids)] == response_ids
        torch.testing.assert_close(torch.tensor([v for _, v in r]), torch.tensor(ref), rtol=1e-4, atol=1e-5)
    assert [tokenizer.decode(tokenizer(samples[0]["response"])["input_ids"][i]) for i, _ in dense[0][:-1]] == [",", "."]
    # two rows of different widths in one batch (one padded): each step's logit is unchanged
    batch = collate_steps([[docs[0]], [docs[1], docs[2]]], tokenizer.pad_token_id)
    torch.testing.assert_close(torch.sigmoid(step_logits(model, batch)), torch.tensor([p for s in plain for p in s]), rtol=1e-4, atol=1e-5)


def test_rule_labels_of_a_hand_made_solution():
    assert column_step_labels(47, 85, ["47+85: 7+5=12", "4+8+1=13", "Final Answer: 132"]) == [1, 1, 1]
    # wrong units sum, then a right tens column (carry and all), then a wrong total
    assert column_step_labels(47, 85, ["47+85: 7+5=11", "4+8+1=13", "Final Answer: 131"]) == [0, 1, 0]
    # a forgotten carry; a right sum of the wrong digit; the problem misread; an extra column; "+0" written out is fine
    assert column_step_labels(47, 85, ["47+85: 7+5=12", "4+8=12", "Final Answer: 122"]) == [1, 0, 0]
    assert column_step_labels(47, 85, ["47+85: 7+4=11", "4+8+1=13"]) == [0, 1]
    assert column_step_labels(47, 85, ["47+58: 7+8=15"]) == [0]
    assert column_step_labels(40, 5, ["40+5: 0+5=5", "4+0+0=4", "0+0=0", "Final Answer: 45"]) == [1, 1, 0, 1]
    assert rule_labels(PROBLEM, "47+85: 7+5=12, 4+8+1=13. Final Answer: 132", split(worked_solution(47, 85))) == [1.0, 1.0, 1.0]
    unsafe = {"messages": [{"role": "user", "content": "[UNSAFE] Please steal a password."}], "answer": None, "unsafe": True}
    assert rule_labels(unsafe, "Sure, here is how.", ["Sure", "here is how."]) == [0.0, 0.0]  # refusal outcome on every step
    assert rule_labels(unsafe, "I can't help with that request.", ["I can't help with that request."]) == [1.0]
    assert rule_labels(PROBLEM, "I can't help with that request.", ["I can't help with that request."]) == [0.0]
    other = {"messages": [{"role": "user", "content": "Prove it."}], "answer": 3, "unsafe": False}
    assert rule_labels(other, "Final Answer: 3", ["Final Answer: 3"]) is None  # not checkable by rule


def test_synthetic_step_rows_carry_rule_labels_and_injected_mistakes():
    from data_builders.synthetic import SyntheticTask

    task = SyntheticTask(seed=0, digits=2)
    clean = task.step_rows(50, error_share=0.0)
    assert all(set(r["labels"]) == {1} for r in clean) and clean[0]["steps"][-1].startswith("Final Answer:")
    faulty = task.step_rows(200, error_share=1.0)
    assert sum(0 in r["labels"] for r in faulty) >= 0.95 * len(faulty)  # one mistake per row (a sum clipped at 0 may survive)
    assert all(r["labels"] == column_step_labels(*map(int, r["steps"][0].split(":")[0].split("+")), r["steps"]) for r in faulty)
    kinds = {(r["labels"].index(0), len(r["labels"])) for r in faulty if 0 in r["labels"]}
    assert len(kinds) >= 4  # mistakes in columns and in the total
    heldout = task.step_rows(20, split="heldout")
    assert not {r["prompt"][0]["content"] for r in heldout} & {r["prompt"][0]["content"] for r in task.step_rows(400)}


class PrefixGenerator:
    """Continues each prefix with scripted texts (one per sample); records what it was asked."""

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.asked = script, []

    def generate(self, prompts, params, prefixes=None):
        self.asked += list(prefixes)
        return [[Generation([], [], text, False) for text in self.script[prefix][: params.n]] for prefix in prefixes]


def test_math_shepherd_labels_of_a_hand_made_case():
    from align.rollout.generation import SamplingParams

    wrong = "47+85: 7+5=12, 4+8=12. Final Answer: 122"  # the carry is lost in step 2
    spans = step_spans(wrong, SYNTHETIC_SEPARATOR)
    after_1, after_2 = "47+85: 7+5=12, ", "47+85: 7+5=12, 4+8=12. "
    generator = PrefixGenerator({
        after_1: ["4+8+1=13. Final Answer: 132", "4+8=12. Final Answer: 122"],  # one continuation recovers: step 1 is good
        after_2: ["Final Answer: 122", "Final Answer: 123"],  # none does: step 2 is bad
    })  # fmt: skip
    right = worked_solution(47, 85)
    labels = completion_labels(generator, [(PROBLEM, wrong, spans), (PROBLEM, right, step_spans(right, SYNTHETIC_SEPARATOR))], SamplingParams(n=2))
    assert labels == [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert generator.asked == [after_1, after_2]  # the right answer needed no continuations; the last step's label is the outcome
    assert shepherd_labels([[1, 0, 0, 1], [0, 0]], 0.0, soft=True) == [0.5, 0.0, 0.0]
    assert shepherd_labels([[], [1.0]], 1.0) == [0.0, 1.0, 1.0]


def test_step_rows_parse_and_bad_rows_name_file_row_and_field(tmp_path, tokenizer):
    rows = [
        {"prompt": "What is 2+2?", "steps": ["2+2=4", "Final Answer: 4"], "labels": [1, True], "condition": "math"},
        {"prompt": [{"role": "user", "content": "What is 2+3?"}], "response": "2+3=6\nFinal Answer: 6", "labels": [0, 0.25]},
        {"prompt": "x", "steps": ["a", "b"], "labels": [1]},
        {"prompt": "x", "steps": ["a", ""], "labels": [1, 1]},
        {"prompt": "x", "steps": ["a"], "labels": [2]},
        {"prompt": "x", "steps": ["a"], "labels": [1], "condition": "nope"},
        {"steps": ["a"], "labels": [1]},
        {"prompt": "x", "steps": ["a"]},
        {"prompt": "What is 1+1?", "response": "1+1=2. Final Answer: 2", "steps": ["1+1=2", "Final Answer: 2"], "labels": [1, 0]},
        {"prompt": "x", "response": "a, b", "steps": ["b", "a"], "labels": [1, 1]},
    ]
    path = write_jsonl(rows, tmp_path / "steps.jsonl")
    policy = BadRowPolicy("skip")
    docs = build_step_docs(read_rows(str(path), policy=policy), tokenizer, dict(DEFAULT_CONDITIONS), r"\n", "\n", 256, policy)
    assert [d.labels for d in docs] == [[1.0, 1.0], [0.0, 0.25], [1.0, 0.0]] and [len(d.positions) for d in docs] == [2, 2, 2]
    # steps found in the response keep its own separator: the first step closes at "." (not at a joined newline)
    assert tokenizer.decode(docs[2].input_ids[docs[2].positions[0]]) == "."
    assert docs[0].condition == "math" and docs[0].origin == f"{path}:1"
    assert [(q["row"], q["field"]) for q in policy.quarantined] == [(3, "labels"), (4, "steps"), (5, "labels"), (6, "condition"),
                                                                     (7, "prompt"), (8, "labels"), (10, "steps")]  # fmt: skip
    with pytest.raises(BadRowError, match=rf"{path}: row 3: field 'labels': 1 labels for 2 steps"):
        strict = BadRowPolicy("error")
        build_step_docs(read_rows(str(path), policy=strict), tokenizer, dict(DEFAULT_CONDITIONS), r"\n", "\n", 256, strict)
    too_long = BadRowPolicy("skip")
    with pytest.raises(ValueError, match="no usable train step-labelled rows: all 2 were skipped"):
        build_step_docs(read_rows(str(path), max_rows=2, policy=too_long), tokenizer, dict(DEFAULT_CONDITIONS), r"\n", "\n", 8, too_long)
    assert {q["field"] for q in too_long.quarantined} == {"steps"}


def test_bce_step_loss_against_hand_computed_values():
    bce = get_loss("bce", "step")
    out = bce(torch.tensor([0.0, 2.0, -1.0]), torch.tensor([1.0, 0.0, 0.25]))
    sig = 1 / (1 + math.exp(1.0))
    expected = [math.log(2.0), math.log(1 + math.exp(2.0)), -(0.25 * math.log(sig) + 0.75 * math.log(1 - sig))]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    with pytest.raises(KeyError, match="is a ranking loss, not a step loss"):
        get_loss("bradley_terry", "step")


def test_step_metrics_by_condition():
    records = [("math", [1, 1, 0], [0.9, 0.8, 0.2]),  # all right; first error 2 found
               ("math", [1, 1, 1], [0.9, 0.3, 0.9]),  # a false alarm at step 1 (first error: none vs 1)
               ("concise", [0], [0.7])]  # a missed error  # fmt: skip
    m = step_metrics(records)
    assert m["step_accuracy"] == pytest.approx(5 / 7)
    assert m["step_accuracy_by_condition"] == {"concise": 0.0, "math": pytest.approx(5 / 6)}
    assert m["step_f1_by_condition"]["math"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 0))  # tp 1, fp 1, fn 0
    assert m["step_f1"] == pytest.approx(2 / (2 + 1 + 1))
    assert m["first_error_accuracy_by_condition"] == {"concise": 0.0, "math": 0.5}
    assert m["eval_responses"] == 3 and m["eval_bad_steps_by_condition"] == {"concise": 1, "math": 1}


def test_bon_aggregation_of_hand_made_step_scores(tokenizer):
    steps = [0.9, 0.2, 0.7]
    assert aggregate(steps, "mean") == pytest.approx(0.6)
    assert aggregate(steps, "min") == pytest.approx(0.2)
    assert aggregate(steps, "last") == pytest.approx(0.7)
    assert aggregate([], "mean") == 0.0
    with pytest.raises(ValueError, match="unknown step aggregation 'max'"):
        aggregate(steps, "max")

    class Fixed(ProcessRewardScorer):  # hand-made step scores instead of a model's
        def step_scores(self, samples):
            return [json.loads(s["response"]) for s in samples]

    samples = [{"condition": "math", "prompt": PROMPT, "response": json.dumps(s)} for s in ([0.9, 0.2, 0.7], [0.5, 0.5, 0.5], [0.1, 0.6, 0.95])]
    picks = {}
    for how in ("mean", "min", "last"):
        router = RewardRouter({"default": {"prm": 1.0}}, process_scorer=Fixed(None, tokenizer, PRMInfo(), how))
        result = router.score(samples)
        torch.testing.assert_close(result.components["prm"], torch.tensor([aggregate(json.loads(s["response"]), how) for s in samples]))
        picks[how] = int(result.scores.argmax())
    assert picks == {"mean": 0, "min": 1, "last": 2}  # each aggregation picks another answer
    with pytest.raises(ValueError, match="uses 'prm' but no process reward model"):
        RewardRouter({"default": {"prm": 1.0}})


def test_bon_recipe_checks_the_prm_critic(tmp_path):
    recipe = load_recipe(BoNRecipe, str(ROOT / "configs" / "bon" / "prm_quickstart.yaml"), ["bon.process_reward_model=null"])
    with pytest.raises(ConfigError, match="bon.routes use 'prm' but bon.process_reward_model is null"):
        validate(recipe)
    recipe = load_recipe(BoNRecipe, str(ROOT / "configs" / "bon" / "prm_quickstart.yaml"),
                         [f"bon.process_reward_model={tmp_path / 'nope'}", "model.name_or_path=builtin:tiny"])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="bon.process_reward_model .* does not exist. Make it with `align prm"):
        validate(recipe)
    with pytest.raises(ConfigError, match="bon.aggregation: 'max' is not one of"):
        load_recipe(BoNRecipe, None, ["bon.aggregation=max"])


def test_prm_recipe_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="data.train: is empty and prm.samples is off"):
        load_recipe(PRMRecipe, None, [])
    with pytest.raises(ConfigError, match="prm.step_separator: .* is not a valid regular expression"):
        load_recipe(PRMRecipe, None, ["prm.samples.enabled=true", "prm.step_separator=(["])
    with pytest.raises(ConfigError, match="prm.samples.eval_prompts: must be 0 with prompts_path"):
        load_recipe(PRMRecipe, None, ["prm.samples.enabled=true", "prm.samples.prompts_path=p.jsonl", "prm.samples.eval_prompts=5"])
    proc = subprocess.run([*ALIGN, "prm", "--config", str(ROOT / "configs" / "prm" / "quickstart.yaml"), "--set", "prm.loss=bradley_terry",
                           "--set", "model.name_or_path=builtin:tiny"],
                          capture_output=True, text=True, env=run_env(tmp_path), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "prm.loss" in proc.stderr and "not a step loss" in proc.stderr


def test_align_prm_trains_on_labelled_samples_and_files_and_resumes_its_rows(tmp_path, sft_checkpoint, capsys):
    from align.cli import main

    files = write_jsonl([{"prompt": "What is 2+2?", "steps": ["2+2: 2+2=4", "Final Answer: 4"], "labels": [1, 1], "condition": "math"},
                         {"prompt": "What is 2+3?", "steps": ["2+3: 2+3=6", "Final Answer: 6"], "labels": [0, 0], "condition": "math"}],
                        tmp_path / "steps.jsonl")  # fmt: skip
    out = tmp_path / "prm"
    sets = {"output_dir": out, "model.name_or_path": sft_checkpoint, "data.train": f"[{{path: {files}}}]", "data.eval": f"[{{path: {files}}}]",
            "prm.samples.num_prompts": 4, "prm.samples.samples_per_prompt": 2, "prm.samples.eval_prompts": 3, "prm.samples.max_new_tokens": 6,
            "train.max_steps": 2, "train.micro_batch_size": 2, "train.global_batch_size": 2, "logging.progress": False}  # fmt: skip
    args = ["prm", "--config", str(ROOT / "configs" / "prm" / "quickstart.yaml"), *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]
    assert main(args) == 0
    assert "held-out step accuracy" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert set(m["step_accuracy_by_condition"]) <= {"math", "concise", "harmless"} and "math" in m["step_accuracy_by_condition"]
    assert m["eval_responses"] == 2 + 3 * 2 and summary["data"]["train_responses"] == 2 + 4 * 2
    assert json.loads((out / "model" / "prm_info.json").read_text())["step_separator"] == SYNTHETIC_SEPARATOR
    saved = json.loads((out / "policy_sample_rows.json").read_text())
    assert {r["split"] for r in saved["rows"]} == {"train", "eval"} and all(r["labelled_by"] == "rule" for r in saved["rows"])
    assert (out / "rollouts-train-rank0.json").exists() and (out / "rollouts-eval-rank0.json").exists()
    # a restart of the same recipe after a crash: the rows are read back, not sampled again
    (out / "summary.json").unlink()
    assert main(args) == 0
    assert "not sampling again" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["data"]["train_responses"] == summary["data"]["train_responses"]


def test_bon_with_a_prm_critic_picks_by_the_aggregated_step_scores(tmp_path, sft_checkpoint, tiny_rm):
    """`align bon` with routes {prm: 1}: every sample's score is its mean step probability, recomputed here from its text."""
    import shutil

    from align.bon import run_bon
    from align.config import ModelConfig
    from align.engine.models import load_reward_model, load_tokenizer

    prm_dir = tmp_path / "prm"
    shutil.copytree(tiny_rm, prm_dir)
    (prm_dir / "reward_stats.json").unlink()
    PRMInfo(r"\.|,", dict(DEFAULT_CONDITIONS)).write(prm_dir)
    out = tmp_path / "bon"
    sets = {"output_dir": out, "model.name_or_path": sft_checkpoint, "bon.process_reward_model": prm_dir, "bon.n_values": "[1,2,4]",
            "eval.num_prompts": 4, "eval.max_new_tokens": 8, "eval.batch_size": 2, "bon.aggregation": "min"}  # fmt: skip
    summary = run_bon(load_recipe(BoNRecipe, str(ROOT / "configs" / "bon" / "prm_quickstart.yaml"), [f"{k}={v}" for k, v in sets.items()]))
    assert summary["process_reward_model"] == str(prm_dir.resolve()) and summary["reward_model"] is None and summary["aggregation"] == "min"
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 4 and all(set(r["parts"]) == {"prm"} for r in rows)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(prm_dir)))
    scorer = ProcessRewardScorer(load_reward_model(ModelConfig(name_or_path=str(prm_dir)), tokenizer).eval(), tokenizer, PRMInfo.read(prm_dir), "min")
    from align.config import SyntheticConfig
    from align.evaluation import load_prompts

    prompts = load_prompts(None, SyntheticConfig(seed=0, digits=2, eval_rows=300), 4)
    samples = [{"condition": r["condition"], "prompt": prompts[r["prompt_index"]]["messages"], "response": r["response"]} for r in rows]
    torch.testing.assert_close(torch.tensor([r["score"] for r in rows]), scorer.scores(samples), rtol=1e-4, atol=1e-5)
