"""Reward-hacking detectors for COOL RLHF's fast path, on a round's early vs. late samples.

InternLM2 patches the reward model between rounds wherever PPO learned to exploit it. The patterns
flagged here are the ones a verifier or plain statistics can see: reward rising while verifier
accuracy falls, responses growing much longer, more responses cut at the token limit, and
degenerate repetition.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from align.rollout.buffer import Rollout

if TYPE_CHECKING:
    from align.config import DetectorConfig


def is_repetitive(text: str, n: int = 3, times: int = 3) -> bool:
    """Some word n-gram occurs `times` times or more."""
    words = text.split()
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def sample_stats(rollouts: Sequence[Rollout]) -> dict[str, float]:
    n = max(1, len(rollouts))
    judged = [r.correct for r in rollouts if r.correct is not None]
    return {
        "count": len(rollouts),
        "reward": sum(r.reward or 0.0 for r in rollouts) / n,
        "accuracy": sum(judged) / len(judged) if judged else float("nan"),
        "length": sum(len(r.response_ids) for r in rollouts) / n,
        "truncated": sum(r.truncated for r in rollouts) / n,
        "repetitive": sum(is_repetitive(r.response) for r in rollouts) / n,
    }


def split_early_late(rollouts: Sequence[Rollout]) -> tuple[list[Rollout], list[Rollout]]:
    """The first and second half of a round, by policy version (iteration)."""
    versions = sorted({r.policy_version for r in rollouts})
    cut = versions[len(versions) // 2] if len(versions) > 1 else versions[0] + 1 if versions else 0
    return [r for r in rollouts if r.policy_version < cut], [r for r in rollouts if r.policy_version >= cut]


def detect_hacking(early: Sequence[Rollout], late: Sequence[Rollout], cfg: DetectorConfig) -> dict[str, Any]:
    """{"flags": [...], "early": stats, "late": stats}; a flag names a pattern seen in the late samples."""
    e, late_stats = sample_stats(early), sample_stats(late)
    flags = []
    if late_stats["reward"] > e["reward"] and late_stats["accuracy"] < e["accuracy"] - cfg.accuracy_drop:
        flags.append("reward_up_accuracy_down")
    if e["length"] > 0 and late_stats["length"] > cfg.length_ratio * e["length"]:
        flags.append("length_blowup")
    if late_stats["truncated"] > cfg.truncated_share and late_stats["truncated"] > 2 * e["truncated"]:
        flags.append("truncation")
    if late_stats["repetitive"] > cfg.repetition_share and late_stats["repetitive"] > 2 * e["repetitive"]:
        flags.append("repetition")
    return {"flags": flags, "early": e, "late": late_stats}
