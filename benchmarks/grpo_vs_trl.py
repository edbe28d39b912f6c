"""GRPO iteration throughput and memory: align's `align rlhf` loop (`ppo.advantage_estimator: grpo`) against TRL's `GRPOTrainer`.

Both sides train the same policy on the same prompts with the same reward, group size and settings:

- model: `--model PATH` (a saved checkpoint), or by default runs/sft-quickstart/model when it exists (a trained
  policy: realistic response lengths, non-trivial rewards), else a randomly initialised `builtin:small` Llama (seed 0)
  saved with the built-in tokenizer to a temp dir (`--model builtin:NAME` forces that); the script prints which;
- prompts: the synthetic suite's train prompts (`align.evaluation.load_prompts(None, recipe.data.synthetic, n,
  split="train")`), in exactly the order align's `iteration_prompts` takes them (the align side writes each
  iteration's prompt ids; TRL gets those rows in that order with `shuffle_dataset=False`), as conversational
  `{"prompt": messages}` rows (same rendered prompt tokens on both sides: checked);
- reward: `rewards.verifiers.task_score(problem, response_text)`; align through the router's `task` route, TRL
  through a reward function reading the row's `answer` and `unsafe` columns and the completion's text;
- per iteration: `--prompts` prompts (16 in --quick, as configs/rlhf/grpo_quickstart.yaml) × 8 samples (align
  `ppo.samples_per_prompt`, TRL `num_generations`), max 48 new tokens, temperature 1.0, top_p 1.0, no KL and no
  reference (align `kl_coef 0`, TRL `beta 0`), loss_type dapo, scale_rewards group, one optimizer step per generation
  batch (align `ppo_epochs 1, mini_batches 1`; TRL `num_iterations 1` and one optimizer step per generation batch),
  so neither computes old log-probs (on-policy shortcut on both); no truncation penalty (align
  `ppo.truncation_penalty 0`, TRL `mask_truncated_completions False`: truncated answers are trained as any other);
- optimizer: AdamW with the recipe's lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay, constant schedule,
  gradient clipping 1.0; fp32 on CPU; `--threads` torch threads (2); no gradient checkpointing; no logging, eval,
  saving or progress bars;
- generation: HF `generate` on both (TRL `use_vllm=False`), all 128 completions of an iteration in one call (align
  `ppo.generation_batch_size` 64 prompts ≥ 16; TRL `generation_batch_size=128`). Sampling is from the full distribution
  on both (no top-k: align's `SamplingParams.top_k` 0, TRL's default `top_k=0`).

TRL configuration: `per_device_train_batch_size=32, gradient_accumulation_steps=4, generation_batch_size=128`
(so `steps_per_generation=4`: one generate call per optimizer step, split into 4 micro-batches of 32 completions,
as align's `train.micro_batch_size` 32 rollouts), `beta=0.0` (no reference model is built), fp32 (`bf16=False`, far
slower on CPU), `optim="adamw_torch"`, `use_cpu=True`, `dataloader_num_workers=0`, `report_to="none"`,
`logging_strategy/save_strategy/eval_strategy="no"`, `disable_tqdm=True`, `log_completions=False`. The full run also
measures `per_device_train_batch_size=128, gradient_accumulation_steps=1` (one 128-completion micro-batch,
`steps_per_generation=1`) and the ratio is against the faster TRL configuration. trl 1.16's GRPO has no padding-free
option (`padding_free` is SFT/DPO only), so its micro-batches are padded to the longest prompt and completion; vLLM
and transformers' continuous batching are GPU-oriented generation backends and not used (HF generate on both sides).

Measured per side, in its own subprocess (peak RSS = `ru_maxrss` of that process): `--warmup` iterations not timed,
then `--iterations` timed ones. samples/s = completions trained over the timed iterations' wall time (align: wall of
`RLHFTrainer.run_iteration`; TRL: optimizer step to optimizer step, `TrainerCallback.on_step_end`). Time split per
iteration: align's own `time/*` metrics of `run_iteration` (generate, score, experience, train); TRL: timers around
`_generate` (prompt tokenisation, `generate`, decoding), `_calculate_rewards` (the reward function),
`_generate_and_score_completions` minus those two ("prepare": padding, advantages), and the rest of the optimizer
step ("update": forward/backward of the micro-batches, clipping, AdamW step). Before each side the script waits
(60 s at a time, up to `--max-wait` s) while the 1-minute load average is above `--max-load`, and prints the load
averages before and after each side: the machine is shared and 2 threads on 2 cores are slowed several-fold by any
other job.

The last line: `RESULT align/trl samples_per_s=<ratio> peak_rss=<ratio>`.

    python benchmarks/grpo_vs_trl.py --quick          # a few minutes on 2 CPU cores
    python benchmarks/grpo_vs_trl.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_vs_trl import REPO, run_json_process, side_result  # noqa: E402

GRPO_QUICKSTART = REPO / "configs" / "rlhf" / "grpo_quickstart.yaml"
SFT_MODEL = REPO / "runs" / "sft-quickstart" / "model"
PHASES = ("generate", "score", "prepare", "update")
TRL_CONFIGS = ("micro", "whole")  # per_device_train_batch_size = align's micro-batch, or the whole generation batch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8 timed iterations, TRL config micro only (about a minute on 2 cores when quiet)")
    p.add_argument("--model", default=None, help="a saved checkpoint or builtin:NAME (default: runs/sft-quickstart/model if present, else builtin:small)")
    p.add_argument("--iterations", type=int, default=None, help="timed iterations per side (default 8 quick, 20 full)")
    p.add_argument("--warmup", type=int, default=1, help="leading iterations not timed")
    p.add_argument("--prompts", type=int, default=16, help="prompts per iteration (align ppo.prompts_per_iteration)")
    p.add_argument("--samples", type=int, default=8, help="completions per prompt (ppo.samples_per_prompt, TRL num_generations)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--micro", type=int, default=32, help="align train.micro_batch_size (rollouts)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl", choices=["auto", *TRL_CONFIGS], default="auto", help="auto: both in a full run, micro in --quick")
    p.add_argument("--max-load", type=float, default=1.5, help="wait before a side while the 1-minute load average is above this")
    p.add_argument("--max-wait", type=int, default=600, help="seconds to wait at most for the load to drop, per side")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for align's side (e.g. data.max_length=96), for experiments")  # fmt: skip
    p.add_argument("--save", default=None, help="also write every side's per-iteration figures to this JSON file")
    p.add_argument("--child", choices=["align", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--trl-config", default="micro", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--prompt-order", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.iterations = args.iterations or (8 if args.quick else 20)
    return args


def recipe(args: argparse.Namespace, model_path: str, output_dir: Path) -> Any:
    """configs/rlhf/grpo_quickstart.yaml with the benchmark's shape; both sides read their settings from it."""
    from align.config import RLHFRecipe, load_recipe

    n = args.warmup + args.iterations
    overrides = [
        f"output_dir={output_dir}", f"model.name_or_path={model_path}", "model.dtype=float32", "model.gradient_checkpointing=false",
        "model.lora.enabled=false", "logging.wandb=false", "logging.progress=false", "eval.enabled=false", "ppo.rounds=1",
        f"ppo.iterations_per_round={n}", f"ppo.prompts_per_iteration={args.prompts}", f"ppo.samples_per_prompt={args.samples}",
        f"ppo.max_new_tokens={args.max_new_tokens}", f"ppo.num_prompts={max(2000, args.prompts * n)}", "ppo.truncation_penalty=0.0",
        "ppo.kl_coef=0.0", "ppo.ppo_epochs=1", "ppo.mini_batches=1", "ppo.temperature=1.0", "ppo.top_p=1.0", "ppo.loss_type=dapo",
        "ppo.scale_rewards=group", "ppo.ptx_coef=0.0", f"ppo.generation_batch_size={max(64, args.prompts)}",
        "optim={lr: 1.0e-4, weight_decay: 0.0, betas: [0.9, 0.999], eps: 1.0e-8, schedule: constant, warmup_steps: 0, max_grad_norm: 1.0}",
        f"train.micro_batch_size={args.micro}", f"train.seed={args.seed}", "train.save_every=0", "train.resume=false",
    ]  # fmt: skip
    return load_recipe(RLHFRecipe, GRPO_QUICKSTART, overrides + list(args.set))


