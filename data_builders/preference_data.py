"""Preference rows → tokenised pairs for MPO / DPO: the prompt rendered once, the response tokens marked.

Rows are `{"prompt": messages | str, "chosen": str | messages, "rejected": ..., "condition"?}` (TRL's
implicit-prompt form also works: `chosen`/`rejected` as whole conversations sharing all but the last
message). The policy never sees a condition's reward prompt; `condition` is kept for per-condition metrics.

Each side is rendered with the chat template as prompt + assistant reply. The response tokens (the
log-prob targets) are those after the prompt's generation header, end-of-turn token included. A pair
whose chosen equals its rejected, whose response is empty, or whose prompt alone does not fit
`max_length` follows the bad-row policy; a response that does not fit is cut (`truncation: right`),
dropped to quarantine (`drop`), or an error (`error`). Given the recipe's known `conditions`, a row naming
another condition is a bad row too (field `condition`), as it is for the reward model.

Images go in the prompt only: content parts (`{"type": "image", "image": ...}`) or `<image>` markers with a row-level
`images` list, as for SFT rows. With an `ImageText` the images are checked and expanded into the shared prompt, so
both sides hold the same image tokens at the same positions (`PreferencePair.image_spans`), and the pair's image is
one image, not two. Without one, a row with images is a bad row.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from data_builders.bad_rows import BadRowError, BadRowPolicy, no_usable_rows
from data_builders.conversations import merge_images, row_images, text_messages
from data_builders.image_tokens import ImageText, check_fits
from data_builders.readers import read_rows
from data_builders.render import render_conversation, render_prompt, through_end_of_turn
from data_builders.synthetic import make_task

if TYPE_CHECKING:
    from align.config import DataConfig, SourceConfig
    from data_builders.images import ImageRef


@dataclass
class PreferencePair:
    chosen: list[int]  # prompt + chosen response
    rejected: list[int]  # prompt + rejected response
    prompt_length: int  # tokens before the first response token (the same for both sides)
    condition: str | None = None
    origin: str = ""
    images: list[ImageRef] = dataclass_field(default_factory=list)  # the prompt's images, in span order
    image_spans: list[tuple[int, int]] = dataclass_field(default_factory=list)  # their context spans, inside the shared prompt

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def chosen_tokens(self) -> int:
        return len(self.chosen) - self.prompt_length

    @property
    def rejected_tokens(self) -> int:
        return len(self.rejected) - self.prompt_length


def _messages(value: Any, origin: str, row: int, field: str, images: list | None = None) -> list[dict]:
    """Messages with text content; image parts become `<image>` markers, their values appended to `images`."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and isinstance(m.get("content"), (str, list)) for m in value):
        out, found = text_messages(value, origin, row, field)
        if images is not None:
            images.extend(found)
        return out
    raise BadRowError(origin, row, field, "expected a string or a list of {role, content} messages")


def _response(value: Any, origin: str, row: int, field: str) -> str:
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        value = value[-1].get("content")
    if not isinstance(value, str) or not value.strip():
        raise BadRowError(origin, row, field, "expected a non-empty response")
    return value


def parse_preference(raw: Any, origin: str, row: int) -> tuple[list[dict], str, str, str | None]:
    """(prompt messages, chosen text, rejected text, condition) of one text row, or a BadRowError naming the field
    (a row with images too: a text path would train on the literal markers; `parse_preference_images` keeps them)."""
    prompt, chosen, rejected, condition, images = parse_preference_images(raw, origin, row)
    if images:
        raise BadRowError(origin, row, "images", f"the row has {len(images)} image(s) but this path takes text rows only")
    return prompt, chosen, rejected, condition


def parse_preference_images(raw: Any, origin: str, row: int) -> tuple[list[dict], str, str, str | None, list]:
    """`parse_preference` plus the prompt's image values (content parts, or the row's `images` list), unopened."""
    if not isinstance(raw, dict):
        raise BadRowError(origin, row, "<row>", "expected a JSON object")
    for key in ("chosen", "rejected"):
        if key not in raw:
            raise BadRowError(origin, row, key, "missing")
    part_images: list = []
    if "prompt" in raw:
        prompt = _messages(raw["prompt"], origin, row, "prompt", part_images)
    else:
        chosen_conv = _messages(raw["chosen"], origin, row, "chosen", part_images)
        if chosen_conv[:-1] != _messages(raw["rejected"], origin, row, "rejected")[:-1]:
            raise BadRowError(origin, row, "rejected", "without 'prompt', chosen and rejected must share all but the last message")
        prompt = chosen_conv[:-1]
    if not prompt or prompt[-1]["role"] == "assistant":
        raise BadRowError(origin, row, "prompt", "must end with a user (or system) message")
    chosen, rejected = _response(raw["chosen"], origin, row, "chosen"), _response(raw["rejected"], origin, row, "rejected")
    if chosen == rejected:
        raise BadRowError(origin, row, "rejected", "identical to chosen")
    return prompt, chosen, rejected, raw.get("condition"), merge_images(part_images, row_images(raw, origin, row), origin, row)


