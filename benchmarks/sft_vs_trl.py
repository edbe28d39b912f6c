"""SFT throughput and memory: align's SFT loop against TRL's `SFTTrainer`, same model, data and shape.

Both sides train the same randomly initialised Llama (align's `builtin:*` shape, same seed) on the
same synthetic conversations (`SyntheticTask.sft_conversations`), with the same max length, batch,
optimizer (AdamW, same lr/betas/eps, no weight decay), schedule, step count and torch threads,
loss on assistant tokens only, and packing that keeps documents apart. Each side runs in its own
subprocess so peak RSS (`ru_maxrss`) is its own; the parent prints a table and, last, the line
`RESULT align/trl tokens_per_s=<ratio> peak_rss=<ratio> mfu=<align's> trl_mfu=<TRL's>`. MFU is (6 × parameters +
12 × layers × hidden × attended keys) per trained token (causal attention within each document) × tokens/s, over a
large fp32 matmul measured in the same run on the same threads (CPU) or the GPU's dense bf16 peak.

TRL is given its fastest *correct* configuration: fp32 on CPU (bf16 is far slower there), no
gradient checkpointing, `assistant_only_loss=True`, no logging/eval/saving during the run, and either
`packing=True, packing_strategy="bfd"` (which turns on padding-free) or no packing with
`padding_free=True`, whichever measures faster (the full run measures both; `--quick` uses bfd, the
faster one in benchmarks/RESULTS.md). Padding-free without packing feeds as many documents per step
as align's packed step holds. TRL's `wrapped` packing is not used: documents would attend to each
other, which trains a different (wrong) model.

Tokens/s counts trained non-padding tokens (align: its batches' non-pad tokens; TRL: the attention
mask, or every token of a padding-free batch) over the wall time of the steps after `--warmup`
steps, excluding model/data setup. `--device cuda` trains both in bf16 autocast on `builtin:medium`
(random init, ~0.4B parameters) and adds MFU (6·params·tokens/s over the GPU's dense bf16 peak;
attention FLOPs left out: documents are short). If TRL cannot be imported there, align runs alone and
the RESULT ratios are `nan`; align's training path does not import TRL.

    python benchmarks/sft_vs_trl.py --quick          # < 3 min on 2 CPU cores
    python benchmarks/sft_vs_trl.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "TRANSFORMERS_VERBOSITY": "error"}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and only TRL's bfd config (< 3 min on 2 cores)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=None, help="builtin:tiny|small|medium (default: small on CPU, medium on cuda)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per side (default 8 quick, 25 full)")
    p.add_argument("--warmup", type=int, default=3, help="leading steps left out of tokens/s")
    p.add_argument("--batch", type=int, default=8, help="packed rows per step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl", choices=["auto", "bfd", "padding_free"], default="auto", help="auto: both in a full run, bfd in --quick")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak for MFU (default: from the device name)")
    p.add_argument("--child", choices=["align", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--trl-config", default="bfd", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = args.model or ("builtin:medium" if args.device == "cuda" else "builtin:small")
    args.steps = args.steps or (8 if args.quick else 25)
    # enough conversations for every step (documents average ~43 tokens, ~12 per 512-token row)
    args.rows = max(256, args.steps * args.batch * max(1, args.max_length // 32))
    return args


# ----------------------------------------------------------------------------- children
def steady_rate(tokens: list[int], ends: list[float], start: float, warmup: int) -> dict[str, float]:
    """Tokens/s over the steps after `warmup` (and the median step's, robust on a shared machine).

    `tokens` are per-step trained tokens, `ends` the steps' end times, `start` the first step's start.
    """
    w = min(warmup, len(tokens) - 1)
    seconds = ends[-1] - (ends[w - 1] if w > 0 else start)
    steps = [t / (e - b) for t, b, e in zip(tokens, [start, *ends], ends)][w:]
    return {"tokens_per_s": sum(tokens[w:]) / seconds, "median_step_tokens_per_s": statistics.median(steps), "timed_s": seconds}


def run_align(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    os.cpu_count = lambda: args.threads  # align's Engine sizes torch threads from the CPU count
    from align.config import SFTRecipe, load_recipe
    from align.runner import run_job
    from align.trainers.sft import SFTTrainer

    overrides = [
        f"output_dir={work / 'align'}", f"model.name_or_path={args.model}",
        f"model.dtype={'bfloat16' if args.device == 'cuda' else 'float32'}",
        "model.gradient_checkpointing=false", "model.lora.enabled=false", "data.train=[{path: synthetic}]",
        f"data.max_length={args.max_length}", "data.packing=true", "data.loss_reduction=token", "data.system_prompt=null",
        f"data.synthetic={{seed: {args.seed}, digits: 3, concise_share: 0.7, train_rows: {args.rows}, eval_rows: 8}}",
        f"optim={{lr: {args.lr}, weight_decay: 0.0, betas: [0.9, 0.999], eps: 1.0e-8, schedule: cosine, warmup_steps: 10, "
        "min_lr_ratio: 0.1, max_grad_norm: 1.0}",
        f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}", f"train.max_steps={args.steps}",
        f"train.seed={args.seed}", "train.log_every=1", "train.resume=false", "train.save_every=0", "train.eval_every=0",
        "logging.wandb=false", "logging.progress=false", "eval.enabled=false",
    ]  # fmt: skip
    recipe = load_recipe(SFTRecipe, REPO / "configs/sft/quickstart.yaml", overrides)
    summary = run_job(SFTTrainer, recipe)
    tokens, ends, _ = align_step_times(work / "align" / "metrics.jsonl")
    with torch.device("meta"):  # parameter count of the model as trained, without loading weights
        params = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig.from_pretrained(work / "align" / "model")).parameters())
    return {**steady_rate(tokens, ends, 0.0, args.warmup), "steps": summary["steps"], "tokens": summary["tokens"],
            "threads": torch.get_num_threads(), "config": f"packed best-fit, batch {args.batch} rows", "params": params}  # fmt: skip


def align_step_times(metrics_path: Path) -> tuple[list[int], list[float], list[dict[str, Any]]]:
    """Per-step trained tokens and cumulative step end times from an align run logged every step."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    records = [r for r in records if "tokens_per_s" in r]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}, *records], records)]
    seconds = [t / r["tokens_per_s"] for t, r in zip(tokens, records)]
    return tokens, [sum(seconds[: i + 1]) for i in range(len(seconds))], records


def trl_training_args(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The TrainingArguments both TRL peers share: same optimizer and schedule as align, no logging, saving or eval."""
    return dict(
        output_dir=str(work / "trl"), max_steps=args.steps, gradient_accumulation_steps=1, learning_rate=args.lr,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch", max_grad_norm=1.0,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=10, seed=args.seed,
        gradient_checkpointing=False, report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip


def step_timer(cuda_sync: bool = False) -> Any:
    """A TrainerCallback recording when the first step starts (`.start`) and when each step ends (`.ends`)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.start, self.ends = 0.0, []

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            if not self.ends:
                self.start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if cuda_sync:
                import torch

                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    return StepTimer()


def run_trl(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import datasets
    import torch

    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError as err:  # the GPU machine may lack TRL: the parent then reports align alone
        return {"unavailable": f"{type(err).__name__}: {err}"}

    from align.config import ModelConfig
    from align.engine.models import load_causal_lm, load_tokenizer
    from data_builders.packing import pack_best_fit
    from data_builders.synthetic import SyntheticTask

    torch.set_num_threads(args.threads)
    cfg = ModelConfig(name_or_path=args.model)
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, tokenizer, torch.float32, seed=args.seed)
    rows = [{"messages": r["messages"]} for r in SyntheticTask(args.seed, 3, 0.7).sft_conversations(args.rows)]
    packing = args.trl_config == "bfd"
    batch = args.batch
    if not packing:  # as many documents per step as align's packed step holds
        lengths = [len(tokenizer.apply_chat_template(r["messages"], return_dict=True)["input_ids"]) for r in rows]
        batch = round(args.batch * len(rows) / len(pack_best_fit(lengths, args.max_length)))
    config = SFTConfig(
        **trl_training_args(args, work), per_device_train_batch_size=batch, bf16=args.device == "cuda",
        use_cpu=args.device == "cpu", assistant_only_loss=True, packing=packing, packing_strategy="bfd", padding_free=True,
        max_length=args.max_length if packing else None,
    )  # fmt: skip
    tokens: list[int] = []
    timer = step_timer(cuda_sync=args.device == "cuda")

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any, **kw: Any) -> Any:
            mask = inputs.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
            return super().training_step(model, inputs, *rest, **kw)

    trainer = CountingSFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    trainer.train()
    return {**steady_rate(tokens, timer.ends, timer.start, args.warmup), "steps": len(timer.ends), "tokens": sum(tokens), "threads": torch.get_num_threads(),
            "config": f"{'packing bfd (padding-free)' if packing else 'no packing, padding_free'}, batch {batch}",
            "params": sum(p.numel() for p in model.parameters())}  # fmt: skip


def side_result(args: argparse.Namespace, run_align: Any, run_trl: Any, prefix: str) -> dict[str, Any]:
    """One benchmark side (`args.child`) in its own temp dir, with this process's peak RSS: every `*_vs_trl` child."""
    with tempfile.TemporaryDirectory(prefix=f"{prefix}_{args.child}_") as tmp:
        result = (run_align if args.child == "align" else run_trl)(args, Path(tmp))
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return result


def child(args: argparse.Namespace) -> None:
    import torch

    result = side_result(args, run_align, run_trl, "sft_vs_trl")
    if args.device == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    from align.builtin import builtin_shape

    result["shape"] = builtin_shape(args.model)  # read at run time by both sides; the parent checks they agree
    Path(args.out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent
def spawn(args: argparse.Namespace, side: str, trl_config: str, work: Path) -> dict[str, Any]:
    label = f"{side}{'' if side == 'align' else f' ({trl_config})'}: {args.steps} steps"
    return run_child(__file__, ["--steps", str(args.steps), "--child", side, "--trl-config", trl_config], label, work / f"{side}-{trl_config}.json")


def run_json_process(cmd: list[str], label: str, out: Path, name: str) -> tuple[dict[str, Any], float]:
    """Run one benchmark process (its own peak RSS, its own process group) and read the JSON it writes to `out`.

    Prints `--- label ...`; on failure prints the process's output tails and stops the benchmark naming `name`.
    Returns the JSON and the process's wall seconds; the caller finishes the line.
    """
    print(f"--- {label} ...", end=" ", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"{name} failed with exit code {proc.returncode}")
    return json.loads(out.read_text()), time.perf_counter() - started


def run_child(script: str, extra: list[str], label: str, out: Path) -> dict[str, Any]:
    """Run one benchmark side (this script with `--child SIDE`) and read its JSON."""
    argv = [a for a in sys.argv[1:] if a != "--quick"]
    side = extra[extra.index("--child") + 1]
    result, seconds = run_json_process([sys.executable, script, *argv, *extra, "--out", str(out)], label, out, f"{side} child")
    print(f"done in {seconds:.0f} s", flush=True)
    return result


def flops_per_token(params: int, shape: dict[str, int], mean_keys: float) -> float:
    """Training FLOPs per token: 6·params (forward + backward matmuls) + 12·layers·hidden·keys, where keys is the mean
    number of positions a token attends to (causal, within its own document: (n + 1) / 2 averaged over tokens)."""
    return 6 * params + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * mean_keys


def mean_attended_keys(lengths: list[int]) -> float:
    """Σ n(n+1)/2 over documents / Σ n: the keys an average token attends to when documents never see each other."""
    return sum(n * (n + 1) / 2 for n in lengths) / max(1, sum(lengths))


def peak_flops(args: argparse.Namespace, gpu_name: str = "") -> tuple[float, str]:
    """The peak MFU is measured against: on a GPU its dense bf16 peak (the table, or --peak-tflops); on a CPU a large fp32
    matmul measured now on the benchmark's threads (`gpu_check.measured_peak`)."""
    if args.device == "cuda":
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu_name), None)
        return (peak * 1e12 if peak else float("nan")), f"dense bf16 peak of {gpu_name or 'the GPU'}"
    from gpu_check import measured_peak

    flops, name, dtype = measured_peak("cpu", args.threads)
    return flops, f"measured {dtype} matmul on {name}"


