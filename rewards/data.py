"""Comparison rows → tokenised (chosen, rejected) pairs for the reward model.

Rows are `{"prompt": messages | str, "chosen": str | messages, "rejected": ..., "condition", "margin", "tag"}`,
or TRL's implicit-prompt form where `chosen`/`rejected` are whole conversations sharing a prefix.
Pairs longer than max_length follow the bad-row policy (TRL drops them silently; we do not).
An optional string `tag` names the kind of comparison; evaluation reports accuracy per tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from data_builders.bad_rows import BadRowError, BadRowPolicy, no_usable_rows
from data_builders.preference_data import parse_preference, preference_rows
from rewards.conditions import UnknownConditionError, render_for_reward

if TYPE_CHECKING:
    from align.config import DataConfig, SourceConfig


@dataclass
class Pair:
    chosen: list[int]
    rejected: list[int]
    condition: str | None
    margin: float = 0.0
    origin: str = ""
    tag: str | None = None

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def parse_comparison(raw: Any, origin: str, row: int) -> tuple[list[dict], str, str, str | None, float, str | None]:
    """A preference row (see `data_builders.preference_data.parse_preference`) plus its optional margin and tag."""
    prompt, chosen, rejected, condition = parse_preference(raw, origin, row)
    margin = raw.get("margin") or 0.0
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise BadRowError(origin, row, "margin", f"expected a number, got {type(margin).__name__}")
    tag = raw.get("tag")
    if tag is not None and not isinstance(tag, str):
        raise BadRowError(origin, row, "tag", f"expected a string, got {type(tag).__name__}")
    return prompt, chosen, rejected, condition, float(margin), tag


def build_pairs(
    sources: list[SourceConfig],
    data: DataConfig,
    conditions: dict[str, str],
    tokenizer: PreTrainedTokenizerBase,
    policy: BadRowPolicy,
    reward_token_id: int | None = None,
    split: str = "train",
) -> list[Pair]:
    pairs, skipped_before = [], policy.count
    for source in sources:
        for origin, row, raw in preference_rows(source, data, policy, split):
            try:
                prompt, chosen, rejected, condition, margin, tag = parse_comparison(raw, origin, row)
                try:
                    ids = [render_for_reward(tokenizer, conditions, condition, prompt, r, reward_token_id) for r in (chosen, rejected)]
                except UnknownConditionError as err:
                    raise BadRowError(origin, row, "condition", str(err)) from None
                if max(map(len, ids)) > data.max_length:
                    raise BadRowError(origin, row, "chosen", f"{max(map(len, ids))} tokens exceed max_length {data.max_length}")
            except BadRowError as err:
                policy.handle(err, raw)
                continue
            pairs.append(Pair(ids[0], ids[1], condition, margin, f"{origin}:{row}", tag))
    if not pairs:
        raise no_usable_rows("comparison pairs", split, policy, policy.count - skipped_before)
    return pairs
