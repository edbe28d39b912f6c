"""Builds tokenised SFT samples from the configured sources, applying truncation and bad-row policy.

With `images` (an `ImageText`: the model's image handler and image token ids) a row's images are checked and
opened, each `<image>` marker is expanded to the image's tokens (`data_builders/image_tokens.py`), and truncation
never cuts an image: a row whose images do not fit `max_length` is a bad row naming the image. Without it, a row
that carries images is a bad row (a text model would otherwise train on the literal `<image>` text).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from data_builders.bad_rows import BadRowError, BadRowPolicy, no_usable_rows
from data_builders.conversations import normalize
from data_builders.errors import UserError
from data_builders.image_tokens import ImageText, check_fits
from data_builders.readers import read_rows
from data_builders.render import render_conversation
from data_builders.samples import Sample
from data_builders.synthetic import make_task

if TYPE_CHECKING:
    from align.config import DataConfig, SourceConfig


@dataclass
class DataStats:
    """Rows of one split: `kept` + `skipped` = `rows`; `truncated` counts kept rows only (a skipped row is never truncated)."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: int = 0  # every row of this split the bad-row policy quarantined, unreadable lines included

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def source_rows(source: SourceConfig, data: DataConfig, policy: BadRowPolicy, split: str):
    """(origin, row, raw) triples for one source; `synthetic` is generated from the recipe's seed."""
    if source.path == "synthetic":
        syn = data.synthetic
        task = make_task(syn)
        n = syn.train_rows if split == "train" else syn.eval_rows
        rows = task.sft_conversations(source.max_rows or n, split="train" if split == "train" else "heldout")
        for i, row in enumerate(rows, start=1):
            yield f"synthetic[{split}]", i, row
    else:
        yield from read_rows(source.path, source.split, source.max_rows, policy)


def build_samples(
    sources: list[SourceConfig], data: DataConfig, tokenizer: PreTrainedTokenizerBase, policy: BadRowPolicy, split: str = "train",
    extra_rows: Iterable[tuple[str, int, Any]] = (), images: ImageText | None = None,
) -> tuple[list[Sample], DataStats]:  # fmt: skip
    """Tokenise every row; too-long rows follow `data.truncation`, bad rows follow the policy.

    `extra_rows` ((origin, row, raw) triples in `messages` form, e.g. rejection-sampled rows) join the sources' rows.
    `images` makes image rows usable (see the module docstring).
    """
    samples, stats, skipped_before = [], DataStats(), policy.count
    streams = [(source.format, source_rows(source, data, policy, split)) for source in sources] + [("messages", extra_rows)]
    for fmt, rows in streams:
        for origin, index, raw in rows:
            truncated = False
            try:
                conv = normalize(raw, origin, index, fmt, data.system_prompt)
                refs, spans = [], []
                if images is None:
                    if conv.images:
                        raise BadRowError(origin, index, "images", f"the row has {len(conv.images)} image(s) but the model takes no "
                                          "images (data.images is not set for a vision-language model)")  # fmt: skip
                    rendered = render_conversation(tokenizer, conv.messages)
                    ids, mask = rendered.input_ids, rendered.loss_mask
                else:
                    refs = images.resolve(conv.images, conv.messages, origin, index)
                    rendered = render_conversation(tokenizer, images.substitute(conv.messages))
                    ids, mask, spans = images.expand(rendered.input_ids, rendered.loss_mask, refs, origin, index)
                if len(ids) > data.max_length:
                    if refs:
                        check_fits(images, spans, refs, data.max_length, origin, index)
                    if data.truncation == "error":
                        raise BadRowError(origin, index, "messages", f"{len(ids)} tokens exceed max_length {data.max_length}")
                    if data.truncation == "drop":
                        raise BadRowError(origin, index, "messages", f"dropped: {len(ids)} tokens exceed max_length {data.max_length}")
                    ids, mask, truncated = ids[: data.max_length], mask[: data.max_length], True
                if sum(mask[1:]) == 0:
                    raise BadRowError(origin, index, "messages", f"no assistant tokens within max_length {data.max_length}")
            except BadRowError as err:
                policy.handle(err, raw)
                continue
            samples.append(Sample(ids, mask, f"{origin}:{index}", conv.condition, image_spans=spans, images=refs))
            stats.kept += 1
            stats.truncated += truncated
    stats.skipped = policy.count - skipped_before
    stats.rows = stats.kept + stats.skipped
    if not samples:
        raise no_usable_rows("rows", split, policy, stats.skipped)
    if stats.truncated / stats.kept > data.max_truncated_share:
        policy.write()
        raise UserError(
            f"{stats.truncated} of {stats.kept} {split} rows ({stats.truncated / stats.kept:.1%}) were truncated to "
            f"max_length {data.max_length}, over data.max_truncated_share={data.max_truncated_share}; "
            "raise max_length or the cap, or set data.truncation=drop"
            + (f" ({stats.skipped} bad rows skipped, not counted; quarantined in {policy.where()})" if stats.skipped else "")
        )
    return samples, stats
