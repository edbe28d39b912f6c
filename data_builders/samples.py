"""Sample and batch types shared by every trainer.

A `Sample` is one tokenised document; a `TokenBatch` is what a model forward consumes. Both
carry optional `pixel_values` and image-token spans so vision-language data fits later
without new types.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from data_builders.images import ImageRef


@dataclass
class Sample:
    input_ids: list[int]
    loss_mask: list[int]
    origin: str = ""
    condition: str | None = None
    pixel_values: torch.Tensor | None = None  # (tiles, 3, H, W) for vision-language models, when held in memory
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each image's context tokens
    images: list[ImageRef] = field(default_factory=list)  # checked images, in span order; pixels made at collate time

    def pixels(self) -> torch.Tensor | None:
        """(tiles, 3, H, W) of every image of the document in order: held `pixel_values`, else made from `images`."""
        if self.pixel_values is not None:
            return self.pixel_values
        if not self.images:
            return None
        return torch.cat([ref.pixels() for ref in self.images])

    @property
    def tiles(self) -> list[int]:
        """Tiles per image, in span order."""
        return [ref.tiles for ref in self.images]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        """Tokens this sample is trained on (a masked token's prediction comes from its predecessor)."""
        return sum(self.loss_mask[1:])


@dataclass
class TokenBatch:
    """Rows of one or more packed documents; padding is a document of its own with no targets.

    input_ids, position_ids (restarting at 0 per document), targets (next token or -100) and
    weights (per-target loss weight) are (rows, length). `doc_ids` numbers documents within the
    batch, -1 on padding.

    With images: `pixel_values` (all tiles, 3, H, W) holds every image of the batch in the order its context
    tokens appear (row by row, document by document), which is the order transformers' VLMs scatter vision
    embeddings into the `<IMG_CONTEXT>` positions; `image_spans[r]` are row r's [start, end) context spans and
    `image_tiles` the tiles of each image, both in that order. All three are None for a batch without images.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    doc_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_spans: list[list[tuple[int, int]]] | None = None
    image_tiles: list[int] | None = None

    def to(self, device: torch.device | str) -> TokenBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return TokenBatch(**moved)

    @property
    def num_tokens(self) -> int:
        return int((self.doc_ids >= 0).sum())

    def lengths(self) -> torch.Tensor:
        """(rows,) real tokens per row; padding is always trailing."""
        return (self.doc_ids >= 0).sum(-1)
