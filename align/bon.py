"""`align bon`: best-of-N test-time scaling, the reward router as the critic (InternVL3's best-of-N).

Each held-out prompt gets max(n_values) samples from the policy, drawn once; the reward router scores every
sample through the entry point RLHF uses (`collect_rollouts` → `RewardRouter.score`: the conditional RM with
the prompt's condition prompt, normalised by the stats `align rm` stored). For each N the pick is the best of
the *first* N samples by router score, so all N's are nested draws of one sampling pass: no resampling noise
between them and no extra generation. Reported per N: task accuracy of the pick (overall and per condition),
pass@N (any of the first N correct: what a perfect critic would reach) and the mean router score of the pick.

Sampling does not depend on the world size: prompts go in chunks of `eval.batch_size` (one `generate` call
each), dealt round-robin over ranks, and each chunk's sampling is seeded by `bon.seed` and its index.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from align.config import ConfigError, EvalConfig, ModelConfig, RewardConfig, RunRecipe, load_recipe
from align.model_paths import MAKE_PRM, MAKE_RM, check_model_path

if TYPE_CHECKING:
    from align.rollout.generation import Generator


def _rm_only_routes() -> dict[str, dict[str, float]]:
    return {"default": {"rm": 1.0}}


@dataclasses.dataclass
class BoNConfig:
    """The critic and the sampling of best-of-N.

    `routes` default to the reward model alone. A route that adds a task verifier (`task`, `math`, `refusal`)
    picks with the very ground truth the reported accuracy is measured by: best-of-N then climbs towards pass@N
    by construction, which says nothing about test-time scaling (use it only as a labelled oracle). The summary
    lists any verifier a route uses. `reward_model: null` is allowed only with routes that do not use `rm`; a route
    with `prm` needs `process_reward_model` (its step scores, aggregated by `aggregation`, are the component).
    """

    reward_model: str | None = "runs/rm-quickstart/model"  # a conditional RM from `align rm`
    process_reward_model: str | None = None  # a PRM from `align prm`, the `prm` route component
    aggregation: Literal["mean", "min", "last"] = "mean"  # a response's PRM score from its step scores (VisualPRM: mean)
    routes: dict[str, dict[str, float]] = dataclasses.field(default_factory=_rm_only_routes)  # condition (or default) → {rm | verifier: weight}
    n_values: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8])
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    row_tokens: int = 512  # tokens per packed reward-model row (CPU attention pays for the whole row × row block)


@dataclasses.dataclass
class BoNRecipe(RunRecipe):
    output_dir: str = "runs/bon"
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(name_or_path="runs/sft-quickstart/model"))
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)  # held-out prompts, max_new_tokens, prompts per generate call
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)  # the RM's condition prompts (and reward token)
    bon: BoNConfig = dataclasses.field(default_factory=BoNConfig)


VERIFIER_NAMES = ("task", "math", "refusal")  # components that read the ground truth


# ----------------------------------------------------------------------------- metrics
def pick(scores: Sequence[float], n: int) -> int:
    """Index of the best of the first `n` scores; the earliest wins a tie (a rule with no randomness)."""
    return max(range(n), key=lambda j: scores[j])


def best_of_n_metrics(groups: Sequence[dict], n_values: Sequence[int]) -> tuple[dict[str, Any], dict[int, list[int]]]:
    """Metrics per N and the picked sample index of every prompt per N.

    `groups`: one per prompt, {"condition", "scores": [router score per sample], "correct": [bool per sample]}.
    """
    picks = {n: [pick(g["scores"], n) for g in groups] for n in n_values}
    by_condition: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by_condition[g["condition"]].append(i)
    conditions = sorted(by_condition)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    metrics: dict[str, Any] = {key: {} for key in ("accuracy_at_n", "accuracy_by_condition_at_n", "pass_at_n", "pass_by_condition_at_n", "reward_at_n")}
    for n in n_values:
        right = [float(g["correct"][j]) for g, j in zip(groups, picks[n])]
        passed = [float(any(g["correct"][:n])) for g in groups]
        key = str(n)
        metrics["accuracy_at_n"][key] = mean(right)
        metrics["pass_at_n"][key] = mean(passed)
        metrics["reward_at_n"][key] = mean([g["scores"][j] for g, j in zip(groups, picks[n])])
        metrics["accuracy_by_condition_at_n"][key] = {c: mean([right[i] for i in by_condition[c]]) for c in conditions}
        metrics["pass_by_condition_at_n"][key] = {c: mean([passed[i] for i in by_condition[c]]) for c in conditions}
    every = [float(c) for g in groups for c in g["correct"]]
    metrics["sample_accuracy"] = mean(every)  # one random sample's accuracy, estimated from all of them
    metrics["sample_accuracy_by_condition"] = {c: mean([float(x) for i in by_condition[c] for x in groups[i]["correct"]]) for c in conditions}
    metrics["num_prompts"] = len(groups)
    return metrics, picks


# ----------------------------------------------------------------------------- the job
class _Replay:
    """A generator that hands back generations already made (so generation and scoring are timed apart)."""

    def __init__(self, generations: list):
        self.generations = generations

    def generate(self, prompts: list, params: Any, prefixes: list[str] | None = None) -> list:
        return self.generations


def gather(items: list, world_size: int) -> list:
    """Every rank's items on every rank, in rank order: accelerate's `gather_object`, or torch.distributed directly
    under a bare `torchrun` on CPU (accelerate then reports no distributed type and would return this rank's alone)."""
    if world_size == 1:
        return items
    from accelerate import PartialState
    from accelerate.utils import DistributedType, gather_object

    if PartialState().distributed_type != DistributedType.NO:
        return gather_object(items)
    import torch.distributed

    parts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def torch_no_grad() -> Any:
    """`torch.no_grad()`, imported when used: the CLI imports this module to register `align bon`."""
    import torch

    return torch.no_grad()


def validate(recipe: BoNRecipe) -> None:
    """Fail before any model loads: bad N's, greedy copies, an absent policy or reward model."""
    bon = recipe.bon
    if not bon.n_values or any(n < 1 for n in bon.n_values):
        raise ConfigError(f"bon.n_values must be positive integers, got {bon.n_values}")
    if bon.temperature <= 0 and max(bon.n_values) > 1:
        raise ConfigError("bon.temperature must be > 0 when an N exceeds 1: N greedy samples are N copies")
    uses_rm = any("rm" in route for route in bon.routes.values())
    if not bon.routes:
        raise ConfigError("bon.routes is empty; the default scores every condition by the reward model: {default: {rm: 1.0}}")
    if uses_rm and bon.reward_model is None:
        raise ConfigError("bon.routes use 'rm' but bon.reward_model is null; give a reward model or routes without 'rm'")
    uses_prm = any("prm" in route for route in bon.routes.values())
    if uses_prm and bon.process_reward_model is None:
        raise ConfigError("bon.routes use 'prm' but bon.process_reward_model is null; give a process reward model from `align prm`")
    check_model_path(recipe.model.name_or_path)
    if uses_rm:
        check_model_path(bon.reward_model, "bon.reward_model", MAKE_RM)
    if uses_prm:
        check_model_path(bon.process_reward_model, "bon.process_reward_model", MAKE_PRM)


class BestOfN:
    """Sample once, score every sample with the router, pick per N; `generator()` is the seam tests replace."""

    def __init__(self, recipe: BoNRecipe):
        validate(recipe)  # before torch and accelerate load: a bad recipe fails at once
        from align.engine.core import Engine

        self.recipe, self.bon = recipe, recipe.bon
        self.engine = Engine.create(recipe)

    def setup(self) -> None:
        from align.engine.models import load_causal_lm, load_reward_model, load_tokenizer, without_zero3_init
        from align.engine.vision import image_text_for
        from align.evaluation import load_prompts
        from align.reward_model_info import RewardModelInfo, reward_token_id
        from rewards.router import RewardRouter

        recipe, bon, engine = self.recipe, self.bon, self.engine
        self.tokenizer = load_tokenizer(recipe.model)
        reward_model, rm_tokenizer, stats, conditions, rm_images = None, self.tokenizer, {}, recipe.reward.conditions, None
        token = recipe.reward.reward_token
        # whole replicas on every rank, even under a ZeRO-3 launch: ranks generate and score on their own, never waiting on each other
        with without_zero3_init():
            self.policy = load_causal_lm(recipe.model, self.tokenizer, engine.dtype, seed=recipe.train.seed).to(engine.device).eval()
            self.images = image_text_for(self.policy, self.tokenizer, recipe.data.images)  # a VLM: prompts may carry images
            if any("rm" in route for route in bon.routes.values()):
                rm_cfg = ModelConfig(name_or_path=bon.reward_model, trust_remote_code=recipe.model.trust_remote_code,
                                     attn_implementation=recipe.model.attn_implementation)  # fmt: skip
                if (Path(bon.reward_model) / "tokenizer_config.json").exists():  # the RM reads text: its own tokenizer if it has one
                    rm_tokenizer = load_tokenizer(rm_cfg)
                reward_model = load_reward_model(rm_cfg, rm_tokenizer, engine.dtype).to(engine.device).eval().requires_grad_(False)
                info = RewardModelInfo.read(bon.reward_model)
                info.check_conditions(conditions, bon.reward_model)
                stats, token = info.stats, info.resolve_reward_token(recipe.reward.reward_token, bon.reward_model)
                # a VLM reward model: image prompts become its tokens and tiles as in `align rm` (its trained tiling)
                rm_images = image_text_for(reward_model, rm_tokenizer, info.images_config(recipe.data.images))
            scorer = self.process_scorer() if any("prm" in route for route in bon.routes.values()) else None
        token_id = reward_token_id(rm_tokenizer, token)
        self.router = RewardRouter(bon.routes, reward_model, rm_tokenizer, conditions, stats, reward_token_id=token_id, row_tokens=bon.row_tokens,
                                   process_scorer=scorer, images=rm_images)  # fmt: skip
        self.problems = load_prompts(recipe.eval.prompts_path, recipe.data.synthetic, recipe.eval.num_prompts)
        if not self.problems:
            raise ValueError("no held-out prompts (eval.num_prompts / eval.prompts_path)")

    def process_scorer(self) -> Any:
        """The PRM critic: its own tokenizer (if it has one), the step separator and condition prompts it was trained with."""
        from align.engine.models import load_reward_model, load_tokenizer
        from rewards.prm import PRMInfo, ProcessRewardScorer

        path, model = self.bon.process_reward_model, self.recipe.model
        cfg = ModelConfig(name_or_path=path, trust_remote_code=model.trust_remote_code, attn_implementation=model.attn_implementation)
        tokenizer = load_tokenizer(cfg) if (Path(path) / "tokenizer_config.json").exists() else self.tokenizer
        prm = load_reward_model(cfg, tokenizer, self.engine.dtype).to(self.engine.device).eval().requires_grad_(False)
        return ProcessRewardScorer(prm, tokenizer, PRMInfo.read(path), self.bon.aggregation, row_tokens=self.bon.row_tokens)

    def generator(self) -> Generator:
        from align.rollout.engines import make_generator

        return make_generator(self.policy, self.tokenizer, self.engine, self.recipe.eval.batch_size, images=self.images)

    def my_chunks(self) -> list[tuple[int, list[int]]]:
        """(chunk index, prompt indices) of this rank: fixed-size chunks dealt round-robin, the same for any world size."""
        size, total = max(1, self.recipe.eval.batch_size), len(self.problems)
        chunks = [list(range(s, min(s + size, total))) for s in range(0, total, size)]
        return [(c, chunks[c]) for c in range(self.engine.rank, len(chunks), self.engine.world_size)]

    def sample_and_score(self) -> tuple[list[dict], dict[str, float]]:
        """This rank's prompts with their samples and router scores, then every rank's, gathered and in prompt order."""
        with torch_no_grad():
            return self._sample_and_score()

    def _sample_and_score(self) -> tuple[list[dict], dict[str, float]]:
        import torch

        from align.rollout.collect import collect_rollouts
        from align.rollout.generation import SamplingParams
        from rewards.verifiers import task_score

        bon, engine = self.bon, self.engine
        params = SamplingParams(self.recipe.eval.max_new_tokens, max(bon.n_values), bon.temperature, bon.top_p)
        generator, generations, indices = self.generator(), [], []
        start = time.perf_counter()
        for chunk, members in self.my_chunks():
            torch.manual_seed(bon.seed * 1_000_003 + chunk)
            generations += generator.generate([self.problems[i]["messages"] for i in members], params)
            indices += members
        seconds = {"generate": time.perf_counter() - start}
        start = time.perf_counter()
        mine = [self.problems[i] for i in indices]
        rollouts = collect_rollouts(_Replay(generations), self.router, mine, params) if mine else []
        seconds["score"] = time.perf_counter() - start
        n = params.n
        groups = []
        for k, (index, problem) in enumerate(zip(indices, mine)):
            group = rollouts[k * n : (k + 1) * n]
            groups.append({
                "index": index, "uid": problem.get("uid"), "condition": problem.get("condition") or "default",
                "responses": [r.response for r in group], "scores": [float(r.reward) for r in group],
                "parts": [r.reward_parts for r in group], "truncated": [r.truncated for r in group],
                "correct": [task_score(problem, r.response) >= 1.0 for r in group],
            })  # fmt: skip
        if engine.world_size > 1:
            groups = gather(groups, engine.world_size)
            seconds = {k: max(t[k] for t in gather([seconds], engine.world_size)) for k in seconds}  # the slowest rank sets the pace
        return sorted(groups, key=lambda g: g["index"]), seconds

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        recipe, bon, engine = self.recipe, self.bon, self.engine
        self.setup()
        groups, seconds = self.sample_and_score()
        n_values = sorted(set(bon.n_values))
        metrics, picks = best_of_n_metrics(groups, n_values)
        metrics["truncated_share"] = sum(t for g in groups for t in g["truncated"]) / max(1, sum(len(g["truncated"]) for g in groups))
        verifiers = sorted({name for route in bon.routes.values() for name in route if name in VERIFIER_NAMES})
        summary = {
            "job": "bon",
            "metrics": metrics,
            "n_values": n_values,
            "samples_per_prompt": max(n_values),
            "routes": bon.routes,
            "verifiers_in_routes": verifiers,  # non-empty: the picks saw the ground truth (an oracle, not test-time scaling)
            "time_split_s": {k: round(v, 2) for k, v in seconds.items()},
            "wall_s": round(time.perf_counter() - started, 2),
            "world_size": engine.world_size,
            "model_path": str(Path(recipe.model.name_or_path).resolve()) if Path(recipe.model.name_or_path).exists() else recipe.model.name_or_path,
            "reward_model": self.reward_model_path(),
            "process_reward_model": self.process_reward_model_path(),
            "aggregation": bon.aggregation if self.process_reward_model_path() else None,
        }
        if engine.is_main:
            self.write(groups, picks, summary)
        engine.accelerator.wait_for_everyone()
        return summary

    def reward_model_path(self) -> str | None:
        """The critic's path as scored with; None when no route uses the reward model."""
        path = self.bon.reward_model
        if path is None or not any("rm" in route for route in self.bon.routes.values()):
            return None
        return str(Path(path).resolve()) if Path(path).exists() else path

    def process_reward_model_path(self) -> str | None:
        """The PRM critic's path; None when no route uses it."""
        path = self.bon.process_reward_model
        if path is None or not any("prm" in route for route in self.bon.routes.values()):
            return None
        return str(Path(path).resolve()) if Path(path).exists() else path

    def write(self, groups: list[dict], picks: dict[int, list[int]], summary: dict) -> None:
        """samples.jsonl (one row per sample: its router score, correctness and the N's it was picked at) and summary.json."""
        run_dir = self.engine.run_dir
        with open(run_dir / "samples.jsonl", "w") as f:
            for p, g in enumerate(groups):
                for j, response in enumerate(g["responses"]):
                    row = {"prompt_index": g["index"], "uid": g["uid"], "condition": g["condition"], "sample_index": j,
                           "response": response, "score": g["scores"][j], "parts": g["parts"][j], "correct": g["correct"][j],
                           "truncated": g["truncated"][j], "picked_at": [n for n, chosen in picks.items() if chosen[p] == j]}  # fmt: skip
                    f.write(json.dumps(row) + "\n")
        tmp = run_dir / "summary.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(run_dir / "summary.json")


def run_bon(recipe: BoNRecipe) -> dict[str, Any]:
    return BestOfN(recipe).run()


# ----------------------------------------------------------------------------- command line
def format_table(summary: dict) -> str:
    m = summary["metrics"]
    conditions = list(next(iter(m["accuracy_by_condition_at_n"].values()), {}))
    head = f"{'N':>3}  {'accuracy':>8}  {'pass@N':>6}  {'reward':>7}" + "".join(f"  {c:>9}" for c in conditions)
    lines = [head]
    for key in m["accuracy_at_n"]:
        by = m["accuracy_by_condition_at_n"][key]
        lines.append(f"{key:>3}  {m['accuracy_at_n'][key]:>8.1%}  {m['pass_at_n'][key]:>6.1%}  {m['reward_at_n'][key]:>7.3f}"
                     + "".join(f"  {by[c]:>9.1%}" for c in conditions))  # fmt: skip
    return "\n".join(lines)


def cmd_bon(args: argparse.Namespace) -> int:
    """Best-of-N by the reward router on the held-out prompts; one report per job."""
    summary = run_bon(load_recipe(BoNRecipe, args.config, args.overrides))
    if os.environ.get("RANK", "0") == "0":
        m = summary["metrics"]
        critics = [p for p in (summary["reward_model"], summary.get("process_reward_model")) if p]
        aggregation = f", PRM steps aggregated by {summary['aggregation']}" if summary.get("aggregation") else ""
        print(f"[bon] best-of-N on {m['num_prompts']} held-out prompts, {summary['samples_per_prompt']} samples each; "
              f"critic: {' + '.join(critics) or 'verifiers only'} (routes {json.dumps(summary['routes'])}{aggregation})")  # fmt: skip
        if summary["verifiers_in_routes"]:
            print(f"[bon] warning: routes use the task verifier ({', '.join(summary['verifiers_in_routes'])}): the picks saw the ground truth")
        print(format_table(summary))
        split = ", ".join(f"{k} {v:.0f} s" for k, v in summary["time_split_s"].items())
        print(f"[bon] sample accuracy {m['sample_accuracy']:.1%}; {summary['wall_s']:.0f} s ({split}); policy: {summary['model_path']}")
    return 0


def register(subparsers: Any) -> None:
    """Add `align bon --config RECIPE.yaml [--set key=value ...]`."""
    parser = subparsers.add_parser("bon", help="best-of-N test-time scaling: sample N, pick by the reward router, report accuracy per N")
    parser.add_argument("--config", required=True, help="YAML recipe under configs/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    parser.set_defaults(func=cmd_bon)


def main(argv: list[str] | None = None) -> int:
    """`python -m align.bon --config ...`: the command without the `align` front end."""
    parser = argparse.ArgumentParser(prog="align")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bon", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"align: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
