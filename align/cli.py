"""`align <command> --config RECIPE.yaml [--set key.sub=value ...]`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from align.config import ConfigError, MPORecipe, PRMRecipe, RLHFRecipe, RMRecipe, SFTRecipe, load_recipe
from align.model_paths import MAKE_PRM, MAKE_RM, check_model_path, check_recipe_paths, check_tokenizer_path
from data_builders.errors import UserError


def _add_common(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    parser.add_argument("--config", required=config_required, help="YAML recipe under configs/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")


def _train(recipe: Any, load_trainer: Callable[[], type]) -> int:
    """Run one job; the recipe and its model, tokenizer and data paths are checked before torch and the trainer load,
    so such errors are instant."""
    check_recipe_paths(recipe)
    if isinstance(recipe, MPORecipe):
        check_mpo_losses(recipe)
    if isinstance(recipe, PRMRecipe):
        check_prm_loss(recipe)
    from align.runner import run_job

    summary = run_job(load_trainer(), recipe)
    if os.environ.get("RANK", "0") == "0":  # one report per job, not per rank
        _print_result(summary)
    return 0


def check_mpo_losses(recipe: MPORecipe) -> None:
    """Every `mpo.losses` name is a registered preference loss. It imports the loss modules (and so torch), so it runs after
    the torch-free checks but before any model or data loads."""
    import align.losses.preference  # noqa: F401 - registers the preference losses
    import rewards.losses  # noqa: F401 - registers the ranking losses, so one put here by mistake is named as such
    from align.losses import get_loss

    for name in recipe.mpo.losses:
        try:
            get_loss(name, "preference")
        except KeyError as err:
            raise ConfigError(f"mpo.losses.{name}: {err}") from None


def check_prm_loss(recipe: PRMRecipe) -> None:
    """`prm.loss` is a registered step loss, checked before any model or data loads."""
    import rewards.losses  # noqa: F401 - registers the reward-model losses
    from align.losses import get_loss

    try:
        get_loss(recipe.prm.loss, "step")
    except KeyError as err:
        raise ConfigError(f"prm.loss: {err}") from None


def _sft_trainer() -> type:
    from align.trainers.sft import SFTTrainer

    return SFTTrainer


def _rm_trainer() -> type:
    from align.trainers.rm import RMTrainer

    return RMTrainer


def _prm_trainer() -> type:
    from align.trainers.prm import PRMTrainer

    return PRMTrainer


def _mpo_trainer() -> type:
    from align.trainers.mpo import MPOTrainer

    return MPOTrainer


def cmd_sft(args: argparse.Namespace) -> int:
    return _train(load_recipe(SFTRecipe, args.config, args.overrides), _sft_trainer)


def cmd_rm(args: argparse.Namespace) -> int:
    return _train(load_recipe(RMRecipe, args.config, args.overrides), _rm_trainer)


def cmd_prm(args: argparse.Namespace) -> int:
    return _train(load_recipe(PRMRecipe, args.config, args.overrides), _prm_trainer)


def cmd_mpo(args: argparse.Namespace) -> int:
    """One MPO job, or online MPO's rounds when `mpo.sampled_pairs.rounds` > 1."""
    recipe = load_recipe(MPORecipe, args.config, args.overrides)
    if recipe.mpo.sampled_pairs.rounds <= 1:
        return _train(recipe, _mpo_trainer)
    from align.trainers.online_mpo import check_online, run_online_mpo

    check_online(recipe)  # the rounds' settings first, then the paths, before torch loads
    check_recipe_paths(recipe)
    check_mpo_losses(recipe)

    summary = run_online_mpo(recipe)
    if os.environ.get("RANK", "0") == "0":
        for r in summary["rounds"]:
            m, pairs = r["metrics"], (r["sampled_pairs"] or {}).get("pairs", 0)
            acc = f"task accuracy {m['accuracy_before']:.1%} -> {m['accuracy_after']:.1%}, " if "accuracy_after" in m else ""
            print(f"[mpo] round {r['round']}{' (finished earlier, skipped)' if r['skipped'] else ''}: {acc}{pairs} sampled pairs; {r['run_dir']}")
        _print_result(summary)
    return 0


def _kl_text(metrics: dict) -> str:
    """The summed KL per response when the run measured it, else the update's per-token k3 KL (GRPO's loss term)."""
    if math.isfinite(metrics.get("kl", float("nan"))):
        return f"; KL {metrics['kl']:.3f}"
    return f"; KL per token (k3) {metrics['kl_loss']:.4f}" if "kl_loss" in metrics else ""


