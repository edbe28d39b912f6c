"""COOL RLHF iteration: where one PPO iteration of `RLHFTrainer` spends its time, and gathered vs sharded generation.

No network: the script first saves a random policy (`--model`, default `builtin:small`, with the built-in
tokenizer) and a reward model started from it (`align.engine.models.load_reward_model`, head seeded non-zero,
`reward_stats.json` beside it, as in tests/test_rlhf.py) to a temporary folder. With `--stop` (the
default) the policy's end-of-turn logit is raised to about `--stop-logit` against its mean hidden state (the
`stopping_policy` trick of tests/test_rlhf.py), so sampled responses stop after a random number of tokens
and ranks finish at different lengths; `--no-stop` lets every response run to `max_new_tokens`.

Each measurement runs `RLHFTrainer` (configs/rlhf/quickstart.yaml with those checkpoints, no wandb, no
progress bar, no eval, `ppo.critic_warmup_iterations=0` so every iteration trains actor and critic,
one round) in a child process:

1. single process, no DeepSpeed: `--warmup` iterations (not counted), then `--iterations` timed ones.
   Printed: mean generate / score / experience / train seconds per iteration (`time/*` of
   `run_iteration`) and their shares of the four, rollouts/s over the whole iteration and generated
   tokens/s over the generate phase.
2. two processes under ZeRO-3 (`accelerate launch --num_processes 2 --config_file
   configs/accelerate/zero3.yaml`), generation alone, on the same workload as one PPO iteration (each
   rank's prompts, the recipe's `samples_per_prompt`, temperature and `max_new_tokens`; the same seed per
   rank for every mode):
   - gathered: `HFGenerator(trainer.model, ..., submodule="actor")`, as the trainer calls it (the actor's
     ZeRO-3 shards gathered once per call by TRL's `unwrap_model_for_generation`);
   - gathered, unsynced: the same gathered weights, `synced_gpus=False` passed explicitly (transformers
     turns `synced_gpus` on by itself whenever a ZeRO-3 config is active and the world size is > 1; the
     output says whether it was on for the gathered run);
   - sharded: `trainer.model.module.actor.generate(..., synced_gpus=True)` on the partitioned actor inside
     the DeepSpeed engine (every layer's shards fetched for every new token; `synced_gpus=True` keeps a rank
     that has finished joining the other ranks' collectives until all have).
   Generated tokens/s counts both ranks' response tokens (up to and including the end-of-turn token) over
   the wall time from a barrier before the call to a barrier after it. The ratio gathered/sharded is the
   one peers report ~10x for on GPUs.
3. the same two-process ZeRO-3 run then times PPO iterations as in 1 (rank 0's timings), unless
   `--no-zero3-split`.

fp32 on CPU; `--threads` torch threads per process (default 1: on a shared 2-core VM, 2 threads in one
process can be several times slower than 1 when other jobs take the cores).

The last line: `RESULT rlhf split generate=<share> score=<share> experience=<share> train=<share>
gathered/sharded=<ratio>` (the single-process split; gathered as the trainer runs it).

`--engine vllm` (needs vLLM: `make install-vllm`, then `.venv-vllm/bin/python benchmarks/...`) replaces 2 and 3: the
single-process measurement of 1 runs twice on the same checkpoints and seed, with `rollout.engine=hf` and with
`rollout.engine=vllm`. The vLLM engine starts in the warm-up iteration. Its weight sync after each optimizer step
is timed inside generate and printed on its own. The last line is then `RESULT rlhf hf/vllm iteration_speedup=<HF
iteration s / vLLM iteration s> generate_speedup=<HF generate s / vLLM generate s, sync included>`.

    python benchmarks/rlhf_iteration.py --quick      # < 3 min on 2 CPU cores
    python benchmarks/rlhf_iteration.py
    .venv-vllm/bin/python benchmarks/rlhf_iteration.py --quick --engine vllm
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
from sft_vs_trl import ENV, REPO, run_json_process  # noqa: E402

PHASES = ("generate", "score", "experience", "train")
QUICKSTART = REPO / "configs" / "rlhf" / "quickstart.yaml"
ZERO3 = REPO / "configs" / "accelerate" / "zero3.yaml"
GEN_MODES = ("gathered", "gathered_unsynced", "sharded")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller iterations, fewer of them (< 3 min on 2 cores)")
    p.add_argument("--model", default="builtin:small", help="builtin:tiny|small|medium (random weights)")
    p.add_argument("--iterations", type=int, default=None, help="timed PPO iterations per run (default 2 quick, 5 full)")
    p.add_argument("--warmup", type=int, default=1, help="leading iterations not timed")
    p.add_argument("--prompts", type=int, default=None, help="ppo.prompts_per_iteration (default 16 quick, 32 full as the quickstart)")
    p.add_argument("--samples", type=int, default=4, help="ppo.samples_per_prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--stop", action=argparse.BooleanOptionalAction, default=True,
                   help="raise the end-of-turn logit so responses stop at random lengths (else they run to max_new_tokens)")  # fmt: skip
    p.add_argument("--stop-logit", type=float, default=2.5, help="end-of-turn logit against the mean hidden state (with --stop)")
    p.add_argument("--zero3-split", action=argparse.BooleanOptionalAction, default=True, help="also time PPO iterations under ZeRO-3")
    p.add_argument("--zero3-iterations", type=int, default=None, help="timed ZeRO-3 iterations (default 1 quick, 3 full)")
    p.add_argument("--gen-repeats", type=int, default=None, help="timed calls per generation mode (default 1 quick, 2 full)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1: steadier on a shared 2-core VM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="vllm: the single-process iteration with HF and with vLLM rollouts")
    p.add_argument("--rollout-engine", choices=["hf", "vllm"], default="hf", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=["single", "zero3"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.iterations = args.iterations or (2 if args.quick else 5)
    args.zero3_iterations = args.zero3_iterations or (1 if args.quick else 3)
    args.prompts = args.prompts or (16 if args.quick else 32)
    args.gen_repeats = args.gen_repeats or (1 if args.quick else 2)
    return args


# ----------------------------------------------------------------------------- checkpoints
def build_checkpoints(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """A random policy (optionally with the stopping trick) and a reward model started from it, saved like `align sft` / `align rm`."""
    import torch

    from align.config import ModelConfig
    from align.engine.models import load_causal_lm, load_reward_model, load_tokenizer
    from rewards.conditions import DEFAULT_CONDITIONS
    from rewards.model import reward_head

    plain, policy, rm = root / "policy-plain", root / "policy", root / "rm"
    cfg = ModelConfig(name_or_path=args.model)
    tok = load_tokenizer(cfg)
    model = load_causal_lm(cfg, tok, torch.float32, seed=args.seed)
    model.save_pretrained(plain)
    tok.save_pretrained(plain)
    params = sum(p.numel() for p in model.parameters())

    reward = load_reward_model(ModelConfig(name_or_path=str(plain)), tok)
    with torch.no_grad():
        head = reward_head(reward).weight
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(args.seed)) * 0.5)
    reward.save_pretrained(rm)
    tok.save_pretrained(rm)
    stats = {c: {"mean": 0.0, "std": 1.0} for c in DEFAULT_CONDITIONS}
    (rm / "reward_stats.json").write_text(json.dumps({"conditions": dict(DEFAULT_CONDITIONS), "stats": stats}))

    if args.stop:  # tests/test_rlhf.py `stopping_policy`: end-of-turn logit ≈ stop_logit at the mean hidden state
        with torch.no_grad():
            ids = tok("What is 12+30? Final Answer: 42", return_tensors="pt")["input_ids"]
            mean = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
            model.get_output_embeddings().weight[tok.eos_token_id] = args.stop_logit * mean / mean.pow(2).sum()
        model.save_pretrained(policy)
        tok.save_pretrained(policy)
    else:
        policy = plain
    return {"policy": str(policy), "rm": str(rm), "params": params, "vocab": len(tok)}


# ----------------------------------------------------------------------------- workers
def recipe(args: argparse.Namespace, ckpt: dict[str, Any], output_dir: Path, iterations: int) -> Any:
    from align.config import RLHFRecipe, load_recipe
    from align.engine.accelerator import world_size_from_env

    # the quickstart's 32 rollouts per micro-step, or fewer when a rank's mini-batch (of 2) holds fewer
    micro = min(32, args.prompts * args.samples // 2 // world_size_from_env())

    overrides = [
        f"output_dir={output_dir}", f"model.name_or_path={ckpt['policy']}", f"ppo.reward_model={ckpt['rm']}",
        "logging.wandb=false", "logging.progress=false", "eval.enabled=false", "ppo.critic_warmup_iterations=0",
        "ppo.rounds=1", f"ppo.iterations_per_round={iterations}", f"ppo.prompts_per_iteration={args.prompts}",
        f"ppo.samples_per_prompt={args.samples}", f"ppo.max_new_tokens={args.max_new_tokens}", f"train.seed={args.seed}",
        f"train.micro_batch_size={micro}", "train.save_every=0", "train.resume=false", "data.synthetic.train_rows=600",  # PTX rows: setup only, not timed
        f"rollout.engine={args.rollout_engine}", "rollout.kv_cache_gib=0.5", "rollout.max_model_len=1024",
    ]  # fmt: skip
    return load_recipe(RLHFRecipe, QUICKSTART, overrides)


def time_iterations(trainer: Any, args: argparse.Namespace, timed: int) -> list[dict[str, float]]:
    """`args.warmup` untimed iterations, then `timed` ones: `time/*`, wall, rollouts and generated tokens of each."""
    ppo = trainer.ppo
    rollouts = ppo.prompts_per_iteration * ppo.samples_per_prompt
    out = []
    for t in range(args.warmup + timed):
        started = time.perf_counter()
        metrics = trainer.run_iteration(t)
        wall = time.perf_counter() - started
        if t >= args.warmup:
            out.append({**{k: metrics[f"time/{k}"] for k in PHASES}, "wall": wall, "rollouts": rollouts,
                        "weight_sync": metrics.get("time/weight_sync", 0.0), "logprob_diff_max": metrics.get("sampler/logprob_diff_max"),
                        "tokens": metrics["response_length"] * rollouts, "response_length": metrics["response_length"],
                        "truncated_share": metrics["truncated_share"]})  # fmt: skip
    return out


class _Forced:
    """The model's `generate` with `synced_gpus` fixed, for `HFGenerator._batch`."""

    def __init__(self, model: Any, synced: bool):
        self.model, self.synced = model, synced

    def generate(self, **kwargs: Any) -> Any:
        return self.model.generate(**{**kwargs, "synced_gpus": self.synced})


