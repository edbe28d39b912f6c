"""GPU check: tokens/s, MFU and peak memory of align's SFT, RM, MPO and GRPO paths, one child process per measurement.

Each (model, attention, method) runs align's own trainer in its own subprocess (the helpers of
benchmarks/sft_vs_trl.py): SFT, RM and MPO through `align.runner.run_job` with the method's quickstart recipe
(random init, synthetic data, no eval, logging or saving), GRPO through `RLHFTrainer.run_iteration`
(configs/rlhf/grpo_quickstart.yaml: verifier rewards, no reward model, no critic, no KL). Nothing here needs
trl, deepspeed, wandb or datasets; TRL's `SFTTrainer` runs alongside (sft_vs_trl's TRL side) when trl and
datasets import, else one line says it was skipped.

Models: `--device cuda`: `builtin:medium` (~0.4B) and `builtin:llama-1b`, a ~1.1B Llama built from config
(hidden 2048, 16 layers, intermediate 5632, 32 heads; registered in align.builtin.CONFIGS inside each child,
built-in tokenizer, random init, no network); bf16 the way align's engine does it on GPU (`model.dtype=bfloat16`:
fp32 master weights under accelerate's bf16 autocast, `align/engine/core.py` + `resolve_dtype`); attention sdpa,
and flash_attention_2 when `flash_attn` is installed. `--device cpu`: `builtin:tiny`, fp32, sdpa.

Measured per method (steps after `--warmup` leading ones):
- tokens/s: SFT: non-pad tokens of the packed rows; RM, MPO: non-pad positions fed (shared-prefix rows count a
  prompt once); both over the wall time of the timed optimizer steps (align's per-step metrics; MPO's reference
  log-probs are precomputed before training and not timed). GRPO: tokens (prompt + response) of the rollouts
  trained per iteration over the whole iteration's wall time (generate + score + experience + update).
- MFU = model FLOP/s over the peak. Training FLOPs = 6 x trainable parameters x tokens + attention
  12 x layers x hidden x K, K = the keys each token attends to summed over tokens, causal within its own document
  (SFT: position + 1 per packed document; pairs: prefix, prefix + chosen, prefix + rejected), i.e. PaLM's
  12·L·H·T per token with T the attended length actually used. GRPO adds generation as forward-only FLOPs,
  2 x parameters x (prompt + response tokens) + 4 x layers x hidden x K. Two peaks: the device's dense bf16 peak
  from a table by name (H100/H200 989, A100 312 TFLOP/s) and a large matmul measured in this run (bf16 8192^3
  on GPU; fp32 1024^3 on CPU with the same threads); on CPU only the measured one.
- peak device memory (`torch.cuda.max_memory_allocated`, each method in a fresh process, reset at start) and
  peak RSS (`ru_maxrss`).

One line per (model, method, attention), then `RESULT gpu_check <method>:<model>:<attn> tok_s=.. mfu=.. ...`.

    python benchmarks/gpu_check.py --device cpu --quick     # < 1 min on 2 CPU cores
    python benchmarks/gpu_check.py --device cuda            # one H100/H200, ~6 min
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_vs_trl import PEAK_BF16_TFLOPS, REPO, align_step_times, run_json_process, steady_rate  # noqa: E402

OPTIONAL = ("trl", "deepspeed", "wandb", "datasets")  # absent on the GPU machine unless carried as wheels
for _name in filter(None, os.environ.get("GPU_CHECK_HIDE", "").split(",")):  # simulate that machine: `import x` fails,
    sys.modules[_name] = None  # type: ignore[assignment]  # and find_spec (transformers' availability checks) says absent
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=32)
METHODS = ("sft", "rm", "mpo", "grpo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--quick", action="store_true", help="3 steps per method (2 GRPO iterations), short rows")
    p.add_argument("--models", default=None, help="comma-separated builtin:NAME (default: tiny on cpu; medium,llama-1b on cuda)")
    p.add_argument("--attn", default=None, help="comma-separated attentions (default: sdpa, + flash_attention_2 on cuda when installed)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 3 quick, 16 full)")
    p.add_argument("--warmup", type=int, default=None, help="leading steps not timed (default 1 quick, 4 full)")
    p.add_argument("--batch", type=int, default=None, help="packed rows per step (default 2 quick, 8 full)")
    p.add_argument("--max-length", type=int, default=None, help="row length (default 256 quick, 1024 full)")
    p.add_argument("--prompts", type=int, default=None, help="GRPO prompts per iteration (x 8 samples; default 2 quick, 16 full)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="GRPO (default 8 quick, 48 full)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl", choices=["auto", "on", "off"], default="auto", help="TRL SFT peer; auto: on unless --quick on cpu")
    p.add_argument("--peak-tflops", type=float, default=None, help="table peak override (dense bf16 TFLOP/s)")
    p.add_argument("--child", choices=[*METHODS, "trl-sft"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--attention", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    a.steps = a.steps or (3 if q else 16)
    a.warmup = a.warmup if a.warmup is not None else (1 if q else 4)
    a.batch = a.batch or (2 if q else 8)
    a.max_length = a.max_length or (256 if q else 1024)
    a.prompts = a.prompts or (2 if q else 16)
    a.max_new_tokens = a.max_new_tokens or (8 if q else 48)
    return a


# ----------------------------------------------------------------------------- FLOPs helpers
def tri(n: int) -> int:
    return n * (n + 1) // 2


def pair_keys(spans: Any) -> int:
    """Keys attended, summed over a pair row's tokens: prefix, then chosen and rejected each causal over prefix + itself."""
    return sum(tri(s.prefix + s.chosen) + tri(s.prefix + s.rejected) - tri(s.prefix) for s in spans)


