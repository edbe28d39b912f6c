"""Comparison rows → tokenised (chosen, rejected) pairs for the reward model.

Rows are `{"prompt": messages | str, "chosen": str | messages, "rejected": ..., "condition", "margin", "tag"}`,
or TRL's implicit-prompt form where `chosen`/`rejected` are whole conversations sharing a prefix.
Pairs longer than max_length follow the bad-row policy (TRL drops them silently; we do not).
An optional string `tag` names the kind of comparison; evaluation reports accuracy per tag.

A prompt may carry images (OpenAI image parts, or `<image>` markers with a row-level `images` list, as MPO's rows): given
the reward model's `ImageText` they are checked and expanded into the prompt, which both sides share, so the pair's
image sits in the shared prefix of its pair unit (`data_builders/pair_rows.py`) and is seen once. A text-only reward
model makes such a row a bad row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from data_builders.bad_rows import BadRowError, BadRowPolicy, no_usable_rows
from data_builders.preference_data import parse_preference_images, preference_rows
from rewards.conditions import UnknownConditionError, reward_tokens

if TYPE_CHECKING:
    from align.config import DataConfig, SourceConfig
    from data_builders.image_tokens import ImageText
    from data_builders.images import ImageRef


@dataclass
class Pair:
    chosen: list[int]
    rejected: list[int]
    condition: str | None
    margin: float = 0.0
    origin: str = ""
    tag: str | None = None
    images: list[ImageRef] = field(default_factory=list)  # the prompt's images, in span order
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # their context spans, inside the shared prompt

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def parse_comparison(raw: Any, origin: str, row: int) -> tuple[list[dict], str, str, str | None, float, str | None]:
    """A text preference row (see `data_builders.preference_data.parse_preference`) plus its optional margin and tag."""
    prompt, chosen, rejected, condition, margin, tag, images = parse_comparison_images(raw, origin, row)
    if images:
        raise BadRowError(origin, row, "images", f"the row has {len(images)} image(s) but this path takes text rows only")
    return prompt, chosen, rejected, condition, margin, tag


def parse_comparison_images(raw: Any, origin: str, row: int) -> tuple[list[dict], str, str, str | None, float, str | None, list]:
    """`parse_comparison` plus the prompt's image values, unopened (`parse_preference_images`)."""
    prompt, chosen, rejected, condition, images = parse_preference_images(raw, origin, row)
    margin = raw.get("margin") or 0.0
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise BadRowError(origin, row, "margin", f"expected a number, got {type(margin).__name__}")
    tag = raw.get("tag")
    if tag is not None and not isinstance(tag, str):
        raise BadRowError(origin, row, "tag", f"expected a string, got {type(tag).__name__}")
    return prompt, chosen, rejected, condition, float(margin), tag, images


def build_pairs(
    sources: list[SourceConfig],
    data: DataConfig,
    conditions: dict[str, str],
    tokenizer: PreTrainedTokenizerBase,
    policy: BadRowPolicy,
    reward_token_id: int | None = None,
    split: str = "train",
    images: ImageText | None = None,
) -> list[Pair]:
    """Tokenised pairs; `images` (a vision-language reward model's) makes rows with prompt images usable."""
    pairs, skipped_before = [], policy.count
    for source in sources:
        for origin, row, raw in preference_rows(source, data, policy, split):
            try:
                prompt, chosen, rejected, condition, margin, tag, values = parse_comparison_images(raw, origin, row)
                if images is None and values:
                    raise BadRowError(origin, row, "images", f"the row has {len(values)} image(s) but the reward model takes no images "
                                      "(a text-only model)")  # fmt: skip
                refs = images.resolve(values, prompt, origin, row) if images is not None else []
                try:
                    sides = [reward_tokens(tokenizer, conditions, condition, prompt, r, reward_token_id, images, refs, origin, row)
                             for r in (chosen, rejected)]  # fmt: skip
                except UnknownConditionError as err:
                    raise BadRowError(origin, row, "condition", str(err)) from None
                ids = [side[0] for side in sides]
                if max(map(len, ids)) > data.max_length:
                    raise BadRowError(origin, row, "chosen", f"{max(map(len, ids))} tokens exceed max_length {data.max_length}")
            except BadRowError as err:
                policy.handle(err, raw)
                continue
            pairs.append(Pair(ids[0], ids[1], condition, margin, f"{origin}:{row}", tag, list(refs), sides[0][1]))
    if not pairs:
        raise no_usable_rows("comparison pairs", split, policy, policy.count - skipped_before)
    return pairs
