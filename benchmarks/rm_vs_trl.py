"""Reward-model throughput and memory: align's `RMTrainer` against TRL's `RewardTrainer`, same model, pairs and batch.

Both sides train the same randomly initialised Llama reward model (`align.engine.models.load_reward_model`
on align's `builtin:*` shape, same seed: `LlamaForSequenceClassification`, one label, zeroed head;
TRL is handed the model object) on the same synthetic comparison pairs (`SyntheticTask.preference_pairs`
through `rewards.data.build_pairs`, condition system prompts included), with the Bradley-Terry loss
(align: `reward.loss=bradley_terry reward.barrier_weight=0`, TRL's only loss), the same optimizer
(AdamW, same lr/betas/eps, no weight decay), schedule, step count and torch threads, fp32. Each side
runs in its own subprocess so peak RSS (`ru_maxrss`) is its own; the parent checks that both started
from the same weights and pairs, prints a table and, last, the line
`RESULT align/trl tokens_per_s=<ratio> peak_rss=<ratio>`.

Batch: align packs whole pairs as shared-prefix units (`[prefix | chosen | rejected]`, the prompt
computed once, a 4-D mask keeping the two responses apart; `data_builders/pair_rows.py`) into rows of
up to `--row-tokens` tokens and trains `--batch` such rows per step; TRL's batch is in pairs, set to
align's average pairs per step (`--batch` × pairs / packed rows over the data set), so both train
about as many pairs per step. The table reports both. `--no-share-prefix` turns the sharing off
(chosen and rejected then sit side by side as two packed documents).

TRL is given its fastest correct configuration: fp32 on CPU (bf16 is far slower there), no gradient
checkpointing, no logging/eval/saving during the run, `dataloader_num_workers=0`, and its default
`pad_to_multiple_of=None` (each batch padded to its longest document). TRL 1.16's `RewardTrainer` has
no `padding_free` or packing option: its collator always right-pads the chosen and rejected documents
into 2·batch rows and scores at the last non-pad token. It is given the pairs pre-tokenised
(`chosen_ids`/`rejected_ids`, which it trains on as they are), so both sides see identical tokens:
TRL's own chat-template tokenisation of the same conversations would append a newline after each
final `<|im_end|>`, one token per document more than align's `render_for_reward`.

Tokens/s counts the pairs' sequence tokens, len(chosen) + len(rejected) as rendered, the same unit
for both sides (TRL: its attention mask's non-pad tokens, which are exactly these; align: the same sum
over its batches' pairs, though it feeds fewer, shown as `fed`), over the wall time of the steps after
`--warmup` steps, excluding model/data setup; steps/s likewise. The ratio is therefore the ratio of
pairs trained per second. CPU only.

    python benchmarks/rm_vs_trl.py --quick          # < 3 min on 2 CPU cores
    python benchmarks/rm_vs_trl.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_vs_trl import REPO, align_step_times, pair_mfu, run_child, side_result, steady_rate, step_timer, trl_training_args  # noqa: E402


def pair_benchmark_parser(doc: str, steps_help: str, warmup: int, lr: float, max_length_help: str) -> argparse.ArgumentParser:
    """The options the pair benchmarks (RM, MPO) share: model, steps, batch of packed rows, lengths, threads, child plumbing."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (< 3 min on 2 cores)")
    p.add_argument("--model", default="builtin:small", help="builtin:tiny|small|base")
    p.add_argument("--steps", type=int, default=None, help=steps_help)
    p.add_argument("--warmup", type=int, default=warmup, help="leading steps left out of the rates")
    p.add_argument("--batch", type=int, default=8, help="align: packed rows per step (TRL: as many pairs as these hold on average)")
    p.add_argument("--max-length", type=int, default=256, help=max_length_help)
    p.add_argument("--row-tokens", type=int, default=256, help="align: tokens per packed row (data.pair_row_tokens)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0, help="model init, data and shuffling")
    p.add_argument("--child", choices=["align", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = pair_benchmark_parser(__doc__, "optimizer steps per side (default 20 quick, 50 full)", warmup=3, lr=2e-3, max_length_help="per document")
    p.add_argument("--no-share-prefix", action="store_true", help="align: chosen and rejected as two documents (no prefix sharing)")
    args = p.parse_args(argv)
    args.steps = args.steps or (20 if args.quick else 50)
    # enough pairs for every step: ~3 pairs (~150 tokens each) fill a 512-token row; no step repeats a pair
    args.pairs = max(512, args.steps * args.batch * max(4, args.max_length // 48))
    return args


def recipe(args: argparse.Namespace, output_dir: Path) -> Any:
    """The RM recipe both sides build from: configs/rm/quickstart.yaml on a random `builtin:*` model."""
    from align.config import RMRecipe, load_recipe

    overrides = [
        f"output_dir={output_dir}", f"model.name_or_path={args.model}", "model.dtype=float32",
        "model.gradient_checkpointing=false", "model.lora.enabled=false", "data.train=[{path: synthetic}]",
        f"data.max_length={args.max_length}", "data.packing=true", f"data.pair_row_tokens={args.row_tokens}",
        f"data.share_prefix={'false' if args.no_share_prefix else 'true'}",
        f"data.synthetic={{seed: {args.seed}, digits: 2, concise_share: 0.7, train_rows: {args.pairs}, eval_rows: 8}}",
        f"optim={{lr: {args.lr}, weight_decay: 0.0, betas: [0.9, 0.999], eps: 1.0e-8, schedule: cosine, warmup_steps: 10, "
        "min_lr_ratio: 0.1, max_grad_norm: 1.0}",
        f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}", f"train.max_steps={args.steps}",
        f"train.seed={args.seed}", "train.log_every=1", "train.resume=false", "train.save_every=0", "train.eval_every=0",
        "logging.wandb=false", "logging.progress=false", "reward.loss=bradley_terry", "reward.barrier_weight=0",
    ]  # fmt: skip
    return load_recipe(RMRecipe, REPO / "configs/rm/quickstart.yaml", overrides)


def digest(model: Any, pairs: list[Any]) -> dict[str, str]:
    """Fingerprints of the initial weights and of the training pairs, compared by the parent."""
    weights, data = hashlib.sha256(), hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        weights.update(name.encode() + param.detach().cpu().contiguous().numpy().tobytes())
    for pair in pairs:
        data.update(json.dumps([pair.chosen, pair.rejected]).encode())
    return {"weights": weights.hexdigest()[:16], "data": data.hexdigest()[:16]}


# ----------------------------------------------------------------------------- children
def run_align(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    os.cpu_count = lambda: args.threads  # align's Engine sizes torch threads from the CPU count
    from align.runner import run_job
    from align.trainers.rm import RMTrainer

    seen: dict[str, Any] = {"pairs": [], "positions": [], "sequence_tokens": []}

    class MeasuredRMTrainer(RMTrainer):  # records, changes nothing
        def setup(self) -> None:
            super().setup()
            seen.update(digest(self.model, self.pairs), packed_rows=len(self.train_rows))

        def units(self, row_ids: Any, split: str = "train") -> dict[str, float]:
            units = super().units(row_ids, split)
            if split == "train":
                seen["pairs"].append(units["pairs"])
            return units

        def collate(self, row_ids: Any, split: str = "train") -> Any:
            batch = super().collate(row_ids, split)
            if split == "train":
                seen["positions"].append(batch.rows.input_ids.numel())
                seen["sequence_tokens"].append(batch.rows.sequence_tokens)
            return batch

    summary = run_job(MeasuredRMTrainer, recipe(args, work / "align"))
    fed, ends, records = align_step_times(work / "align" / "metrics.jsonl")
    tokens = seen["sequence_tokens"]  # one collate per step (micro = global batch)
    assert len(tokens) == len(fed), (len(tokens), len(fed))
    with torch.device("meta"):  # parameter count of the model as trained, without loading weights
        params = sum(p.numel() for p in LlamaForSequenceClassification(LlamaConfig.from_pretrained(work / "align" / "model")).parameters())
    return {**steady_rate(tokens, ends, 0.0, args.warmup), "steps": summary["steps"], "tokens": sum(tokens), "fed": sum(fed),
            "pairs": sum(seen["pairs"]), "positions": sum(seen["positions"]), "weights": seen["weights"], "data": seen["data"],
            "threads": torch.get_num_threads(), "params": params, "mean_loss": statistics.fmean(r["loss"] for r in records),
            "config": f"{'shared-prefix' if not args.no_share_prefix else 'packed'} pairs, {args.batch} rows <= {args.row_tokens}"
                      f""}  # fmt: skip


def run_trl(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import datasets
    import torch
    from trl import RewardConfig, RewardTrainer

    from align.engine.models import load_reward_model, load_tokenizer
    from data_builders.bad_rows import BadRowPolicy
    from data_builders.pair_rows import pack_pairs
    from rewards.data import build_pairs

    torch.set_num_threads(args.threads)
    rcp = recipe(args, work / "unused")
    tokenizer = load_tokenizer(rcp.model)
    model = load_reward_model(rcp.model, tokenizer, torch.float32, seed=rcp.train.seed)  # as RMTrainer.setup does
    pairs = build_pairs(rcp.data.train, rcp.data, rcp.reward.conditions, tokenizer, BadRowPolicy(rcp.data.on_bad_row))
    fingerprint = digest(model, pairs)
    packed_rows = len(pack_pairs(pairs, args.row_tokens, True, not args.no_share_prefix)[0])  # as align packs them
    batch = round(args.batch * len(pairs) / packed_rows)  # align's average pairs per step
    rows = [{"chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs]  # margins are all 0: none passed
    config = RewardConfig(
        **trl_training_args(args, work), per_device_train_batch_size=batch, bf16=False, use_cpu=True, max_length=args.max_length
    )
    tokens: list[int] = []
    positions: list[int] = []
    step_pairs: list[int] = []
    timer = step_timer()

    class CountingRewardTrainer(RewardTrainer):
        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any, **kw: Any) -> Any:
            tokens.append(int(inputs["attention_mask"].sum()))
            positions.append(inputs["input_ids"].numel())
            step_pairs.append(inputs["input_ids"].shape[0] // 2)
            return super().training_step(model, inputs, *rest, **kw)

    trainer = CountingRewardTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                                    processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    out = trainer.train()
    return {**steady_rate(tokens, timer.ends, timer.start, args.warmup), "steps": len(timer.ends), "tokens": sum(tokens),
            "pairs": sum(step_pairs), "positions": sum(positions), "fed": sum(tokens), "weights": fingerprint["weights"], "data": fingerprint["data"],
            "threads": torch.get_num_threads(), "params": sum(p.numel() for p in model.parameters()), "mean_loss": out.training_loss,
            "config": f"padded, batch {batch} pairs ({2 * batch} rows)", "packed_rows": packed_rows}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    result = side_result(args, run_align, run_trl, "rm_vs_trl")
    from align.builtin import builtin_shape

    result["shape"] = builtin_shape(args.model)
    Path(args.out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent
def spawn(args: argparse.Namespace, side: str, work: Path) -> dict[str, Any]:
    return run_child(__file__, ["--steps", str(args.steps), "--child", side], f"{side}: {args.steps} steps", work / f"{side}.json")


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    print(f"{args.model} reward model on cpu (fp32), Bradley-Terry loss, documents <= {args.max_length} tokens, "
          f"align {args.batch} packed rows per step, {args.steps} steps of which the first {args.warmup} are not timed, "
          f"{args.threads} threads")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="rm_vs_trl_") as tmp:
        results = {side: spawn(args, side, Path(tmp)) for side in ("align", "trl")}
    print(f"\n{'run':<6} {'configuration':<40} {'pairs/step':>10} {'tokens/step':>11} {'fed/step':>9} {'pad %':>6} {'tokens':>7} "
          f"{'steps/s':>8} {'pairs/s':>8} {'tokens/s':>9} {'median step':>12} {'peak RSS MiB':>13} {'timed s':>8}")  # fmt: skip
    for name, r in results.items():
        timed_steps = r["steps"] - min(args.warmup, r["steps"] - 1)
        pad = 1 - r["fed"] / r["positions"]
        pairs_per_s = r["tokens_per_s"] * r["pairs"] / r["tokens"]
        print(f"{name:<6} {r['config']:<40} {r['pairs'] / r['steps']:>10.1f} {r['tokens'] / r['steps']:>11.0f} {r['fed'] / r['steps']:>9.0f} "
              f"{pad:>6.1%} {r['tokens']:>7} {timed_steps / r['timed_s']:>8.2f} {pairs_per_s:>8.1f} {r['tokens_per_s']:>9.0f} "
              f"{r['median_step_tokens_per_s']:>12.0f} {r['peak_rss_mib']:>13.0f} {r['timed_s']:>8.2f}")  # fmt: skip
    a, t = results["align"], results["trl"]
    for name, r in results.items():
        if abs(r["tokens_per_s"] / r["median_step_tokens_per_s"] - 1) > 0.2:
            print(f"WARNING: {name}'s tokens/s is more than 20% off its median step's: its steps varied, the machine was probably busy")
    for key, what in (
        ("shape", "model shapes (align/builtin.py changed between the runs?)"),
        ("weights", "initial weights"),
        ("data", "training pairs"),
    ):
        if a[key] != t[key]:
            print(f"WARNING: the sides trained different {what}: {a[key]} != {t[key]}")
    print(f"model {a['shape']} + scalar head, {a['params'] / 1e6:.2f}M parameters, same initial weights ({a['weights']}) and "
          f"pairs ({a['data']}); tokens = len(chosen) + len(rejected) over all steps' pairs (what TRL feeds), fed = non-pad positions "
          "fed to the model, pad % = padding share of the positions fed; "
          "steps/s, tokens/s and median step exclude the warm-up steps")  # fmt: skip
    print(f"mean train loss over the run (each side shuffles the pairs its own way): align {a['mean_loss']:.4f}, TRL {t['mean_loss']:.4f}")
    from gpu_check import measured_peak

    peak, where, dtype = measured_peak("cpu", args.threads)
    print(f"MFU: 6 x parameters per position fed (attention left out) over {peak / 1e12:.3f} TFLOP/s, a {dtype} matmul measured "
          f"now on {where}: align {pair_mfu(a, 0, peak):.1%}, TRL {pair_mfu(t, 0, peak):.1%}")  # fmt: skip
    print(f"RESULT align/trl tokens_per_s={a['tokens_per_s'] / t['tokens_per_s']:.3f} peak_rss={a['peak_rss_mib'] / t['peak_rss_mib']:.3f} "
          f"mfu={pair_mfu(a, 0, peak):.3f} trl_mfu={pair_mfu(t, 0, peak):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