def cmd_rlhf(args: argparse.Namespace) -> int:
    recipe = load_recipe(RLHFRecipe, args.config, args.overrides)
    check_recipe_paths(recipe)
    if recipe.ppo.uses_reward_model:
        check_model_path(recipe.ppo.reward_model, "ppo.reward_model", MAKE_RM)
    if recipe.ppo.process_reward_model is not None:
        check_model_path(recipe.ppo.process_reward_model, "ppo.process_reward_model", MAKE_PRM)
    from align.trainers.rlhf import run_rlhf

    summary = run_rlhf(recipe)
    if os.environ.get("RANK", "0") == "0":
        m = summary["metrics"]
        if "reward_before" in m:
            by = ", ".join(f"{c} {m['accuracy_by_condition_before'][c]:.0%}→{v:.0%}" for c, v in m["accuracy_by_condition"].items())
            print(f"[rlhf] held-out reward {m['reward_before']:.3f} → {m['reward_after']:.3f}; task accuracy "
                  f"{m['accuracy_before']:.1%} → {m['accuracy_after']:.1%} ({by}){_kl_text(m)}")  # fmt: skip
        split = ", ".join(f"{k} {v:.0f} s" for k, v in summary["time_split_s"].items())
        print(f"[rlhf] {summary['iterations']} iterations, {summary['optimizer_steps']} optimizer steps, {summary['wall_s']:.0f} s ({split}); "
              f"model: {summary['model_path']}")  # fmt: skip
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Task accuracy per condition of any model directory, hub name or built-in config."""
    from align.engine.core import Engine
    from align.engine.models import load_causal_lm, load_tokenizer
    from align.engine.vision import image_text_for
    from align.evaluation import load_prompts, task_accuracy

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.name_or_path={args.model}")
    overrides.append("logging.wandb=false")
    recipe = load_recipe(SFTRecipe, args.config, overrides)
    check_model_path(recipe.model.name_or_path)
    check_tokenizer_path(recipe.model)
    if not args.config and not any(o.startswith("output_dir=") for o in args.overrides):
        recipe.output_dir = str(Path(args.model) / "eval") if args.model and Path(args.model).is_dir() else "runs/eval"
    engine = Engine.create(recipe)
    tokenizer = load_tokenizer(recipe.model)
    model = load_causal_lm(recipe.model, tokenizer, engine.dtype).to(engine.device)
    images = image_text_for(model, tokenizer, recipe.data.images)  # a VLM: prompts may carry images
    problems = load_prompts(recipe.eval.prompts_path, recipe.data.synthetic, recipe.eval.num_prompts)
    result = task_accuracy(model, tokenizer, problems, engine.accelerator, recipe.eval.max_new_tokens, recipe.eval.batch_size, images,
                           engine=engine)  # fmt: skip
    if engine.is_main:
        out = Path(recipe.output_dir) / "eval.json"
        out.write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0


def _print_result(summary: dict) -> None:
    metrics = summary["metrics"]
    if "accuracy" in metrics:
        by = ", ".join(f"{k} {v:.1%}" for k, v in metrics.get("accuracy_by_condition", {}).items())
        label = "pairwise accuracy" if summary["job"] == "rm" else "task accuracy"
        before = f" (before: {metrics['accuracy_before']:.1%})" if "accuracy_before" in metrics else ""
        print(f"[{summary['job']}] {label} {metrics['accuracy']:.1%} ({by}){before}")
    if "step_accuracy" in metrics:
        by = ", ".join(f"{c} {v:.1%} (F1 {metrics['step_f1_by_condition'][c]:.2f})" for c, v in metrics["step_accuracy_by_condition"].items())
        print(f"[{summary['job']}] held-out step accuracy {metrics['step_accuracy']:.1%} ({by}); error-step F1 {metrics['step_f1']:.2f}; "
              f"first-error-step accuracy {metrics['first_error_accuracy']:.1%} on {metrics['eval_responses']} responses")
    if "accuracy_by_tag" in metrics:
        counts = metrics.get("eval_pairs_by_tag", {})
        by = ", ".join(f"{k} {v:.1%} of {counts.get(k, '?')}" for k, v in metrics["accuracy_by_tag"].items())
        print(f"[{summary['job']}] by tag: {by}")
    if "preference_accuracy" in metrics:
        by = ", ".join(f"{k} {v:.1%}" for k, v in metrics["preference_accuracy_by_condition"].items())
        print(f"[{summary['job']}] held-out preference accuracy (implicit reward) {metrics['preference_accuracy']:.1%} ({by}), "
              f"reward margin {metrics['reward_margin']:.3f}, delta {metrics['delta']:.3f}")
    quarantined = (summary.get("data") or {}).get("quarantined")
    if quarantined:
        where = Path(summary["model_path"]).parent / "quarantine.jsonl"
        print(f"[{summary['job']}] {quarantined} bad row{'s' * (quarantined != 1)} skipped (data.on_bad_row: skip); quarantined in {where}")
    print(f"[{summary['job']}] {summary['steps']} steps, {summary['tokens']} tokens, {summary['wall_s']:.0f} s; model: {summary['model_path']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="Post-training: SFT, reward models, MPO, COOL RLHF.")
    sub = parser.add_subparsers(dest="command", required=True)
    sft = sub.add_parser("sft", help="supervised fine-tuning on chat data (assistant-only loss, packing)")
    _add_common(sft)
    sft.set_defaults(func=cmd_sft)
    rm = sub.add_parser("rm", help="conditional reward model on comparison pairs (ranking loss + log barrier)")
    _add_common(rm)
    rm.set_defaults(func=cmd_rm)
    prm = sub.add_parser("prm", help="process reward model: a score per reasoning step, binary loss on step labels (VisualPRM)")
    _add_common(prm)
    prm.set_defaults(func=cmd_prm)
    mpo = sub.add_parser("mpo", help="mixed preference optimisation: DPO + BCO + NLL (InternVL2.5-MPO)")
    _add_common(mpo)
    mpo.set_defaults(func=cmd_mpo)
    rlhf = sub.add_parser("rlhf", help="COOL RLHF: conditional online PPO in rounds (InternLM2)")
    _add_common(rlhf)
    rlhf.set_defaults(func=cmd_rlhf)
    from align import bon, pipeline, report, sweep

    bon.register(sub)
    pipeline.register(sub)
    report.register(sub)
    sweep.register(sub)
    ev = sub.add_parser("eval", help="task accuracy per condition on held-out prompts")
    _add_common(ev, config_required=False)
    ev.add_argument("--model", help="model directory, hub name or builtin:NAME (overrides model.name_or_path)")
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"align: config error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (UserError, FileNotFoundError) as err:  # a mistake the user can fix (every rank under a launcher may print it)
        print(f"align: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    """A user error is one line on the console, however its message was built."""
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


if __name__ == "__main__":
    sys.exit(main())