def shape_of(model_name: str) -> dict[str, int]:
    from align.builtin import builtin_shape

    return builtin_shape(model_name)


def register_models() -> None:
    """`builtin:llama-1b` for this process (align.builtin's table is read at load time; align itself is not edited)."""
    from align import builtin

    builtin.CONFIGS.setdefault("llama-1b", dict(LLAMA_1B))


# ----------------------------------------------------------------------------- children
def common(args: argparse.Namespace, output_dir: Path) -> list[str]:
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    return [
        f"output_dir={output_dir}", f"model.name_or_path={args.model}", f"model.dtype={dtype}", f"model.attn_implementation={args.attention}",
        "model.gradient_checkpointing=false", "model.lora.enabled=false", f"train.seed={args.seed}", "train.resume=false",
        "train.save_every=0", "logging.wandb=false", "logging.progress=false",
    ]  # fmt: skip


def trainer_overrides(args: argparse.Namespace, rows: int, pairs: bool) -> list[str]:
    return [
        "data.train=[{path: synthetic}]", f"data.max_length={args.max_length}", "data.packing=true",
        f"data.synthetic={{seed: {args.seed}, digits: {2 if pairs else 3}, concise_share: 0.7, train_rows: {rows}, eval_rows: 8}}",
        "optim={lr: 1.0e-4, weight_decay: 0.0, betas: [0.9, 0.999], eps: 1.0e-8, schedule: constant, warmup_steps: 0, max_grad_norm: 1.0}",
        f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}", f"train.max_steps={args.steps}",
        "train.log_every=1", "train.eval_every=0",
    ] + ([f"data.pair_row_tokens={args.max_length}"] if pairs else [])  # fmt: skip


