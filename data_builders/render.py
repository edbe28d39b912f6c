"""Renders conversations with the tokenizer's own chat template and marks assistant tokens.

Assistant spans are found by rendering incrementally and diffing: the text of messages[:i]
with a generation prompt is where turn i starts, the text of messages[:i+1] is where it ends.
That works for any template, with or without `{% generation %}` markers, as long as earlier
turns render the same way when later turns are added (checked; an error says so if not).
Token labels come from the fast tokenizer's character offsets, so BPE merges across a span
edge cannot shift a label.

Where a turn ends, a deliberate choice: ChatML-style templates (the built-in one, Qwen's) emit `<|im_end|>\n`
after an assistant turn. The newline is the template's layout, not something the policy says: generation stops
at the end-of-turn token. So a response ends at its end-of-turn token everywhere in align (`through_end_of_turn`):
SFT trains on it but not on the newline (as transformers' `{% generation %}` assistant mask does), the reward
model scores at it (`rewards.conditions.render_for_reward`: training, RLHF and best-of-N alike), and MPO's
targets stop at it (`data_builders.preference_data`). TRL 1.16 tokenises the whole template instead: its
RewardTrainer scores at the newline and its DPO completion includes the newline's log-prob. For templates that
emit nothing after the end-of-turn token (Llama 3's `<|eot_id|>`) the two agree exactly (`tests/test_render.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: rendering needs no transformers import of its own
    from transformers import PreTrainedTokenizerBase

from data_builders.errors import UserError, UserTypeError


class TemplateError(UserError):
    """The chat template re-renders earlier turns differently; spans cannot be diffed."""


@dataclass
class Rendered:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on assistant tokens (content and end-of-turn), 0 elsewhere


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the [start, end) character span of every assistant turn."""
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (text.startswith(before) and text.startswith(through)) or len(through) < len(before):
            raise TemplateError(
                f"chat template renders turn {i} differently once later turns follow; "
                "assistant spans cannot be found by diffing (use a template with stable prefixes)"
            )
        end = len(through.rstrip())  # the newline after an end-of-turn token is not a target
        spans.append((len(before), end))
    return text, spans


def render_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> Rendered:
    """Token ids and the assistant-only loss mask of one conversation."""
    if not tokenizer.is_fast:
        raise UserTypeError(f"align needs a fast tokenizer (character offsets) to place assistant labels; {tokenizer.name_or_path!r} is a slow one: "
                            "point model.tokenizer at one with a tokenizer.json")
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = []
    j = 0
    for start, end in enc["offset_mapping"]:
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        inside = j < len(spans) and start < spans[j][1] and end > spans[j][0]
        mask.append(int(inside))
    return Rendered(list(enc["input_ids"]), mask)


def through_end_of_turn(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    """`ids` without the whitespace-only tokens a template emits after the final end-of-turn token (see the module docstring)."""
    end = len(ids)
    while end > 0 and not tokenizer.decode(ids[end - 1 :]).strip():
        end -= 1
    return ids[:end]


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of a prompt ending in the assistant generation header."""
    text = _render(tokenizer, messages, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
