"""Step-labelled rows from the policy's own samples, for `align prm` (the rollout buffer, as MPO's sampled pairs).

Prompts are sharded over ranks; `collect_rollouts` samples and scores them with the task verifier alone; each rank
saves its buffer (`rollouts-{train,eval}-rankR`). Every response is split into steps by `prm.step_separator` and
labelled (`rewards/prm_labels.py`): by rule where the prompt is a synthetic-suite sum (or a refusal), else, or
with `labels: completion`, Math-Shepherd style: `completions` continuations are sampled from the prefix ending with
each step (`HFGenerator` prefixes) and scored by the verifier. A correct response needs no continuations (it is
one of every prefix). The rows are gathered, sorted and saved by `policy_samples.rows_once`, so a resumed or
repeated start trains on the very rows the first one labelled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from align.config import PRMRecipe
from align.engine.core import Engine
from align.evaluation import load_prompts
from align.rollout.buffer import RolloutBuffer
from align.rollout.collect import collect_rollouts, verifier_routes
from align.rollout.engines import make_generator
from align.rollout.generation import Generator, SamplingParams
from align.trainers.policy_samples import gather_rows, sum_over_ranks
from data_builders.errors import UserError
from rewards.prm import step_spans
from rewards.prm_labels import rule_labels, shepherd_labels
from rewards.router import RewardRouter
from rewards.verifiers import task_score

SPLITS = {"train": "train", "eval": "heldout"}  # row split → synthetic-suite split of its prompts


def completion_labels(generator: Generator, items: Sequence[tuple[dict, str, list[tuple[int, int]]]], params: SamplingParams,
                      soft: bool = False) -> list[list[float]]:  # fmt: skip
    """Math-Shepherd labels of each (problem, response, step spans): `params.n` continuations per step prefix, in one call.

    The prefix of step k runs through the separator after it, so a continuation starts at the next step.
    """
    requests, owners = [], []
    for i, (problem, response, spans) in enumerate(items):
        if task_score(problem, response) >= 1.0:
            continue  # a correct response continues every one of its prefixes correctly
        for k in range(len(spans) - 1):
            requests.append((problem, response[: spans[k + 1][0]]))
            owners.append((i, k))
    outcomes: list[list[list[float]]] = [[[] for _ in range(len(spans) - 1)] for _, _, spans in items]
    if requests:
        generations = generator.generate([p["messages"] for p, _ in requests], params, prefixes=[prefix for _, prefix in requests])
        for (i, k), (problem, prefix), group in zip(owners, requests, generations, strict=True):
            outcomes[i][k] = [task_score(problem, prefix + g.text) for g in group]
    labels = []
    for (problem, response, spans), steps in zip(items, outcomes, strict=True):
        final = task_score(problem, response)
        labels.append([1.0] * len(spans) if final >= 1.0 else shepherd_labels(steps, final, soft))
    return labels


def draw_step_rows(policy: torch.nn.Module, tokenizer: Any, engine: Engine, recipe: PRMRecipe) -> tuple[list[dict], dict[str, Any]]:
    """This run's labelled rows (train and held-out, every rank's, sorted) and their counts."""
    cfg, sep, seed = recipe.prm.samples, recipe.prm.step_separator, recipe.train.seed
    generator = make_generator(policy, tokenizer, engine, cfg.batch_size)
    params = SamplingParams(cfg.max_new_tokens, cfg.samples_per_prompt, cfg.temperature, cfg.top_p)
    rows, counts = [], {}
    for split, suite_split in SPLITS.items():
        n = cfg.num_prompts if split == "train" else cfg.eval_prompts
        if n == 0:
            continue
        problems = load_prompts(cfg.prompts_path, recipe.data.synthetic, n, split=suite_split)
        mine = problems[engine.rank :: engine.world_size]
        torch.manual_seed(seed * 1009 + engine.rank + (0 if split == "train" else 104_729))
        router = RewardRouter(verifier_routes(sorted({p.get("condition") or "default" for p in problems})))
        buffer = RolloutBuffer(collect_rollouts(generator, router, mine, params) if mine else [])
        buffer.save(engine.run_dir, f"rollouts-{split}-rank{engine.rank}")
        by_uid = {str(p["uid"]): p for p in mine}
        labelled, pending = [], []
        for j, r in enumerate(buffer.rollouts):
            problem, spans = by_uid[r.prompt_id], step_spans(r.response, sep)
            if not spans:
                continue  # an empty response has no step to label
            labels = rule_labels(problem, r.response, [r.response[s:e] for s, e in spans]) if cfg.labels != "completion" else None
            if labels is None and cfg.labels == "rule":
                raise UserError(f"prm.samples.labels: rule: prompt {r.prompt_id!r} is not a synthetic-suite sum, so its steps cannot be "
                                "checked by rule; use labels: completion (Math-Shepherd) or auto")  # fmt: skip
            row = {"split": split, "prompt_id": r.prompt_id, "sample": j % params.n, "prompt": r.prompt, "response": r.response,
                   "condition": r.condition, "labels": labels, "labelled_by": "rule", "correct": bool(r.correct), "truncated": r.truncated}  # fmt: skip
            labelled.append(row)
            if labels is None:
                pending.append((row, problem, spans))
        if pending:
            shepherd = SamplingParams(cfg.max_new_tokens, cfg.completions, cfg.temperature or 1.0, cfg.top_p)  # greedy would give k copies
            found = completion_labels(generator, [(p, row["response"], spans) for row, p, spans in pending], shepherd, cfg.soft_labels)
            for (row, _, _), labels in zip(pending, found, strict=True):
                row["labels"], row["labelled_by"] = labels, "completion"
        rows += labelled
        steps = [label for row in labelled for label in row["labels"]]
        total = sum_over_ranks(engine, [len(buffer), len(labelled), sum(row["correct"] for row in labelled), len(steps),
                                        sum(v >= 0.5 for v in steps), sum(row["labelled_by"] == "completion" for row in labelled)])  # fmt: skip
        counts[split] = dict(zip(("samples", "rows", "correct_rows", "steps", "good_steps", "completion_labelled"), total, strict=True))
    rows = gather_rows(engine, rows, key=lambda r: (r["split"], r["prompt_id"], r["sample"], r["response"]))
    return rows, counts