def run_method(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """SFT / RM / MPO through run_job, with the batches' token and attended-key counts recorded (nothing changed)."""
    from align.config import MPORecipe, RMRecipe, SFTRecipe, load_recipe
    from align.runner import run_job
    from align.trainers.mpo import MPOTrainer
    from align.trainers.rm import RMTrainer
    from align.trainers.sft import SFTTrainer

    base, recipe_cls, config = {
        "sft": (SFTTrainer, SFTRecipe, "sft"),
        "rm": (RMTrainer, RMRecipe, "rm"),
        "mpo": (MPOTrainer, MPORecipe, "mpo"),
    }[args.child]
    seen: dict[str, Any] = {"tokens": [], "keys": []}

    class Measured(base):  # type: ignore[misc, valid-type]
        def setup(self) -> None:
            super().setup()
            seen["params"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            seen["share_prefix"] = getattr(self, "share_prefix", None)

        def collate(self, row_ids: Any, split: str = "train") -> Any:
            batch = super().collate(row_ids, split)
            if split == "train":
                if args.child == "sft":
                    real = batch.doc_ids >= 0
                    seen["tokens"].append(int(real.sum()))
                    seen["keys"].append(int((batch.position_ids + 1)[real].sum()))
                else:
                    seen["tokens"].append(batch.rows.num_tokens)
                    seen["keys"].append(pair_keys(batch.rows.spans))
            return batch

    pairs = args.child != "sft"
    per_row = max(1, args.max_length // (48 if pairs else 32))
    rows = 64 + args.steps * args.batch * per_row  # documents/pairs average ~43/~60 tokens: enough for every step
    overrides = common(args, work / "run") + trainer_overrides(args, rows, pairs)
    if args.child == "sft":
        overrides += ["data.loss_reduction=token", "data.system_prompt=null", "eval.enabled=false"]
    elif args.child == "rm":
        overrides += ["reward.loss=bradley_terry", "reward.barrier_weight=0"]
    else:
        overrides += ["eval.enabled=false", "mpo.beta=0.1", "mpo.losses={sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}", "mpo.reference=precomputed",
                      f"mpo.cache_dir={work / 'cache'}", "mpo.sampled_pairs.enabled=false"]  # fmt: skip
    summary = run_job(Measured, load_recipe(recipe_cls, REPO / f"configs/{config}/quickstart.yaml", overrides))
    _, ends, _ = align_step_times(work / "run" / "metrics.jsonl")
    tokens, keys = seen["tokens"], seen["keys"]
    if len(tokens) != len(ends):
        raise RuntimeError(f"{len(tokens)} train collates for {len(ends)} logged steps")
    rate = steady_rate(tokens, ends, 0.0, args.warmup)
    w = min(args.warmup, len(tokens) - 1)
    layout = "shared-prefix pairs" if seen["share_prefix"] else ("packed pairs" if pairs else "packed docs")
    return {**rate, "timed_tokens": sum(tokens[w:]), "timed_keys": sum(keys[w:]), "gen_tokens": 0, "gen_keys": 0,
            "params": seen["params"], "steps": summary["steps"], "layout": layout}  # fmt: skip


def run_grpo(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """GRPO iterations of RLHFTrainer (as benchmarks/rlhf_iteration.py drives it); the trained rollouts recorded."""
    from align.config import RLHFRecipe, load_recipe
    from align.trainers.rlhf import RLHFTrainer

    iterations = 2 if args.quick else 4  # the first one untimed
    samples = 8
    overrides = common(args, work / "run") + [
        "eval.enabled=false", "ppo.rounds=1", f"ppo.iterations_per_round={iterations}", f"ppo.prompts_per_iteration={args.prompts}",
        f"ppo.samples_per_prompt={samples}", f"ppo.max_new_tokens={args.max_new_tokens}", f"ppo.num_prompts={args.prompts * iterations}",
        f"train.micro_batch_size={min(32, args.prompts * samples)}", f"data.synthetic.train_rows={max(64, args.prompts * iterations)}",
    ]  # fmt: skip
    seen: dict[str, list[tuple[int, int]]] = {"parts": []}

    class Measured(RLHFTrainer):
        def ppo_batch(self, part: list, loss_weights: list) -> Any:
            seen["parts"].append((sum(r.num_tokens for r in part), sum(tri(r.num_tokens) for r in part)))
            return super().ppo_batch(part, loss_weights)

    trainer = Measured(load_recipe(RLHFRecipe, REPO / "configs/rlhf/grpo_quickstart.yaml", overrides))
    trainer.setup()
    timed = []
    for t in range(iterations):
        seen["parts"].clear()
        started = time.perf_counter()
        metrics = trainer.run_iteration(t)
        wall = time.perf_counter() - started
        if t >= 1:
            tokens = sum(n for n, _ in seen["parts"])
            keys = sum(k for _, k in seen["parts"])
            timed.append(
                {
                    "wall": wall,
                    "tokens": tokens,
                    "keys": keys,
                    **{k: metrics[f"time/{k}"] for k in ("generate", "score", "experience", "train")},
                }
            )
    total = sum(t["wall"] for t in timed)
    tokens, keys = sum(t["tokens"] for t in timed), sum(t["keys"] for t in timed)
    split = "/".join(f"{sum(t[k] for t in timed) / total:.2f}" for k in ("generate", "score", "experience", "train"))
    return {"tokens_per_s": tokens / total, "timed_s": total, "timed_tokens": tokens, "timed_keys": keys, "gen_tokens": tokens, "gen_keys": keys,
            "params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad), "steps": iterations,
            "layout": f"{args.prompts}x{samples} rollouts, split gen/score/exp/train {split}"}  # fmt: skip


def run_trl_sft(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """sft_vs_trl's TRL side (packing bfd, padding-free), same shape; attention as align's `auto` resolves it."""
    try:  # present but broken (a carried wheel that does not fit): reported, not fatal
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return {"unavailable": f"{type(err).__name__}: {err}"}
    from sft_vs_trl import run_trl

    ns = argparse.Namespace(model=args.model, device=args.device, steps=args.steps, warmup=args.warmup, batch=args.batch,
                            max_length=args.max_length, threads=args.threads, lr=1e-4, seed=args.seed, trl_config="bfd",
                            rows=64 + args.steps * args.batch * max(1, args.max_length // 32))  # fmt: skip
    r = run_trl(ns, work)
    if "unavailable" in r:
        return r
    w = min(args.warmup, max(0, r["steps"] - 1))
    return {**r, "timed_tokens": r["tokens_per_s"] * r["timed_s"], "timed_keys": 0, "gen_tokens": 0, "gen_keys": 0,
            "layout": r["config"] + " (attention FLOPs not counted)", "warmup_used": w}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    import torch

    os.cpu_count = lambda: args.threads  # align's Engine sizes torch threads from the CPU count
    register_models()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fn = {"grpo": run_grpo, "trl-sft": run_trl_sft}.get(args.child, run_method)
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{args.child}_") as tmp:
        result = fn(args, Path(tmp))
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_dev_mib"] = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else 0.0
    result["threads"] = torch.get_num_threads()
    result["optional_imported"] = sorted(
        {m.split(".")[0] for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in OPTIONAL}
    )
    Path(args.out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent
def measured_peak(device: str, threads: int) -> tuple[float, str, str]:
    """FLOP/s of a large matmul here (bf16 8192^3 on GPU, fp32 1024^3 on CPU), the device name and the dtype."""
    import torch

    if device == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 30
        a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
        for _ in range(5):
            a @ b
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        name = torch.cuda.get_device_name()
        del a, b
        torch.cuda.empty_cache()
        return 2 * n**3 * reps / seconds, name, "bf16"
    torch.set_num_threads(threads)
    n, reps = 1024, 5
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(6):  # the best of six: the machine is shared
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 * reps / best, f"cpu ({threads} threads)", "fp32"


def flops_per_s(r: dict[str, Any], shape: dict[str, int]) -> float:
    layers, hidden = shape["num_hidden_layers"], shape["hidden_size"]
    train = 6 * r["params"] * r["timed_tokens"] + 12 * layers * hidden * r["timed_keys"]
    gen = 2 * r["params"] * r["gen_tokens"] + 4 * layers * hidden * r["gen_keys"]
    return (train + gen) / r["timed_s"]


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    cuda = args.device == "cuda"
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device (use --device cpu)")
    elif args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # children see no GPU: fp32 and the CPU path, as on a CPU machine
    models = (args.models or ("builtin:medium,builtin:llama-1b" if cuda else "builtin:tiny")).split(",")
    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    attns = (args.attn or ("sdpa,flash_attention_2" if flash else "sdpa")).split(",")
    methods = args.methods.split(",")
    peak, device_name, peak_dtype = measured_peak(args.device, args.threads)
    table = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None) if cuda else None
    print(f"gpu_check on {device_name}: {'bf16 autocast (fp32 master weights)' if cuda else 'fp32'}; measured {peak_dtype} matmul "
          f"{peak / 1e12:.1f} TFLOP/s; table dense bf16 peak {f'{table:g} TFLOP/s' if table else 'n/a'}; "
          f"{args.steps} steps ({args.warmup} untimed), {args.batch} rows x {args.max_length} tokens")  # fmt: skip
    if cuda and not flash:
        print("flash_attn not installed: sdpa only")
    print(
        "MFU = (6 x trainable params x tokens + 12 x layers x hidden x attended keys [causal, per document]"
        " [+ GRPO generation: 2 x params x tokens + 4 x layers x hidden x keys]) / time / peak"
    )
    trl_on = args.trl == "on" or (args.trl == "auto" and not (args.quick and not cuda))
    trl_missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    if os.environ.get("GPU_CHECK_HIDE"):
        print(f"hidden (GPU_CHECK_HIDE): {os.environ['GPU_CHECK_HIDE']}")
    if trl_on and trl_missing:
        print(f"TRL: skipped ({', '.join(trl_missing)} not installed)")
    elif not trl_on:
        print("TRL: skipped (--quick on cpu or --trl off; --trl on runs TRL's SFTTrainer alongside)")
    results: list[tuple[str, str, str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        jobs = [(m, meth, a) for m in models for a in attns for meth in methods]
        if trl_on and not trl_missing:
            jobs += [(m, "trl-sft", "auto") for m in models]
        for model, method, attn in jobs:
            out = Path(tmp) / f"{len(results)}.json"
            cmd = [sys.executable, __file__, "--device", args.device, "--child", method, "--model", model, "--attention", attn, "--out", str(out),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch), "--max-length", str(args.max_length),
                   "--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads),
                   "--seed", str(args.seed)] + (["--quick"] if args.quick else [])  # fmt: skip
            try:
                r, seconds = run_json_process(cmd, f"{model} {method} {attn}", out, f"{method} child")
            except SystemExit as err:  # TRL is a peer, not the subject: its failure (output above) ends no run
                if method != "trl-sft":
                    raise
                print(f"TRL: failed ({err})")
                continue
            if "unavailable" in r:
                print(f"TRL: skipped ({r['unavailable']})")
                continue
            register_models()
            fl = flops_per_s(r, shape_of(model))
            r["mfu_measured"] = fl / peak
            r["mfu_table"] = fl / (table * 1e12) if table else float("nan")
            results.append((model, method, attn, r))
            print(f"{seconds:.0f} s: tokens/s {r['tokens_per_s']:.0f}, MFU {r['mfu_measured']:.2%} (measured peak) {format(r['mfu_table'], '.2%') if table else 'n/a'} (table), "
                  f"peak device {r['peak_dev_mib']:.0f} MiB, peak RSS {r['peak_rss_mib']:.0f} MiB; {r['layout']}; {r['params'] / 1e6:.1f}M trainable",
                  flush=True)  # fmt: skip
    imported = sorted({m for _, meth, _, r in results if meth != "trl-sft" for m in r["optional_imported"]})
    print(f"optional packages align's children imported ({', '.join(OPTIONAL)}): {', '.join(imported) or 'none'}")
    cells = " ".join(
        f"{meth}:{model.removeprefix('builtin:')}:{attn} tok_s={r['tokens_per_s']:.1f} mfu={r['mfu_measured']:.4f} mfu_table={r['mfu_table']:.4f} "
        f"dev_mib={r['peak_dev_mib']:.0f} rss_mib={r['peak_rss_mib']:.0f}"
        for model, meth, attn, r in results
    )
    print(f"RESULT gpu_check device={args.device} peak_tflops_measured={peak / 1e12:.2f} peak_tflops_table={table or float('nan')} {cells}")


if __name__ == "__main__":
    main()