def compare_generation(trainer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One PPO iteration's generation workload, gathered (as the trainer does), gathered unsynced, and sharded."""
    import torch
    import torch.distributed as dist
    from accelerate.utils import gather_object
    from transformers.integrations import is_deepspeed_zero3_enabled

    from align.rollout.generation import SamplingParams, full_weights
    from data_builders.render import render_prompt

    engine, ppo, tok = trainer.engine, trainer.ppo, trainer.tokenizer
    acc = engine.accelerator
    params = SamplingParams(ppo.max_new_tokens, ppo.samples_per_prompt, ppo.temperature, ppo.top_p)
    prompts = [p["messages"] for p in trainer.iteration_prompts(0)]
    generator = trainer.generator()  # HFGenerator(trainer.model, ..., submodule="actor")
    chunks = [[render_prompt(tok, m) for m in prompts[i : i + generator.batch_size]] for i in range(0, len(prompts), generator.batch_size)]

    @torch.no_grad()
    def gathered_unsynced(params: SamplingParams) -> list:
        trainer.model.eval()
        with full_weights(trainer.model, acc) as unwrapped:
            out = [g for chunk in chunks for g in generator._batch(_Forced(unwrapped.actor, False), chunk, params)]
        trainer.model.train()
        return out

    @torch.no_grad()
    def sharded(params: SamplingParams) -> list:
        trainer.model.eval()
        actor = trainer.model.module.actor  # partitioned: the engine's hooks fetch each layer's shards per forward
        out = [g for chunk in chunks for g in generator._batch(_Forced(actor, True), chunk, params)]
        trainer.model.train()
        return out

    modes = {"gathered": lambda p: generator.generate(prompts, p), "gathered_unsynced": gathered_unsynced, "sharded": sharded}
    result: dict[str, Any] = {"zero3_enabled_in_transformers": bool(is_deepspeed_zero3_enabled()), "prompts_per_rank": len(prompts),
                              "rows_per_rank": len(prompts) * params.n}  # fmt: skip
    short = SamplingParams(4, params.n, params.temperature, params.top_p)
    responses: dict[str, list] = {}
    all_reduce, calls = dist.all_reduce, [0]

    def counted(*a: Any, **kw: Any) -> Any:  # synced_gpus: transformers all-reduces a "this rank finished" flag every step
        calls[0] += 1
        return all_reduce(*a, **kw)

    for name, fn in modes.items():
        torch.manual_seed(args.seed + engine.rank)
        fn(short)  # warm-up: first call's allocations and DeepSpeed's trace
        seconds = []
        for _ in range(args.gen_repeats):
            torch.manual_seed(args.seed * 1009 + engine.rank)
            acc.wait_for_everyone()
            calls[0], dist.all_reduce = 0, counted
            started = time.perf_counter()
            out = fn(params)
            acc.wait_for_everyone()
            dist.all_reduce = all_reduce
            seconds.append(time.perf_counter() - started)
            responses[name] = [g.response_ids for group in out for g in group]
        local = sum(len(r) for r in responses[name])
        lengths = gather_object([local])
        tokens = sum(lengths)
        mean = statistics.fmean(seconds)
        result[name] = {
            "seconds": seconds,
            "tokens": tokens,
            "tokens_per_rank": lengths,
            "tokens_per_s": tokens / mean,
            "all_reduces": calls[0],
        }
    same = gather_object([all(responses[m] == responses["gathered"] for m in GEN_MODES)])
    result["identical_outputs"] = all(same)
    return result


def worker(args: argparse.Namespace) -> None:
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    os.cpu_count = lambda: args.threads * world  # the Engine sizes torch threads as cpu_count // world size
    from align.trainers.rlhf import RLHFTrainer

    ckpt = json.loads(Path(args.ckpt).read_text())
    zero3 = args.worker == "zero3"
    timed = args.zero3_iterations if zero3 else args.iterations
    with tempfile.TemporaryDirectory(prefix=f"rlhf_iteration_{args.worker}_") as tmp:
        started = time.perf_counter()
        trainer = RLHFTrainer(recipe(args, ckpt, Path(tmp) / "run", args.warmup + timed))
        trainer.setup()
        result: dict[str, Any] = {"setup_s": time.perf_counter() - started, "world_size": trainer.engine.world_size,
                                  "deepspeed": trainer.engine.deepspeed, "threads": torch.get_num_threads()}  # fmt: skip
        if zero3:
            result["generation"] = compare_generation(trainer, args)
        if not zero3 or args.zero3_split:
            result["iterations"] = time_iterations(trainer, args, timed)
        trainer.engine.accelerator.wait_for_everyone()
    if trainer.engine.is_main:
        Path(args.out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent
def run_worker(args: argparse.Namespace, kind: str, ckpt_file: Path, out: Path, label: str) -> dict[str, Any]:
    script = [str(Path(__file__).resolve())]
    if kind == "zero3":
        script = ["-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file", str(ZERO3), "--main_process_port", "0", *script]  # fmt: skip
    forwarded = ["--model", args.model, "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--prompts", str(args.prompts),
                 "--samples", str(args.samples), "--max-new-tokens", str(args.max_new_tokens), "--zero3-iterations", str(args.zero3_iterations),
                 "--gen-repeats", str(args.gen_repeats), "--threads", str(args.threads), "--seed", str(args.seed),
                 "--rollout-engine", args.rollout_engine,
                 "--zero3-split" if args.zero3_split else "--no-zero3-split"]  # fmt: skip
    cmd = [sys.executable, *script, *forwarded, "--worker", kind, "--ckpt", str(ckpt_file), "--out", str(out)]
    result, seconds = run_json_process(cmd, label, out, f"{kind} worker")
    result["process_s"] = seconds
    print(f"done in {result['process_s']:.0f} s (setup {result['setup_s']:.0f} s)", flush=True)
    return result


def split(iterations: list[dict[str, float]]) -> dict[str, float]:
    mean = {
        k: statistics.fmean(it[k] for it in iterations)
        for k in (*PHASES, "wall", "rollouts", "tokens", "response_length", "truncated_share")
    }
    phases = sum(mean[k] for k in PHASES)
    return {**mean, "phases": phases, **{f"share/{k}": mean[k] / phases for k in PHASES},
            "rollouts_per_s": mean["rollouts"] / mean["wall"], "gen_tokens_per_s": mean["tokens"] / mean["generate"]}  # fmt: skip


def print_split(name: str, s: dict[str, float], n: int) -> None:
    cells = " ".join(f"{s[k]:>7.2f} ({s[f'share/{k}']:>4.0%})" for k in PHASES)
    print(f"{name:<22} {n:>3} {cells} {s['wall']:>7.2f} {s['rollouts_per_s']:>10.1f} {s['gen_tokens_per_s']:>9.0f} {s['response_length']:>9.1f} "
          f"{s['truncated_share']:>6.0%}")  # fmt: skip


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def report_engines(args: argparse.Namespace, ckpt: dict[str, Any], hf: dict[str, Any], vllm: dict[str, Any]) -> None:
    """The HF and vLLM single-process splits side by side, and the RESULT line of `--engine vllm`."""
    print(f"model: {ckpt['params'] / 1e6:.2f}M parameters, vocabulary {ckpt['vocab']}")
    print("\nPPO iteration, mean seconds (share); generate includes vLLM's weight sync; rollouts/s over the whole iteration")
    print(f"{'run':<22} {'its':>3} " + " ".join(f"{k:>14}" for k in PHASES) + f" {'wall':>7} {'rollouts/s':>10} {'gen tok/s':>9} {'resp len':>9} {'trunc':>6}")
    a, b = split(hf["iterations"]), split(vllm["iterations"])
    print_split("HF generate", a, len(hf["iterations"]))
    print_split("vLLM", b, len(vllm["iterations"]))
    syncs = [it["weight_sync"] for it in vllm["iterations"]]
    gaps = [it["logprob_diff_max"] for it in vllm["iterations"] if it["logprob_diff_max"] is not None]
    print(f"vLLM weight sync per iteration: {', '.join(f'{x:.3f}' for x in syncs)} s (engine start in the warm-up iteration); "
          f"max |vLLM - trainer| log-prob per iteration: {', '.join(f'{x:.1e}' for x in gaps)}; setup {hf['setup_s']:.0f} s HF, "
          f"{vllm['setup_s']:.0f} s vLLM")  # fmt: skip
    print(f"RESULT rlhf hf/vllm iteration_speedup={a['phases'] / b['phases']:.2f} generate_speedup={a['generate'] / b['generate']:.2f} "
          f"hf_generate_s={a['generate']:.2f} vllm_generate_s={b['generate']:.2f} vllm_sync_s={statistics.fmean(syncs):.3f}")


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    os.environ.update(ENV)
    rollouts = args.prompts * args.samples
    print(f"{args.model} policy + critic (from the RM) + frozen reference + frozen RM on cpu (fp32), configs/rlhf/quickstart.yaml: "
          f"{args.prompts} prompts x {args.samples} samples = {rollouts} rollouts per iteration, max_new_tokens {args.max_new_tokens}, "
          f"temperature 1.0, 2 mini-batches, PTX on; {args.warmup} warm-up + {args.iterations} timed iterations; {args.threads} torch thread(s) per process")  # fmt: skip
    print("responses: " + (f"stopping trick (end-of-turn logit ~{args.stop_logit:g}, random lengths)" if args.stop
                           else f"no stopping trick (run to max_new_tokens={args.max_new_tokens} unless end-of-turn is sampled)"))  # fmt: skip
    print(f"before: {load_note()}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rlhf_iteration_") as tmp:
        ckpt = build_checkpoints(args, Path(tmp))
        ckpt_file = Path(tmp) / "checkpoints.json"
        ckpt_file.write_text(json.dumps(ckpt))
        single = run_worker(args, "single", ckpt_file, Path(tmp) / "single.json", f"1 process: {args.warmup}+{args.iterations} iterations")
        if args.engine == "vllm":
            args.rollout_engine = "vllm"
            fast = run_worker(args, "single", ckpt_file, Path(tmp) / "vllm.json", f"1 process, vLLM rollouts: {args.warmup}+{args.iterations} iterations")
            print(f"after: {load_note()}; {time.perf_counter() - started:.0f} s in all")
            return report_engines(args, ckpt, single, fast)
        label = f"2 processes ZeRO-3: generation x{len(GEN_MODES)} modes" + (
            f", {args.warmup}+{args.zero3_iterations} iterations" if args.zero3_split else ""
        )
        zero3 = run_worker(args, "zero3", ckpt_file, Path(tmp) / "zero3.json", label)
    print(f"after: {load_note()}; {time.perf_counter() - started:.0f} s in all")
    print(f"model: {ckpt['params'] / 1e6:.2f}M parameters, vocabulary {ckpt['vocab']}")

    print("\nPPO iteration, mean seconds (share of generate+score+experience+train); rollouts/s over the whole iteration, "
          "generated tokens/s over generate")  # fmt: skip
    print(
        f"{'run':<22} {'its':>3} "
        + " ".join(f"{k:>14}" for k in PHASES)
        + f" {'wall':>7} {'rollouts/s':>10} {'gen tok/s':>9} {'resp len':>9} {'trunc':>6}"
    )
    s1 = split(single["iterations"])
    print_split("1 process", s1, len(single["iterations"]))
    if "iterations" in zero3:
        print_split("2 processes ZeRO-3", split(zero3["iterations"]), len(zero3["iterations"]))
        print("(ZeRO-3: rank 0's timings; rollouts and tokens of both ranks)")

    g = zero3["generation"]
    print(f"\nGeneration under ZeRO-3, 2 processes x {zero3['threads']} thread(s): {g['prompts_per_rank']} prompts x {args.samples} samples per rank, "
          f"max_new_tokens {args.max_new_tokens}, temperature 1.0, same seed per rank in every mode; "
          f"{args.gen_repeats} timed call(s) each after a 4-token warm-up")  # fmt: skip
    print(f"{'mode':<34} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'all_reduce calls':>16}")
    names = {
        "gathered": "gathered (HFGenerator, as trained)",
        "gathered_unsynced": "gathered, synced_gpus=False",
        "sharded": "sharded, synced_gpus=True",
    }
    for mode in GEN_MODES:
        r = g[mode]
        print(f"{names[mode]:<34} {r['tokens']:>7} {statistics.fmean(r['seconds']):>8.2f} {r['tokens_per_s']:>9.1f} {r['all_reduces']:>16}")
    ratio = g["gathered"]["tokens_per_s"] / g["sharded"]["tokens_per_s"]
    print(f"gathered/sharded={ratio:.2f}, gathered unsynced/sharded={g['gathered_unsynced']['tokens_per_s'] / g['sharded']['tokens_per_s']:.2f}; "
          f"identical outputs in all modes: {g['identical_outputs']}; tokens per rank {g['gathered']['tokens_per_rank']}; "
          f"transformers' is_deepspeed_zero3_enabled(): {g['zero3_enabled_in_transformers']} (with 2 ranks it turns synced_gpus on by "
          f"default; all_reduce calls: rank 0's, last timed call)")  # fmt: skip
    shares = " ".join(f"{k}={s1[f'share/{k}']:.3f}" for k in PHASES)
    print(f"RESULT rlhf split {shares} gathered/sharded={ratio:.2f}")


if __name__ == "__main__":
    main()
