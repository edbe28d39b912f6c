"""`align bon`: picks are the router's argmax among the first N samples, the metrics follow from the saved samples,
missing checkpoints name the command that makes them, and a 2-rank launch gives the 1-rank samples."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import ROOT, ScriptedGenerator, run_env

QUICKSTART = str(ROOT / "configs" / "bon" / "quickstart.yaml")


def bon_overrides(out: Path, sft: Path, rm: Path | str, **extra: object) -> list[str]:
    base = {"output_dir": str(out), "model.name_or_path": str(sft), "bon.reward_model": str(rm), "bon.n_values": "[1,2,4]",
            "eval.num_prompts": 6, "eval.max_new_tokens": 8, "eval.batch_size": 2, "logging.wandb": False}  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def read_samples(out: Path) -> dict[int, list[dict]]:
    by_prompt: dict[int, list[dict]] = defaultdict(list)
    for line in (out / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_prompt[row["prompt_index"]].append(row)
    return {p: sorted(rows, key=lambda r: r["sample_index"]) for p, rows in sorted(by_prompt.items())}


def check_against_samples(out: Path, n_values: list[int], num_prompts: int) -> tuple[dict, dict[int, list[dict]]]:
    """Recompute every metric from samples.jsonl: each pick is the first argmax of the router scores among the first N."""
    summary, samples = json.loads((out / "summary.json").read_text()), read_samples(out)
    m = summary["metrics"]
    assert list(samples) == list(range(num_prompts)) and all(len(rows) == max(n_values) for rows in samples.values())
    for n in n_values:
        picked = []
        for rows in samples.values():
            scores = [r["score"] for r in rows[:n]]
            best = scores.index(max(scores))
            assert [r["sample_index"] for r in rows if n in r["picked_at"]] == [best]
            picked.append(rows[best])
        key = str(n)
        assert m["accuracy_at_n"][key] == pytest.approx(sum(r["correct"] for r in picked) / num_prompts)
        assert m["reward_at_n"][key] == pytest.approx(sum(r["score"] for r in picked) / num_prompts)
        assert m["pass_at_n"][key] == pytest.approx(sum(any(r["correct"] for r in rows[:n]) for rows in samples.values()) / num_prompts)
        for condition, value in m["accuracy_by_condition_at_n"][key].items():
            mine = [r for r in picked if r["condition"] == condition]
            assert value == pytest.approx(sum(r["correct"] for r in mine) / len(mine))
    assert m["accuracy_at_n"]["1"] == pytest.approx(sum(rows[0]["correct"] for rows in samples.values()) / num_prompts)
    passes = [m["pass_at_n"][str(n)] for n in n_values]
    assert passes == sorted(passes), passes
    assert all(m["pass_at_n"][str(n)] >= m["accuracy_at_n"][str(n)] for n in n_values)
    return summary, samples


def test_picks_are_the_router_argmax_of_the_first_n(tmp_path, sft_checkpoint, tiny_rm, tokenizer):
    """Scripted right/wrong answers (real token ids, real RM scores): accuracy, pass@N and reward per N follow from the samples."""
    from align.bon import BestOfN, BoNRecipe
    from align.config import load_recipe

    def script(i: int) -> list[str]:
        rng = random.Random(i)
        return [rng.choice(["right", "wrong"]) for _ in range(4)]

    class Scripted(BestOfN):
        def generator(self):
            self.scripted = ScriptedGenerator(tokenizer, self.problems, script)
            return self.scripted

    out = tmp_path / "bon"
    recipe = load_recipe(BoNRecipe, QUICKSTART, bon_overrides(out, sft_checkpoint, tiny_rm, **{"eval.num_prompts": 24, "eval.batch_size": 5}))
    job = Scripted(recipe)
    summary = job.run()
    assert json.loads((out / "summary.json").read_text())["metrics"] == summary["metrics"]
    _, samples = check_against_samples(out, [1, 2, 4], 24)
    for p, rows in samples.items():  # the task verifier agrees with the script (a repeated prompt gets its last copy's script)
        scripted_as, _ = job.scripted.index[json.dumps(job.problems[p]["messages"])]
        assert [r["correct"] for r in rows] == [k == "right" for k in script(scripted_as)]
    assert any(rows[0]["correct"] != any(r["correct"] for r in rows) for rows in samples.values())  # pass@4 > accuracy@1 somewhere
    assert any(4 in r["picked_at"] and r["sample_index"] > 0 for rows in samples.values() for r in rows)  # the pick moves with N
    assert summary["verifiers_in_routes"] == [] and summary["job"] == "bon"
    assert set(summary["metrics"]["accuracy_by_condition_at_n"]["4"]) == {"math", "concise", "harmless"}


def parser() -> argparse.ArgumentParser:
    from align.bon import register

    p = argparse.ArgumentParser(prog="align")
    register(p.add_subparsers(dest="command", required=True))
    return p


def test_command_samples_the_policy(tmp_path, sft_checkpoint, tiny_rm, capsys):
    """`align bon` end to end on the tiny policy: max N samples per prompt, drawn once, seeded; a table on stdout."""
    out = tmp_path / "bon"
    args = parser().parse_args(["bon", "--config", QUICKSTART, *[a for o in bon_overrides(out, sft_checkpoint, tiny_rm) for a in ("--set", o)]])
    assert args.func(args) == 0
    summary, samples = check_against_samples(out, [1, 2, 4], 6)
    assert summary["samples_per_prompt"] == 4 and summary["world_size"] == 1 and summary["reward_model"] == str(tiny_rm.resolve())
    assert all(rows[0]["parts"].keys() == {"rm"} for rows in samples.values())  # the RM alone picks
    assert len({r["response"] for rows in samples.values() for r in rows}) > 6  # sampled, not greedy copies
    printed = capsys.readouterr().out
    assert "pass@N" in printed and printed.count("\n  4  ") == 1


def test_missing_reward_model_names_the_command(tmp_path, sft_checkpoint, capsys):
    from align.bon import main

    out = tmp_path / "bon"
    argv = ["--config", QUICKSTART, *[a for o in bon_overrides(out, sft_checkpoint, "runs/no-such-rm/model") for a in ("--set", o)]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "bon.reward_model 'runs/no-such-rm/model' does not exist" in err and "align rm --config configs/rm/quickstart.yaml" in err
    assert not out.exists()  # fails before the run directory is made
    assert main(["--config", QUICKSTART, "--set", f"output_dir={out}", "--set", "model.name_or_path=runs/no-such-sft/model"]) == 2
    assert "align sft --config configs/sft/quickstart.yaml" in capsys.readouterr().err


def test_bad_settings_fail_before_loading(tmp_path, sft_checkpoint, tiny_rm):
    from align.bon import BestOfN, BoNRecipe
    from align.config import ConfigError, load_recipe

    for extra, message in [({"bon.temperature": 0.0}, "greedy"), ({"bon.n_values": "[0, 2]"}, "positive"),
                           ({"bon.reward_model": "null"}, "reward_model is null")]:  # fmt: skip
        recipe = load_recipe(BoNRecipe, QUICKSTART, bon_overrides(tmp_path / "bon", sft_checkpoint, tiny_rm, **extra))
        with pytest.raises(ConfigError, match=message):
            BestOfN(recipe)


@pytest.mark.slow
def test_two_ranks_give_the_one_rank_samples(tmp_path, sft_checkpoint, tiny_rm):
    """Chunks are dealt over ranks and seeded by index: a 2-rank ZeRO-3 launch gathers every prompt and draws the 1-rank samples."""
    from align.bon import BoNRecipe, run_bon
    from align.config import load_recipe

    one, two = tmp_path / "one", tmp_path / "two"
    run_bon(load_recipe(BoNRecipe, QUICKSTART, bon_overrides(one, sft_checkpoint, tiny_rm)))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file",
                str(ROOT / "configs" / "accelerate" / "zero3.yaml"), "--main_process_port", "0", "-m", "align.bon"]  # fmt: skip
    cmd = launcher + ["--config", QUICKSTART, *[a for o in bon_overrides(two, sft_checkpoint, tiny_rm) for a in ("--set", o)]]
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("pass@N") == 1  # one report per job
    summary, samples = check_against_samples(two, [1, 2, 4], 6)
    assert summary["world_size"] == 2
    alone = read_samples(one)
    assert [r["response"] for rows in samples.values() for r in rows] == [r["response"] for rows in alone.values() for r in rows]
    assert [r["score"] for rows in samples.values() for r in rows] == pytest.approx([r["score"] for rows in alone.values() for r in rows], abs=1e-4)
