"""Where an image sits in the tokens: each `<image>` marker becomes `<img>` + `<IMG_CONTEXT>` × n + `</img>`.

InternVL's n is tokens_per_tile × tiles (`data_builders/images.py`); another model's handler gives its own count. The
three image tokens are special tokens (`add_image_tokens` adds them the way transformers does, so a tokenizer that
lacks them, like the built-in one, never splits them). Rendering runs on the conversation with one context token per
image (the chat template and the assistant-span diff see a short text) and the context token is then repeated n times
in token space, so the text never holds thousands of placeholder tokens. The loss mask is 0 on every image token,
wherever the image sits. `image_spans` are the [start, end) of each image's context tokens: exactly the positions a
model fills with its vision embeddings, in image order; `image_blocks` adds the start/end tokens (what truncation must
never cut).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from data_builders.bad_rows import BadRowError
from data_builders.conversations import IMAGE_MARKER
from data_builders.images import ImageConfig, ImageHandler, ImageRef, InternVLImages, resolve_image

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ImageTokenIds:
    context: int
    start: int | None = None
    end: int | None = None

    @property
    def all(self) -> frozenset[int]:
        return frozenset(t for t in (self.start, self.context, self.end) if t is not None)


def add_image_tokens(tokenizer: PreTrainedTokenizerBase, config: ImageConfig) -> ImageTokenIds:
    """The ids of the image tokens, adding the ones the tokenizer lacks as special tokens (the model's embeddings must
    then be resized to `len(tokenizer)`)."""
    names = [t for t in (config.start_token, config.context_token, config.end_token) if t]
    vocab = tokenizer.get_vocab()
    missing = [t for t in names if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in names}
    for t in names:  # an existing token must encode as itself alone, or expansion would miscount
        if tokenizer(t, add_special_tokens=False)["input_ids"] != [ids[t]]:
            tokenizer.add_special_tokens({"extra_special_tokens": [t]}, replace_extra_special_tokens=False)
    return ImageTokenIds(ids[config.context_token], ids.get(config.start_token or ""), ids.get(config.end_token or ""))


@dataclass
class ImageText:
    """Everything the image path needs at render time: the handler (tiles, counts, pixels), config and token ids."""

    handler: ImageHandler
    config: ImageConfig
    ids: ImageTokenIds

    @classmethod
    def internvl(cls, tokenizer: PreTrainedTokenizerBase, config: ImageConfig | None = None) -> ImageText:
        config = (config or ImageConfig()).check()
        return cls(InternVLImages(config), config, add_image_tokens(tokenizer, config))

    @property
    def placeholder(self) -> str:
        """The text one marker becomes before rendering (one context token; repeated after tokenising)."""
        c = self.config
        return f"{c.start_token or ''}{c.context_token}{c.end_token or ''}"

    def count_markers(self, messages: Sequence[dict]) -> int:
        return sum(m["content"].count(IMAGE_MARKER) for m in messages if isinstance(m.get("content"), str))

    def substitute(self, messages: Sequence[dict]) -> list[dict]:
        """Messages with every marker replaced by the placeholder."""
        return [{**m, "content": m["content"].replace(IMAGE_MARKER, self.placeholder)} for m in messages]

    def resolve(self, values: Sequence, messages: Sequence[dict], origin: str, row: int, field_name: str = "images") -> list[ImageRef]:
        """Check the marker count against the images, then check and open each image (bad ones name file, row and image)."""
        markers = self.count_markers(messages)
        if markers != len(values):
            raise BadRowError(origin, row, field_name, f"{markers} {IMAGE_MARKER} marker{'s' * (markers != 1)} in the "
                              f"conversation but {len(values)} image{'s' * (len(values) != 1)}; they must be equal")  # fmt: skip
        return [resolve_image(v, self.handler, origin, row, k, field_name=field_name) for k, v in enumerate(values)]

    def expand(self, ids: Sequence[int], mask: Sequence[int], images: Sequence[ImageRef], origin: str = "", row: int = 0
               ) -> tuple[list[int], list[int], list[tuple[int, int]]]:  # fmt: skip
        """Repeat each context token to its image's count; 0 loss on image tokens; the context spans."""
        ctx, image_ids = self.ids.context, self.ids.all
        found = sum(1 for t in ids if t == ctx)
        if found != len(images):  # the text held the context token itself, or the template moved a marker
            raise BadRowError(origin, row, "images", f"{found} {self.config.context_token} tokens after rendering but "
                              f"{len(images)} images (does the text contain image tokens of its own?)")  # fmt: skip
        out_ids, out_mask, spans, k = [], [], [], 0
        for t, m in zip(ids, mask, strict=True):
            if t == ctx:
                n = images[k].tokens
                spans.append((len(out_ids), len(out_ids) + n))
                out_ids.extend([ctx] * n)
                out_mask.extend([0] * n)
                k += 1
            else:
                out_ids.append(t)
                out_mask.append(0 if t in image_ids else m)
        return out_ids, out_mask, spans

    def blocks(self, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """Each image's whole [start, end) including its start and end tokens."""
        return [(s - (self.ids.start is not None), e + (self.ids.end is not None)) for s, e in spans]


def check_fits(image_text: ImageText, spans: Sequence[tuple[int, int]], images: Sequence[ImageRef], limit: int,
               origin: str, row: int, field_name: str = "images") -> None:  # fmt: skip
    """A cut at `limit` tokens must keep every image whole: an image it would cut or drop is a bad row naming it."""
    for k, ((start, end), ref) in enumerate(zip(image_text.blocks(spans), images, strict=True)):
        if end > limit:
            raise BadRowError(origin, row, f"{field_name}[{k}]", f"image {k + 1} {ref.label} ({ref.tiles} tiles, {ref.tokens} "
                              f"tokens) occupies tokens {start}..{end} but max_length is {limit}: it cannot be cut; raise "
                              "max_length or lower data.images.max_tiles")  # fmt: skip