def mfu(result: dict[str, Any], per_token: float, peak: float) -> float:
    return result["tokens_per_s"] * per_token / peak


def pair_mfu(result: dict[str, Any], forwards: int, peak: float) -> float:
    """MFU of a pair benchmark over the positions fed: (6 + 2·extra forwards)·params per fed token (a shared prompt is fed
    once, so this is what the hardware did, never above 1); attention is left out (sequences of ~50 tokens: < 1%)."""
    fed_per_s = result["tokens_per_s"] * result["fed"] / result["tokens"]
    return fed_per_s * (6 + 2 * forwards) * result["params"] / peak


def conversation_keys(args: argparse.Namespace) -> float:
    """Mean attended keys per token over the benchmark's conversations, tokenised as both sides train them."""
    from align.config import ModelConfig
    from align.engine.models import load_tokenizer
    from data_builders.synthetic import SyntheticTask

    tokenizer = load_tokenizer(ModelConfig(name_or_path=args.model))
    rows = SyntheticTask(args.seed, 3, 0.7).sft_conversations(args.rows)
    return mean_attended_keys([len(tokenizer.apply_chat_template(r["messages"], return_dict=True)["input_ids"]) for r in rows])


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    configs = [args.trl] if args.trl != "auto" else (["bfd"] if args.quick else ["bfd", "padding_free"])
    precision = "bf16" if args.device == "cuda" else "fp32"
    print(f"{args.model} on {args.device} ({precision}), max_length {args.max_length}, {args.batch} packed rows per step, "
          f"{args.steps} steps of which the first {args.warmup} are not timed, {args.threads} threads")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sft_vs_trl_") as tmp:
        results, missing = {"align": spawn(args, "align", "bfd", Path(tmp))}, None
        for config in configs:
            result = spawn(args, "trl", config, Path(tmp))
            if "unavailable" in result:
                missing = result["unavailable"]
                break
            results[f"trl {config}"] = result
    cuda = args.device == "cuda"
    peak, peak_name = peak_flops(args, results["align"].get("gpu", ""))
    per_token = flops_per_token(results["align"]["params"], results["align"]["shape"], conversation_keys(args))
    print(f"\n{'run':<17} {'configuration':<36} {'tokens':>7} {'tokens/s':>9} {'median step':>12} {'peak RSS MiB':>13} "
          f"{'timed s':>8} {'MFU':>6}" + (f" {'GPU MiB':>8}" if cuda else ""))  # fmt: skip
    for name, r in results.items():
        print(f"{name:<17} {r['config']:<36} {r['tokens']:>7} {r['tokens_per_s']:>9.0f} {r['median_step_tokens_per_s']:>12.0f} "
              f"{r['peak_rss_mib']:>13.0f} {r['timed_s']:>8.2f} {mfu(r, per_token, peak):>6.1%}"
              + (f" {r['peak_gpu_mib']:>8.0f}" if cuda else ""))  # fmt: skip
    print(f"MFU: {per_token / 1e6:.1f} MFLOP per trained token (6 x parameters + causal attention within documents) over "
          f"{peak / 1e12:.3f} TFLOP/s, the {peak_name}")  # fmt: skip
    if any(r["shape"] != results["align"]["shape"] for r in results.values()):
        print("WARNING: align/builtin.py changed between the runs; the sides trained different shapes")
    print(f"model {results['align']['shape']}, {results['align']['params'] / 1e6:.2f}M parameters; tokens = trained "
          "(non-pad) tokens over all steps; tokens/s and median step exclude the warm-up steps")  # fmt: skip
    trls = {k: v for k, v in results.items() if k.startswith("trl")}
    if not trls:
        print(f"TRL unavailable ({missing}): align ran alone, no ratios")
        print(f"RESULT align/trl tokens_per_s=nan peak_rss=nan mfu={mfu(results['align'], per_token, peak):.3f}")
        return
    best = max(trls, key=lambda k: trls[k]["tokens_per_s"])
    a, t = results["align"], trls[best]
    print(f"fastest TRL configuration: {best} ({t['config']}); ratios are align / that")
    print(f"RESULT align/trl tokens_per_s={a['tokens_per_s'] / t['tokens_per_s']:.3f} peak_rss={a['peak_rss_mib'] / t['peak_rss_mib']:.3f} "
          f"mfu={mfu(a, per_token, peak):.3f} trl_mfu={mfu(t, per_token, peak):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
