"""The rollout buffer: one record type for every trainer (OpenRLHF's `Experience`, split by level).

Episode-level fields (one per sample): prompt and response ids, condition, prompt id and group,
round and policy version, scalar reward with its per-source breakdown, verifier correctness, the
truncated flag. Step-level fields (one per response token): policy and reference log-probs, values,
advantages, returns. Records are stored without padding; `micro_batches` groups them by a token budget.

Online PPO fills it; the views feed the other trainers:
- `preference_pairs()` ranks each prompt group by correctness, then reward, for MPO (InternVL's
  correctness builder over the group's samples);
- `best_of_n()` keeps each group's best sample for rejection-sampling SFT;
- `comparisons(early, late)` builds reward-model pairs from a round's early and late samples, where the
  verifier disagrees with the reward (the fast path of COOL RLHF's reward-hacking defence).

`state_dict`/`load_state_dict` (and `save`/`load`: safetensors + JSON) carry it through checkpoints, so
a resumed PPO run continues with the same buffer.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from data_builders.pair_builders import GeneratedSample, correctness_pairs

STEP_FIELDS = ("logprobs", "ref_logprobs", "values", "advantages", "returns", "sampler_logprobs")


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]
    prompt: list[dict]  # chat messages the policy saw (never the reward model's condition prompt)
    response: str
    prompt_id: str
    group: int  # samples of one prompt drawn together share a group
    condition: str | None = None
    round: int = 0
    policy_version: int = 0
    truncated: bool = False
    reward: float | None = None
    reward_parts: dict[str, float] = field(default_factory=dict)  # e.g. {"rm": 1.2, "math": 1.0}
    correct: bool | None = None  # verifier's judgement, when the condition has one
    # step-level, one value per response token
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    sampler_logprobs: torch.Tensor | None = None  # the generating engine's own log-probs of the response (vLLM), for the drift metric

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def episode_fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in STEP_FIELDS}


def global_sums(values: torch.Tensor, accelerator: Any = None) -> tuple[float, float, float]:
    """(sum, sum of squares, count) of host `values` over every rank, in fp64 with one all-reduce (moments, whitening)."""
    flat = values.double().flatten()
    stats = torch.stack([flat.sum(), (flat**2).sum(), torch.tensor(float(flat.numel()), dtype=torch.float64, device="cpu")])
    if accelerator is not None and accelerator.num_processes > 1:
        stats = accelerator.reduce(stats.to(accelerator.device), "sum").cpu()
    total, squares, count = stats.tolist()
    return total, squares, count


class RolloutBuffer:
    def __init__(self, rollouts: Iterable[Rollout] = ()):
        self.rollouts: list[Rollout] = list(rollouts)

    def __len__(self) -> int:
        return len(self.rollouts)

    def __getitem__(self, i: int) -> Rollout:
        return self.rollouts[i]

    def add(self, rollouts: Iterable[Rollout]) -> None:
        for r in rollouts:
            for name in STEP_FIELDS:
                value = getattr(r, name)
                if value is not None and len(value) != len(r.response_ids):
                    raise ValueError(f"rollout {r.prompt_id}/{r.group}: {name} has {len(value)} values for {len(r.response_ids)} response tokens")
            self.rollouts.append(r)

    def clear(self) -> None:
        self.rollouts.clear()

    # --- batching -----------------------------------------------------------------------------
    def micro_batches(self, token_budget: int, indices: Sequence[int] | None = None) -> list[list[int]]:
        """Indices grouped so each group's prompt + response tokens stay within `token_budget` (longest first, first fit).

        A sample longer than the budget gets a group of its own.
        """
        order = sorted(indices if indices is not None else range(len(self)), key=lambda i: -self.rollouts[i].num_tokens)
        groups: list[list[int]] = []
        used: list[int] = []
        for i in order:
            n = self.rollouts[i].num_tokens
            for g, total in enumerate(used):
                if total + n <= token_budget:
                    groups[g].append(i)
                    used[g] += n
                    break
            else:
                groups.append([i])
                used.append(n)
        return groups

    def normalize_advantages(self, accelerator: Any = None, eps: float = 1e-8) -> tuple[float, float]:
        """Whiten advantages over every response token on every rank (sum, sum of squares and count all-reduced)."""
        values = [r.advantages for r in self.rollouts if r.advantages is not None]
        total, squares, count = global_sums(torch.cat(values) if values else torch.zeros(0, device="cpu"), accelerator)
        if count == 0:
            return 0.0, 1.0
        mean = total / count
        std = math.sqrt(max(squares / count - mean**2, 0.0))
        for r in self.rollouts:
            if r.advantages is not None:
                r.advantages = ((r.advantages.double() - mean) / (std + eps)).to(r.advantages.dtype)
        return mean, std

    # --- views for the other trainers -------------------------------------------------------
    def groups(self) -> dict[tuple[str, int], list[Rollout]]:
        by: dict[tuple[str, int], list[Rollout]] = defaultdict(list)
        for r in self.rollouts:
            by[(r.prompt_id, r.group)].append(r)
        return dict(by)

    def preference_pairs(self, max_pairs_per_prompt: int = 3, seed: int = 0) -> list[dict]:
        """MPO rows: within each prompt group, verifier-correct beats wrong; without a verifier, higher reward beats lower."""
        samples = []
        for (prompt_id, group), members in sorted(self.groups().items()):
            if all(m.correct is None for m in members):  # no verifier: above the group's median reward counts as right
                rewards = sorted(m.reward for m in members if m.reward is not None)
                median = rewards[len(rewards) // 2] if rewards else math.inf
                labels = [m.reward is not None and m.reward > median for m in members]
            else:
                labels = [bool(m.correct) for m in members]
            samples += [GeneratedSample(f"{prompt_id}#{group}", m.prompt, m.response, ok, m.condition) for m, ok in zip(members, labels)]
        return correctness_pairs(samples, max_pairs_per_prompt, seed)

    def best_of_n(self, require_correct: bool = True) -> list[dict]:
        """Rejection-sampling SFT rows: each group's highest-reward sample (correct ones only, when judged)."""
        rows = []
        for _, members in sorted(self.groups().items()):
            pool = [m for m in members if m.correct or m.correct is None or not require_correct]
            pool = [m for m in pool if not m.truncated]
            if not pool:
                continue
            best = max(pool, key=lambda m: (bool(m.correct), m.reward if m.reward is not None else -math.inf))
            rows.append({"messages": [*map(dict, best.prompt), {"role": "assistant", "content": best.response}], "condition": best.condition})
        return rows

    def comparisons(self, early: Sequence[Rollout], late: Sequence[Rollout]) -> list[dict]:
        """Reward-model rows from early vs. late samples of a prompt where the verifier contradicts the reward.

        Reward hacking shows as late samples that score higher yet are wrong: each becomes the rejected side
        against a correct sample of the same prompt (early or late) that the reward ranked lower.
        """
        by_prompt: dict[str, list[Rollout]] = defaultdict(list)
        for r in [*early, *late]:
            by_prompt[r.prompt_id].append(r)
        rows = []
        for r in late:
            if r.correct is not False or r.reward is None:
                continue
            better = [c for c in by_prompt[r.prompt_id] if c.correct and c.reward is not None and c.reward < r.reward]
            if better:
                chosen = min(better, key=lambda c: c.reward)
                rows.append({"prompt": [dict(m) for m in r.prompt], "chosen": chosen.response, "rejected": r.response, "condition": r.condition})
        return rows

    # --- persistence --------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        tensors = {f"{i}.{name}": getattr(r, name).contiguous() for i, r in enumerate(self.rollouts) for name in STEP_FIELDS
                   if getattr(r, name) is not None}  # fmt: skip
        return tensors, [r.episode_fields() for r in self.rollouts]

    def load_state_dict(self, tensors: dict[str, torch.Tensor], episodes: list[dict[str, Any]]) -> None:
        self.rollouts = [Rollout(**e, **{n: tensors.get(f"{i}.{n}") for n in STEP_FIELDS}) for i, e in enumerate(episodes)]

    def save(self, directory: str | Path, name: str = "rollouts") -> None:
        """`name.safetensors` (step-level tensors) and `name.json` (episodes), each written atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, episodes = self.state_dict()
        tmp = directory / f".{name}.tmp{os.getpid()}"
        save_file(tensors, str(tmp.with_suffix(".safetensors")))
        tmp.with_suffix(".json").write_text(json.dumps(episodes))
        os.replace(tmp.with_suffix(".safetensors"), directory / f"{name}.safetensors")
        os.replace(tmp.with_suffix(".json"), directory / f"{name}.json")

    @classmethod
    def load(cls, directory: str | Path, name: str = "rollouts") -> RolloutBuffer:
        directory = Path(directory)
        buffer = cls()
        buffer.load_state_dict(load_file(str(directory / f"{name}.safetensors")), json.loads((directory / f"{name}.json").read_text()))
        return buffer

