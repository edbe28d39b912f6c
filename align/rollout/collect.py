"""Sample → score → `Rollout` records: the one way every trainer fills the rollout buffer.

PPO (`align rlhf`), online MPO and rejection-sampling SFT all draw samples here: the generator
answers each prompt `n` times, the reward router scores every answer under its prompt's condition
(the condition prompt reaches the reward model only), and each answer becomes a `Rollout` carrying its
reward, the per-component breakdown, the verifier's judgement and the truncated flag.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from align.rollout.buffer import Rollout
from align.rollout.generation import Generator, SamplingParams
from rewards.router import RewardRouter

VERIFIER_COMPONENTS = ("task", "math", "refusal")  # components whose value is a correctness judgement (1 right, 0 wrong)


def verifier_routes(conditions: Sequence[str]) -> dict[str, dict[str, float]]:
    """Routes that score every condition by the task verifier alone (no reward model): MPO and SFT sampling."""
    return {c: {"task": 1.0} for c in [*conditions, "default"]}


def collect_rollouts(
    generator: Generator,
    router: RewardRouter,
    problems: Sequence[dict],
    params: SamplingParams,
    round_index: int = 0,
    policy_version: int = 0,
) -> list[Rollout]:
    """`params.n` scored rollouts per problem ({uid, messages, condition, answer, unsafe}), in problem order."""
    generations = generator.generate([p["messages"] for p in problems], params)
    samples, owners = [], []
    for problem, group in zip(problems, generations, strict=True):
        for g in group:
            samples.append({**problem, "condition": problem.get("condition") or "default", "prompt": problem["messages"], "response": g.text})
            owners.append((problem, g))
    result = router.score(samples) if samples else None
    missing = [i for i, p in enumerate(problems) if not p.get("uid")]
    if missing:  # a rank-local fallback (the position in this rank's shard) would pair answers to different prompts
        raise ValueError(f"problems {missing[:3]} have no uid: fix prompt ids before sharding (align.evaluation.load_prompts does)")
    rollouts = []
    for i, (problem, g) in enumerate(owners):
        parts = {name: float(values[i]) for name, values in result.components.items() if not math.isnan(float(values[i]))}
        judged = [parts[name] for name in VERIFIER_COMPONENTS if name in parts]
        rollouts.append(
            Rollout(
                prompt_ids=list(g.prompt_ids),
                response_ids=list(g.response_ids),
                prompt=[dict(m) for m in problem["messages"]],
                response=g.text,
                prompt_id=str(problem["uid"]),
                group=policy_version,
                condition=problem.get("condition"),
                round=round_index,
                policy_version=policy_version,
                truncated=g.truncated,
                reward=float(result.scores[i]),
                reward_parts=parts,
                correct=all(v >= 1.0 for v in judged) if judged else None,
                sampler_logprobs=torch.tensor(g.logprobs, dtype=torch.float32, device="cpu") if g.logprobs is not None else None,
            )
        )
    return rollouts
