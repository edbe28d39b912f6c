"""Conditional rendering (COOL RLHF): one reward model, a system prompt per condition.

`render_for_reward` is the single place a (condition, conversation, response) becomes reward-model
tokens. RM training and scoring at RLHF time both call it, so the two can never drift apart.
The condition prompt goes to the reward model only; the policy never sees it. A prompt's images (`<image>` markers in
its text) become the reward model's image tokens the way MPO's prompts do (`data_builders/image_tokens.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from data_builders.errors import UserKeyError
from data_builders.render import through_end_of_turn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from data_builders.image_tokens import ImageText
    from data_builders.images import ImageRef

DEFAULT_CONDITIONS = {
    "math": "You are a careful math grader. Prefer responses whose final answer is correct.",
    "concise": "You are a strict editor. Among correct answers, prefer the shortest one.",
    "harmless": "You are a safety reviewer. Prefer refusals of unsafe requests and helpful answers to safe ones.",
    "helpful": "You are a helpful assistant. Prefer responses that answer the question well.",
}


class UnknownConditionError(UserKeyError):
    """A condition no configured prompt knows (a KeyError too, for callers that catch one)."""


def condition_messages(conditions: dict[str, str], condition: str | None, messages: list[dict]) -> list[dict]:
    """Prefix the condition's system prompt (merged into an existing system message, if any)."""
    if condition is None:
        return list(messages)
    if condition not in conditions:
        raise UnknownConditionError(f"unknown condition {condition!r}; configured: {sorted(conditions)}")
    prompt = conditions[condition]
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{prompt}\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def render_for_reward(
    tokenizer: PreTrainedTokenizerBase,
    conditions: dict[str, str],
    condition: str | None,
    prompt: list[dict],
    response: str,
    reward_token_id: int | None = None,
) -> list[int]:
    """Token ids of [condition system prompt] + prompt + response, ending at the end-of-turn token (+ reward token).

    The score is read at the end-of-turn token, not at the newline a ChatML template adds after it (TRL's
    RewardTrainer reads it there): a deliberate choice, explained in `data_builders/render.py`.
    """
    return reward_tokens(tokenizer, conditions, condition, prompt, response, reward_token_id)[0]


def reward_tokens(
    tokenizer: PreTrainedTokenizerBase,
    conditions: dict[str, str],
    condition: str | None,
    prompt: list[dict],
    response: str,
    reward_token_id: int | None = None,
    images: ImageText | None = None,
    refs: Sequence[ImageRef] = (),
    origin: str = "",
    row: int = 0,
) -> tuple[list[int], list[tuple[int, int]]]:
    """`render_for_reward`'s ids, and the [start, end) of each image's context tokens.

    With `images`, each `<image>` marker of the prompt becomes the tokens of its checked image in `refs` (a mismatch is
    a `BadRowError` naming `origin` and `row`); the response is text, as in MPO's pairs.
    """
    messages = condition_messages(conditions, condition, prompt)
    if images is not None:
        messages = images.substitute(messages)
    text = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
    ids = through_end_of_turn(tokenizer, list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    spans: list[tuple[int, int]] = []
    if images is not None:
        ids, _, spans = images.expand(ids, [0] * len(ids), refs, origin, row)
    if reward_token_id is not None:
        ids.append(reward_token_id)
    return ids, spans
