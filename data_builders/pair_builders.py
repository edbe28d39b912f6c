"""InternVL's two preference-pair builders (MMPR), over generated samples.

- correctness: sample N responses per prompt, judge each (final answer / refusal), and pair correct
  against wrong, at most k pairs per prompt;
- Dropout-NTP: cut a correct response at 50% of its words and let the model continue with the
  evidence dropped (images removed; a text-only prompt loses its question); the continuation,
  written without looking, is the rejected response.

Both take a list of `GeneratedSample`s (the rollout buffer will hand them its samples) and return
preference rows `{prompt, chosen, rejected, condition}` that `data_builders.preference_data` renders.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GeneratedSample:
    prompt_id: str
    prompt: tuple[dict, ...] | list[dict]
    response: str
    correct: bool
    condition: str | None = None


def correctness_pairs(samples: Sequence[GeneratedSample], max_pairs_per_prompt: int = 15, seed: int = 0) -> list[dict]:
    """Correct beats wrong, per prompt; distinct non-empty responses only (an empty sample can't be a preference
    row); at most `max_pairs_per_prompt`, drawn at random."""
    rng = random.Random(seed)
    groups: dict[str, list[GeneratedSample]] = defaultdict(list)
    for s in samples:
        groups[s.prompt_id].append(s)
    rows = []
    for prompt_id in sorted(groups):
        group = groups[prompt_id]
        right = sorted({s.response for s in group if s.correct and s.response.strip()})
        wrong = sorted({s.response for s in group if not s.correct and s.response.strip()})
        combos = [(c, r) for c in right for r in wrong]
        rng.shuffle(combos)
        for chosen, rejected in combos[:max_pairs_per_prompt]:
            rows.append({"prompt": [dict(m) for m in group[0].prompt], "chosen": chosen, "rejected": rejected,
                         "condition": group[0].condition, "builder": "correctness", "prompt_id": prompt_id})  # fmt: skip
    return rows


def drop_evidence(messages: Sequence[dict]) -> list[dict]:
    """The prompt without its evidence: image parts removed; with none, the last user message's text removed."""
    out, removed = [], False
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            kept = [part for part in content if part.get("type") != "image"]
            removed |= len(kept) != len(content)
            content = kept
        out.append({**m, "content": content})
    if not removed:
        last_user = max(i for i, m in enumerate(out) if m["role"] == "user")
        out[last_user] = {**out[last_user], "content": ""}
    return out


def truncate_words(text: str, share: float = 0.5) -> str:
    words = text.split(" ")
    return " ".join(words[: max(1, math.ceil(len(words) * share))])


def dropout_ntp_pairs(
    samples: Sequence[GeneratedSample],
    continue_without_evidence: Callable[[list[list[dict]], list[str]], list[str]],
    share: float = 0.5,
    max_per_prompt: int = 1,
) -> list[dict]:
    """Correct response vs. its first `share` of words + a continuation written without the evidence.

    `continue_without_evidence(prompts, prefixes)` returns one continuation per (evidence-free prompt,
    assistant prefix). A continuation that reproduces the original exactly gives no pair.
    """
    chosen: list[GeneratedSample] = []
    per_prompt: dict[str, int] = defaultdict(int)
    for s in samples:
        if s.correct and per_prompt[s.prompt_id] < max_per_prompt and len(s.response.split()) > 1:
            per_prompt[s.prompt_id] += 1
            chosen.append(s)
    prefixes = [truncate_words(s.response, share) for s in chosen]
    continuations = continue_without_evidence([drop_evidence(s.prompt) for s in chosen], prefixes)
    rows = []
    for s, prefix, rest in zip(chosen, prefixes, continuations, strict=True):
        rejected = prefix + rest
        if rejected.strip() and rejected.strip() != s.response.strip():
            rows.append({"prompt": [dict(m) for m in s.prompt], "chosen": s.response, "rejected": rejected,
                         "condition": s.condition, "builder": "dropout_ntp", "prompt_id": s.prompt_id})  # fmt: skip
    return rows