# ----------------------------------------------------------------------------- children
def run_align(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    os.cpu_count = lambda: args.threads  # align's Engine sizes torch threads from the CPU count
    from align.trainers.rlhf import RLHFTrainer

    trainer = RLHFTrainer(recipe(args, args.model_path, work / "align"))
    trainer.setup()
    per = args.prompts * args.samples
    iterations, order = [], []
    for t in range(args.warmup + args.iterations):
        order.append([p["uid"] for p in trainer.iteration_prompts(t)])
        started = time.perf_counter()
        m = trainer.run_iteration(t)
        wall = time.perf_counter() - started
        iterations.append({"wall": wall, "generate": m["time/generate"], "score": m["time/score"], "prepare": m["time/experience"],
                           "update": m["time/train"], "completions": per, "response_length": m["response_length"],
                           "reward": m["reward"], "truncated_share": m["truncated_share"]})  # fmt: skip
    Path(args.prompt_order).write_text(json.dumps(order))
    return {"iterations": iterations, "threads": torch.get_num_threads(), "config": f"micro-batch {args.micro} rollouts, packed rows"}


class PhaseTimer:
    """Seconds per phase within the current optimizer step, and a record per finished step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.extra: dict[str, list[float]] = {"response_length": [], "reward": [], "truncated_share": []}

    def add(self, phase: str, seconds: float) -> None:
        self.current[phase] = self.current.get(phase, 0.0) + seconds


def run_trl(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from align.engine.models import load_causal_lm, load_tokenizer
    from align.evaluation import load_prompts
    from rewards.verifiers import task_score

    torch.set_num_threads(args.threads)
    r = recipe(args, args.model_path, work / "align-unused")
    tokenizer = load_tokenizer(r.model)
    model = load_causal_lm(r.model, tokenizer, torch.float32, seed=args.seed)
    pool = {p["uid"]: p for p in load_prompts(None, r.data.synthetic, r.ppo.num_prompts, split="train")}
    order = [uid for it in json.loads(Path(args.prompt_order).read_text()) for uid in it]
    rows = [{"prompt": pool[u]["messages"], "answer": pool[u]["answer"], "unsafe": pool[u]["unsafe"]} for u in order]

    def task_reward(prompts: list, completions: list, answer: list, unsafe: list, **_: Any) -> list[float]:
        return [task_score({"answer": a, "unsafe": u}, c[0]["content"]) for c, a, u in zip(completions, answer, unsafe, strict=True)]

    per = args.prompts * args.samples
    micro = args.micro if args.trl_config == "micro" else per
    accumulation = per // micro
    o = r.optim
    config = GRPOConfig(
        output_dir=str(work / "trl"), max_steps=args.warmup + args.iterations, per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation, generation_batch_size=per, num_generations=args.samples,
        max_completion_length=args.max_new_tokens, temperature=r.ppo.temperature, top_p=r.ppo.top_p, top_k=0, beta=0.0,
        num_iterations=1, epsilon=r.ppo.clip, loss_type="dapo", scale_rewards="group", mask_truncated_completions=False,
        learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=o.eps,
        optim="adamw_torch", max_grad_norm=o.max_grad_norm, lr_scheduler_type="constant", warmup_steps=0, seed=args.seed,
        bf16=False, use_cpu=True, gradient_checkpointing=False, use_vllm=False, shuffle_dataset=False, log_completions=False,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    timer = PhaseTimer()
    ends: list[float] = []
    steps: list[dict[str, float]] = []

    class StepTimer(TrainerCallback):
        start = 0.0

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            if not ends and not StepTimer.start:
                StepTimer.start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            ends.append(time.perf_counter())
            steps.append(timer.current)
            timer.current = {}

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate(self, prompts: list) -> Any:
            started = time.perf_counter()
            out = super()._generate(prompts)
            timer.add("generate", time.perf_counter() - started)
            lengths = [len(c) for c in out[1]]
            timer.extra["response_length"].append(statistics.fmean(lengths))
            timer.extra["truncated_share"].append(sum(len(c) == 0 or c[-1] not in self.eos_token_ids for c in out[1]) / len(lengths))
            return out

        def _calculate_rewards(self, *a: Any, **kw: Any) -> Any:
            started = time.perf_counter()
            out = super()._calculate_rewards(*a, **kw)
            timer.add("score", time.perf_counter() - started)
            timer.extra["reward"].append(float(out.mean()))
            return out

        def _generate_and_score_completions(self, *a: Any, **kw: Any) -> Any:
            started = time.perf_counter()
            out = super()._generate_and_score_completions(*a, **kw)
            timer.add("generate_and_score", time.perf_counter() - started)
            return out

    trainer = TimedGRPOTrainer(model=model, reward_funcs=task_reward, args=config, train_dataset=datasets.Dataset.from_list(rows),
                               processing_class=tokenizer, callbacks=[StepTimer()])  # fmt: skip
    trainer.train()
    iterations = []
    for i, (s, end) in enumerate(zip(steps, ends, strict=True)):
        wall = end - (ends[i - 1] if i else StepTimer.start)
        gen, score = s.get("generate", 0.0), s.get("score", 0.0)
        prepare = s.get("generate_and_score", 0.0) - gen - score
        iterations.append({"wall": wall, "generate": gen, "score": score, "prepare": prepare, "update": wall - gen - score - prepare,
                           "completions": per, "response_length": timer.extra["response_length"][i], "reward": timer.extra["reward"][i],
                           "truncated_share": timer.extra["truncated_share"][i]})  # fmt: skip
    return {"iterations": iterations, "threads": torch.get_num_threads(),
            "config": f"micro {micro} x accumulation {accumulation}, padded"}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    result = side_result(args, run_align, run_trl, "grpo_vs_trl")
    Path(args.out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent
def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def wait_for_quiet(args: argparse.Namespace) -> tuple[float, float, float]:
    """Sleep in 60 s chunks (at most `--max-wait` s) while the 1-minute load is above `--max-load`; the load then."""
    waited = 0
    while load_average()[0] > args.max_load and waited < args.max_wait:
        print(f"    load average {load_average()[0]:.2f} > {args.max_load}: waiting 60 s", flush=True)
        time.sleep(60)
        waited += 60
    return load_average()


def prepare_model(args: argparse.Namespace, root: Path) -> tuple[str, str]:
    """The checkpoint both sides train, and a line saying which."""
    name = args.model or (str(SFT_MODEL) if SFT_MODEL.is_dir() else "builtin:small")
    if not name.startswith("builtin:"):
        return name, f"model: {name} (saved checkpoint)"
    import torch

    from align.config import ModelConfig
    from align.engine.models import load_causal_lm, load_tokenizer

    cfg = ModelConfig(name_or_path=name)
    tok = load_tokenizer(cfg)
    out = root / "policy"
    load_causal_lm(cfg, tok, torch.float32, seed=args.seed).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out), f"model: {name}, random init (seed {args.seed}), saved with the built-in tokenizer (no SFT checkpoint found)"


def spawn(args: argparse.Namespace, side: str, trl_config: str, model_path: str, root: Path) -> dict[str, Any]:
    before = wait_for_quiet(args)
    out = root / f"{side}-{trl_config}.json"
    argv = [a for a in sys.argv[1:] if a != "--quick"]
    extra = ["--iterations", str(args.iterations), "--child", side, "--trl-config", trl_config, "--model-path", model_path,
             "--prompt-order", str(root / "prompt_order.json"), "--out", str(out)]  # fmt: skip
    label = f"{side}{'' if side == 'align' else f' ({trl_config})'}: {args.warmup} + {args.iterations} iterations"
    result, seconds = run_json_process([sys.executable, __file__, *argv, *extra], label, out, f"{side} child")
    after = load_average()
    print(f"done in {seconds:.0f} s (load average before {before[0]:.2f} {before[1]:.2f} {before[2]:.2f}, "
          f"after {after[0]:.2f} {after[1]:.2f} {after[2]:.2f})", flush=True)  # fmt: skip
    result["load_before"], result["load_after"] = before, after
    timed = result["iterations"][args.warmup :]
    wall = sum(i["wall"] for i in timed)
    result["samples_per_s"] = sum(i["completions"] for i in timed) / wall
    result["median_samples_per_s"] = statistics.median(i["completions"] / i["wall"] for i in timed)
    result["mean"] = {k: statistics.fmean(i[k] for i in timed) for k in (*PHASES, "wall", "response_length", "reward", "truncated_share")}
    return result


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    configs = [args.trl] if args.trl != "auto" else (["micro"] if args.quick else list(TRL_CONFIGS))
    with tempfile.TemporaryDirectory(prefix="grpo_vs_trl_") as tmp:
        root = Path(tmp)
        model_path, which = prepare_model(args, root)
        print(which)
        print(f"{args.prompts} prompts x {args.samples} samples = {args.prompts * args.samples} completions per iteration, "
              f"max {args.max_new_tokens} new tokens, {args.warmup} warm-up + {args.iterations} timed iterations, fp32, "
              f"{args.threads} threads")  # fmt: skip
        results = {"align": spawn(args, "align", "micro", model_path, root)}
        for config in configs:
            results[f"trl {config}"] = spawn(args, "trl", config, model_path, root)
    head = f"{'run':<14} {'configuration':<34} {'resp len':>8} {'reward':>6} " + " ".join(f"{p:>13}" for p in PHASES)
    print(f"\n{head} {'iter s':>7} {'samples/s':>9} {'median':>7} {'peak RSS MiB':>12}")
    for name, r in results.items():
        m = r["mean"]
        split = " ".join(f"{m[p]:>6.2f} ({m[p] / m['wall']:>3.0%})" for p in PHASES)
        print(f"{name:<14} {r['config']:<34} {m['response_length']:>8.1f} {m['reward']:>6.3f} {split} {m['wall']:>7.2f} "
              f"{r['samples_per_s']:>9.2f} {r['median_samples_per_s']:>7.2f} {r['peak_rss_mib']:>12.0f}")  # fmt: skip
    print("seconds per timed iteration (share of the iteration); align's split is its own time/* metrics (prepare = "
          "time/experience, update = time/train); resp len, reward: means over the timed iterations; samples/s = "
          "completions trained per second of the timed iterations, median = of the per-iteration rates")  # fmt: skip
    if args.save:
        Path(args.save).write_text(json.dumps(results, indent=1))
    trls = {k: v for k, v in results.items() if k.startswith("trl")}
    best = max(trls, key=lambda k: trls[k]["samples_per_s"])
    a, t = results["align"], trls[best]
    print(f"fastest TRL configuration: {best} ({t['config']}); ratios are align / that")
    print(f"RESULT align/trl samples_per_s={a['samples_per_s'] / t['samples_per_s']:.3f} peak_rss={a['peak_rss_mib'] / t['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