def tokenize_preference(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict], chosen: str, rejected: str, max_length: int, truncation: str,
    origin: str = "", row: int = 0, condition: str | None = None, images: ImageText | None = None, refs: Sequence[ImageRef] = (),
) -> PreferencePair:  # fmt: skip
    """Render both sides; check the prompt renders identically inside each; cut or reject what does not fit.

    With `images` and the prompt's checked `refs`, each marker in the prompt becomes its image's tokens (loss-free).
    """
    spans: list[tuple[int, int]] = []
    if images is not None:
        prompt = images.substitute(prompt)
        raw_prompt = render_prompt(tokenizer, prompt)
        prompt_ids, _, spans = images.expand(raw_prompt, [0] * len(raw_prompt), refs, origin, row)
        if len(prompt_ids) >= max_length and refs:
            check_fits(images, spans, refs, max_length - 1, origin, row)
    else:
        prompt_ids = render_prompt(tokenizer, prompt)
    if len(prompt_ids) >= max_length:
        raise BadRowError(origin, row, "prompt", f"the prompt alone has {len(prompt_ids)} tokens, max_length is {max_length}")
    sides = []
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        ids = render_conversation(tokenizer, [*prompt, {"role": "assistant", "content": text}]).input_ids
        ids = through_end_of_turn(tokenizer, ids)  # targets stop at the end-of-turn token (data_builders/render.py)
        if images is not None:
            ids = images.expand(ids, [0] * len(ids), refs, origin, row)[0]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise BadRowError(origin, row, field, "the chat template tokenises the prompt differently once a reply follows")
        if len(ids) > max_length:
            if truncation != "right":
                raise BadRowError(origin, row, field, f"{len(ids)} tokens exceed max_length {max_length}")
            ids = ids[:max_length]
        sides.append(ids)
    if sides[0] == sides[1]:
        raise BadRowError(origin, row, "rejected", f"identical to chosen within max_length {max_length}")
    return PreferencePair(sides[0], sides[1], len(prompt_ids), condition, f"{origin}:{row}", list(refs), spans)


def preference_rows(source: SourceConfig, data: DataConfig, policy: BadRowPolicy, split: str):
    if source.path == "synthetic":
        syn = data.synthetic
        task = make_task(syn)
        n = source.max_rows or (syn.train_rows if split == "train" else syn.eval_rows)
        for i, row in enumerate(task.preference_pairs(n, split="train" if split == "train" else "heldout"), start=1):
            yield f"synthetic-pairs[{split}]", i, row
    else:
        yield from read_rows(source.path, source.split, source.max_rows, policy)


def check_condition(condition: Any, conditions: Collection[str] | None, origin: str, row: int) -> None:
    """A row's `condition` is absent, or a string among the known `conditions` (None: any string)."""
    if condition is None:
        return
    if not isinstance(condition, str):
        raise BadRowError(origin, row, "condition", f"expected a string, got {type(condition).__name__}")
    if conditions is not None and condition not in conditions:
        raise BadRowError(origin, row, "condition", f"unknown condition {condition!r}; configured: {sorted(conditions)}")


def build_preference_pairs(
    sources: list[SourceConfig], data: DataConfig, tokenizer: PreTrainedTokenizerBase, policy: BadRowPolicy, split: str = "train",
    extra_rows: Iterable[tuple[str, int, Any]] = (), conditions: Collection[str] | None = None, images: ImageText | None = None,
) -> list[PreferencePair]:  # fmt: skip
    """Tokenised pairs from the sources plus `extra_rows` ((origin, row, raw) triples, e.g. pairs built from samples).

    With `conditions`, a source row whose condition is not among them is a bad row (extra rows carry the conditions of the
    prompts they were sampled from, and are not checked). `images` makes rows with prompt images usable.
    """
    pairs, skipped_before = [], policy.count
    streams = [(preference_rows(source, data, policy, split), conditions) for source in sources] + [(extra_rows, None)]
    for source_rows, known in streams:
        for origin, row, raw in source_rows:
            try:
                prompt, chosen, rejected, condition, values = parse_preference_images(raw, origin, row)
                check_condition(condition, known, origin, row)
                if images is None and values:
                    raise BadRowError(origin, row, "images", f"the row has {len(values)} image(s) but the model takes no images "
                                      "(data.images is not set for a vision-language model)")  # fmt: skip
                refs = images.resolve(values, prompt, origin, row) if images is not None else []
                pairs.append(tokenize_preference(tokenizer, prompt, chosen, rejected, data.max_length, data.truncation, origin, row,
                                                 condition, images, refs))  # fmt: skip
            except BadRowError as err:
                policy.handle(err, raw)
    if not pairs:
        raise no_usable_rows("preference pairs", split, policy, policy.count - skipped_before)
    return pairs
