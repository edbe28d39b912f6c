"""Comparison rows → tokenised (chosen, rejected) pairs for the reward model.

Rows are `{"prompt": messages | str, "chosen": str | messages, "rejected": ..., "condition", "margin"}`,
or TRL's implicit-prompt form where `chosen`/`rejected` are whole conversations sharing a prefix.
Pairs longer than max_length follow the bad-row policy (TRL drops them silently; we do not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from data_builders.bad_rows import BadRowError, BadRowPolicy
from data_builders.readers import read_rows
from data_builders.synthetic import SyntheticTask
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

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def _messages(value: Any, origin: str, row: int, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise BadRowError(origin, row, field, "expected a string or a list of {role, content} messages")


def _response(value: Any, origin: str, row: int, field: str) -> str:
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        value = value[-1].get("content")
    if not isinstance(value, str) or not value.strip():
        raise BadRowError(origin, row, field, "expected a non-empty response string")
    return value


def parse_comparison(raw: Any, origin: str, row: int) -> tuple[list[dict], str, str, str | None, float]:
    if not isinstance(raw, dict):
        raise BadRowError(origin, row, "<row>", "expected a JSON object")
    for key in ("chosen", "rejected"):
        if key not in raw:
            raise BadRowError(origin, row, key, "missing")
    if "prompt" in raw:
        prompt = _messages(raw["prompt"], origin, row, "prompt")
    else:  # implicit prompt: the shared prefix of two conversations
        chosen_conv = _messages(raw["chosen"], origin, row, "chosen")
        if chosen_conv[:-1] != _messages(raw["rejected"], origin, row, "rejected")[:-1]:
            raise BadRowError(origin, row, "rejected", "without 'prompt', chosen and rejected must share all but the last message")
        prompt = chosen_conv[:-1]
    chosen, rejected = _response(raw["chosen"], origin, row, "chosen"), _response(raw["rejected"], origin, row, "rejected")
    if chosen == rejected:
        raise BadRowError(origin, row, "rejected", "identical to chosen")
    margin = raw.get("margin") or 0.0
    if not isinstance(margin, (int, float)):
        raise BadRowError(origin, row, "margin", f"expected a number, got {type(margin).__name__}")
    return prompt, chosen, rejected, raw.get("condition"), float(margin)


def comparison_rows(source: SourceConfig, data: DataConfig, policy: BadRowPolicy, split: str):
    if source.path == "synthetic":
        syn = data.synthetic
        task = SyntheticTask(syn.seed, syn.digits, syn.concise_share)
        n = source.max_rows or (syn.train_rows if split == "train" else syn.eval_rows)
        for i, row in enumerate(task.preference_pairs(n, split="train" if split == "train" else "heldout")):
            yield f"synthetic-pairs[{split}]", i, row
    else:
        yield from read_rows(source.path, source.split, source.max_rows, policy)


def build_pairs(
    sources: list[SourceConfig],
    data: DataConfig,
    conditions: dict[str, str],
    tokenizer: PreTrainedTokenizerBase,
    policy: BadRowPolicy,
    reward_token_id: int | None = None,
    split: str = "train",
) -> list[Pair]:
    pairs = []
    for source in sources:
        for origin, row, raw in comparison_rows(source, data, policy, split):
            try:
                prompt, chosen, rejected, condition, margin = parse_comparison(raw, origin, row)
                try:
                    ids = [render_for_reward(tokenizer, conditions, condition, prompt, r, reward_token_id) for r in (chosen, rejected)]
                except UnknownConditionError as err:
                    raise BadRowError(origin, row, "condition", str(err)) from None
                if max(map(len, ids)) > data.max_length:
                    raise BadRowError(origin, row, "chosen", f"{max(map(len, ids))} tokens exceed max_length {data.max_length}")
            except BadRowError as err:
                policy.handle(err, raw)
                continue
            pairs.append(Pair(ids[0], ids[1], condition, margin, f"{origin}:{row}"))
    if not pairs:
        raise ValueError(f"no usable {split} comparison pairs (see quarantine.jsonl)")
    return pairs
