"""Sample and batch types shared by every trainer.

A `Sample` is one tokenised document; a `TokenBatch` is what a model forward consumes. Both
carry optional `pixel_values` and image-token spans so vision-language data fits later
without new types.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Sample:
    input_ids: list[int]
    loss_mask: list[int]
    origin: str = ""
    condition: str | None = None
    pixel_values: torch.Tensor | None = None  # (tiles, 3, H, W) for vision-language models
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of image tokens

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
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    doc_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_spans: list[list[tuple[int, int]]] | None = None

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
