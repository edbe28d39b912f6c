"""MPO throughput and memory: align's `MPOTrainer` against trl's `DPOTrainer` with the MPO loss list.

Both sides train the same randomly initialised Llama (align's `builtin:*` shape, same seed; the
reference is an identical frozen copy) on the same synthetic preference pairs
(`SyntheticTask.preference_pairs` rendered by `data_builders.preference_data`; TRL is handed the same
token ids as `prompt_ids` / `chosen_ids` / `rejected_ids`, its `_prepare_dataset` turned into a no-op since
trl 1.16 has no switch to skip it for tokenised rows), with loss sigmoid + bco_pair + sft weighted
0.8 / 0.2 / 1.0, β = 0.1, the same optimizer (AdamW, same lr/betas/eps, no weight decay), schedule, step
count, max length and torch threads, fp32. Each side runs in its own subprocess so peak RSS
(`ru_maxrss`) is its own; the parent checks both started from the same weights and pairs, prints a
table and, last, `RESULT align/trl tokens_per_s=<ratio> peak_rss=<ratio>` against TRL's faster
configuration.

Two reference set-ups, each run on both sides: a live frozen reference model (a second forward every
step), and reference log-probs precomputed in one pass before training (TRL `precompute_ref_log_probs`;
align `mpo.reference: precomputed`, cached on disk). The precompute pass is counted: its time is
spread over the pairs trained (time × trained pairs / precomputed pairs) and added to the timed steps.

Batch: align packs pairs as shared-prefix units (`[prompt and shared response prefix | chosen suffix |
rejected suffix]`, 4-D mask) into `--batch` rows of `--row-tokens` per step; TRL's batch, in pairs, is
align's average pairs per step, so both train about as many pairs per step. TRL's fastest correct
setting: fp32 on CPU (bf16 is ~10× slower there), no gradient checkpointing, no logging/eval/saving,
`dataloader_num_workers=0`; its DPO `padding_free` is unavailable in trl 1.16 (forced off).

Tokens/s counts the pairs' sequence tokens, len(prompt + chosen) + len(prompt + rejected), the same
unit on both sides (TRL: its attention mask's non-pad tokens; align: the same sum over its batches'
pairs, though it feeds fewer, shown as `fed`), over the steps after `--warmup`. CPU only.

    python benchmarks/mpo_vs_trl.py --quick          # < 3 min on 2 CPU cores
    python benchmarks/mpo_vs_trl.py
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
from rm_vs_trl import digest, pair_benchmark_parser  # noqa: E402
from sft_vs_trl import REPO, align_step_times, pair_mfu, run_child, side_result, steady_rate, step_timer, trl_training_args  # noqa: E402

REFERENCES = ("live", "precomputed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = pair_benchmark_parser(__doc__, "optimizer steps per run (default 10 quick, 30 full)", warmup=2, lr=1e-4,
                              max_length_help="per sequence (prompt + response)")  # fmt: skip
    p.add_argument("--reference", choices=REFERENCES, default="live", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (10 if args.quick else 30)
    args.pairs = args.steps * args.batch * 6  # ~5 shared-prefix pairs fill a 256-token row: each side trains < 1 epoch
    return args


def recipe(args: argparse.Namespace, output_dir: Path) -> Any:
    """The MPO recipe both sides build from: configs/mpo/quickstart.yaml on a random `builtin:*` model."""
    from align.config import MPORecipe, load_recipe

    reference = "precomputed" if args.reference == "precomputed" else "model"
    overrides = [
        f"output_dir={output_dir}", f"model.name_or_path={args.model}", "model.dtype=float32",
        "model.gradient_checkpointing=false", "model.lora.enabled=false", "data.train=[{path: synthetic}]",
        f"data.max_length={args.max_length}", "data.packing=true", f"data.pair_row_tokens={args.row_tokens}",
        f"data.synthetic={{seed: {args.seed}, digits: 2, concise_share: 0.7, train_rows: {args.pairs}, eval_rows: 8}}",
        f"optim={{lr: {args.lr}, weight_decay: 0.0, betas: [0.9, 0.999], eps: 1.0e-8, schedule: cosine, warmup_steps: 2, "
        "min_lr_ratio: 0.1, max_grad_norm: 1.0}",
        f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}", f"train.max_steps={args.steps}",
        f"train.seed={args.seed}", "train.log_every=1", "train.resume=false", "train.save_every=0", "train.eval_every=0",
        "logging.wandb=false", "logging.progress=false", "eval.enabled=false", "mpo.beta=0.1",
        "mpo.losses={sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}", f"mpo.reference={reference}",
        f"mpo.cache_dir={output_dir}/cache", "mpo.sampled_pairs.enabled=false",
    ]  # fmt: skip
    return load_recipe(MPORecipe, REPO / "configs/mpo/quickstart.yaml", overrides)


def amortised(rate: dict[str, float], tokens: list[int], warmup: int, precompute_s: float, trained_share: float) -> dict[str, float]:
    """Add the precompute pass to the timed steps' wall time, charged per trained pair.

    A pass over N pairs costs precompute_s / N per pair trained once (an epoch); `trained_share` is
    trained pairs / N, capped at 1 since later epochs reuse it. The timed steps get their token share.
    """
    timed_tokens = sum(tokens[min(warmup, len(tokens) - 1) :])
    timed_share = timed_tokens / max(1, sum(tokens))
    seconds = rate["timed_s"] + precompute_s * min(1.0, trained_share) * timed_share
    return {**rate, "tokens_per_s": timed_tokens / seconds, "timed_s": seconds}


# ----------------------------------------------------------------------------- children
def run_align(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    os.cpu_count = lambda: args.threads  # align's Engine sizes torch threads from the CPU count
    import align.trainers.reference_cache as cache_module
    from align.runner import run_job
    from align.trainers.mpo import MPOTrainer

    seen: dict[str, Any] = {"pairs": [], "positions": [], "sequence_tokens": [], "fed": [], "precompute_s": 0.0}
    load_or_compute = cache_module.ReferenceCache.load_or_compute

    def timed_load_or_compute(self: Any, *a: Any, **kw: Any) -> Any:
        started = time.perf_counter()
        out = load_or_compute(self, *a, **kw)
        seen["precompute_s"] = time.perf_counter() - started
        return out

    cache_module.ReferenceCache.load_or_compute = timed_load_or_compute

    class MeasuredMPOTrainer(MPOTrainer):  # records, changes nothing
        def setup(self) -> None:
            super().setup()
            seen.update(digest(self.model, self.pairs), total_pairs=len(self.pairs))

        def collate(self, row_ids: Any, split: str = "train") -> Any:
            batch = super().collate(row_ids, split)
            if split == "train":
                seen["pairs"].append(batch.num_pairs)
                seen["positions"].append(batch.rows.input_ids.numel())
                seen["sequence_tokens"].append(batch.rows.sequence_tokens)
            return batch

    summary = run_job(MeasuredMPOTrainer, recipe(args, work / "align"))
    fed, ends, records = align_step_times(work / "align" / "metrics.jsonl")
    tokens = seen["sequence_tokens"]
    rate = steady_rate(tokens, ends, 0.0, args.warmup)
    rate = amortised(rate, tokens, args.warmup, seen["precompute_s"], sum(seen["pairs"]) / seen["total_pairs"])
    return {**rate, "steps": summary["steps"], "tokens": sum(tokens), "fed": sum(fed), "pairs": sum(seen["pairs"]),
            "positions": sum(seen["positions"]), "weights": seen["weights"], "data": seen["data"], "precompute_s": seen["precompute_s"],
            "threads": torch.get_num_threads(), "mean_loss": statistics.fmean(r["loss"] for r in records),
            "config": f"shared-prefix, {args.batch} rows <= {args.row_tokens}"}  # fmt: skip


def run_trl(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import copy

    import datasets
    import torch
    from trl import DPOConfig, DPOTrainer

    from align.engine.models import load_causal_lm, load_tokenizer
    from data_builders.bad_rows import BadRowPolicy
    from data_builders.pair_rows import pack_pairs
    from data_builders.preference_data import build_preference_pairs

    torch.set_num_threads(args.threads)
    rcp = recipe(args, work / "unused")
    tokenizer = load_tokenizer(rcp.model)
    model = load_causal_lm(rcp.model, tokenizer, torch.float32, seed=rcp.train.seed)  # as MPOTrainer.setup does
    reference = copy.deepcopy(model).eval()
    pairs = build_preference_pairs(rcp.data.train, rcp.data, tokenizer, BadRowPolicy(rcp.data.on_bad_row))
    fingerprint = digest(model, pairs)
    packed_rows = len(pack_pairs(pairs, args.row_tokens, True, True)[0])  # as align packs them
    batch = round(args.batch * len(pairs) / packed_rows)  # align's average pairs per step
    rows = [{"prompt_ids": p.chosen[: p.prompt_length], "chosen_ids": p.chosen[p.prompt_length :],
             "rejected_ids": p.rejected[p.prompt_length :]} for p in pairs]  # fmt: skip
    precompute = args.reference == "precomputed"
    config = DPOConfig(**trl_training_args(args, work), per_device_train_batch_size=batch, bf16=False, use_cpu=True,
                       max_length=args.max_length, beta=0.1, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0],
                       precompute_ref_log_probs=precompute, precompute_ref_batch_size=batch)  # fmt: skip
    tokens: list[int] = []
    positions: list[int] = []
    step_pairs: list[int] = []
    timer = step_timer()
    spent = {"precompute_s": 0.0}

    class CountingDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset: Any, *a: Any, **kw: Any) -> Any:
            return dataset  # already token ids (its own rendering would run the same chat template); nothing to prepare

        def _precompute_ref_logps(self, *a: Any, **kw: Any) -> Any:
            started = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **kw)
            spent["precompute_s"] += time.perf_counter() - started
            return out

        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any, **kw: Any) -> Any:
            tokens.append(int(inputs["attention_mask"].sum()))
            positions.append(inputs["input_ids"].numel())
            step_pairs.append(inputs["input_ids"].shape[0] // 2)
            return super().training_step(model, inputs, *rest, **kw)

    trainer = CountingDPOTrainer(model=model, ref_model=None if precompute else reference, args=config, processing_class=tokenizer,
                                 train_dataset=datasets.Dataset.from_list(rows), callbacks=[timer])  # fmt: skip
    if precompute:
        del reference
    out = trainer.train()
    rate = steady_rate(tokens, timer.ends, timer.start, args.warmup)
    rate = amortised(rate, tokens, args.warmup, spent["precompute_s"], sum(step_pairs) / len(pairs))
    return {**rate, "steps": len(timer.ends), "tokens": sum(tokens), "fed": sum(tokens), "pairs": sum(step_pairs),
            "positions": sum(positions), "weights": fingerprint["weights"], "data": fingerprint["data"],
            "precompute_s": spent["precompute_s"], "threads": torch.get_num_threads(), "mean_loss": out.training_loss,
            "params": sum(p.numel() for p in model.parameters()), "config": f"padded, batch {batch} pairs ({2 * batch} rows)"}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    result = side_result(args, run_align, run_trl, "mpo_vs_trl")
    Path(args.out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent
def spawn(args: argparse.Namespace, side: str, reference: str, work: Path) -> dict[str, Any]:
    extra = ["--steps", str(args.steps), "--child", side, "--reference", reference]
    return run_child(__file__, extra, f"{side} ({reference} reference): {args.steps} steps", work / f"{side}-{reference}.json")


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    print(f"{args.model} policy + frozen reference on cpu (fp32), MPO loss (0.8 sigmoid + 0.2 bco_pair + 1.0 sft, beta 0.1), "
          f"sequences <= {args.max_length} tokens, align {args.batch} rows per step, {args.steps} steps of which the first "
          f"{args.warmup} are not timed, {args.threads} threads")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mpo_vs_trl_") as tmp:
        results = {(side, ref): spawn(args, side, ref, Path(tmp)) for ref in REFERENCES for side in ("align", "trl")}
    print(f"\n{'run':<6} {'reference':<12} {'configuration':<32} {'pairs/step':>10} {'tokens/step':>11} {'fed/step':>9} {'pad %':>6} "
          f"{'precompute s':>12} {'steps/s':>8} {'pairs/s':>8} {'tokens/s':>9} {'median step':>12} {'peak RSS MiB':>13}")  # fmt: skip
    for (side, ref), r in results.items():
        pad = 1 - r["fed"] / r["positions"]
        pairs_per_s = r["tokens_per_s"] * r["pairs"] / r["tokens"]
        steps_per_s = (r["steps"] - min(args.warmup, r["steps"] - 1)) / r["timed_s"]
        print(f"{side:<6} {ref:<12} {r['config']:<32} {r['pairs'] / r['steps']:>10.1f} {r['tokens'] / r['steps']:>11.0f} "
              f"{r['fed'] / r['steps']:>9.0f} {pad:>6.1%} {r['precompute_s']:>12.1f} {steps_per_s:>8.2f} {pairs_per_s:>8.1f} {r['tokens_per_s']:>9.0f} "
              f"{r['median_step_tokens_per_s']:>12.0f} {r['peak_rss_mib']:>13.0f}")  # fmt: skip
    for key in ("weights", "data"):
        values = {r[key] for r in results.values()}
        if len(values) > 1:
            print(f"WARNING: the runs trained different {key}: {sorted(values)}")
    for ref in REFERENCES:
        a, t = results[("align", ref)], results[("trl", ref)]
        print(f"{ref} reference: align/trl tokens_per_s={a['tokens_per_s'] / t['tokens_per_s']:.3f} "
              f"peak_rss={a['peak_rss_mib'] / t['peak_rss_mib']:.3f}; mean loss align {a['mean_loss']:.4f}, TRL {t['mean_loss']:.4f}")
    best_trl = max(REFERENCES, key=lambda ref: results[("trl", ref)]["tokens_per_s"])
    best_align = max(REFERENCES, key=lambda ref: results[("align", ref)]["tokens_per_s"])
    a, t = results[("align", best_align)], results[("trl", best_trl)]
    print(f"tokens = len(prompt + chosen) + len(prompt + rejected) over all steps' pairs (what TRL feeds); fed = non-pad positions "
          f"fed to the model; precompute time is spread over the pairs trained and included in steps/s and tokens/s. RESULT compares each "
          f"side's faster set-up: align {best_align}, TRL {best_trl}.")  # fmt: skip
    from gpu_check import measured_peak

    a["params"] = t["params"]  # the same model on both sides (the weights digests above agree)
    peak, where, dtype = measured_peak("cpu", args.threads)
    print(f"MFU: (6 + 2 for the reference's forward) x parameters per position fed (attention left out) over {peak / 1e12:.3f} "
          f"TFLOP/s, a {dtype} matmul measured now on {where}: align {pair_mfu(a, 1, peak):.1%}, TRL {pair_mfu(t, 1, peak):.1%}")  # fmt: skip
    print(f"RESULT align/trl tokens_per_s={a['tokens_per_s'] / t['tokens_per_s']:.3f} peak_rss={a['peak_rss_mib'] / t['peak_rss_mib']:.3f} "
          f"mfu={pair_mfu(a, 1, peak):.3f} trl_mfu={pair_mfu(t, 1, peak):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
