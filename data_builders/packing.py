"""Packs documents into rows and collates rows into `TokenBatch`es with no cross-document attention.

Rows are filled best-fit-decreasing. Within a row each document's `position_ids` restart at 0;
transformers turns restarting positions into a block-diagonal causal mask (sdpa/eager/flex)
or varlen attention (flash-attention 2), so a document never sees its neighbours. Targets are
computed per document, so the last token of one document never predicts the next one.

Images travel with their documents: a document is packed whole, so its image spans stay inside it, and a
batch's `pixel_values` are the tiles of every image in the order the images' tokens appear (row by row,
document by document), with the spans moved to row coordinates (`TokenBatch`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Literal

import torch

from data_builders.samples import Sample, TokenBatch

Reduction = Literal["token", "sample", "sqrt"]


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group indices into bins of at most `capacity` tokens (best-fit decreasing, O(n log n))."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"document {i} has {n} tokens, more than the row capacity {capacity}")
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            remaining, b = free.pop(pos)
            bins[b].append(i)
            bisect.insort(free, (remaining - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


def token_weight(num_targets: int, reduction: Reduction) -> float:
    """Per-token weight: token mean 1, sample mean 1/l, InternVL3 square-root 1/sqrt(l)."""
    if num_targets == 0:
        return 0.0
    if reduction == "token":
        return 1.0
    if reduction == "sample":
        return 1.0 / num_targets
    if reduction == "sqrt":
        return 1.0 / math.sqrt(num_targets)
    raise ValueError(f"unknown loss reduction {reduction!r}")


def collate_rows(rows: Sequence[Sequence[Sample]], pad_id: int, reduction: Reduction = "token", multiple_of: int = 8) -> TokenBatch:
    """Turn rows (each a list of documents) into padded tensors, right-padded to a multiple of 8."""
    longest = max(sum(len(s) for s in row) for row in rows)
    length = -(-longest // multiple_of) * multiple_of
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long, device="cpu")
    position_ids = torch.zeros(shape, dtype=torch.long, device="cpu")
    targets = torch.full(shape, -100, dtype=torch.long, device="cpu")
    weights = torch.zeros(shape, dtype=torch.float32, device="cpu")
    doc_ids = torch.full(shape, -1, dtype=torch.long, device="cpu")
    doc = 0
    pixels: list[torch.Tensor] = []
    spans: list[list[tuple[int, int]]] = []
    tiles: list[int] = []
    for r, row in enumerate(rows):
        offset = 0
        spans.append([])
        for sample in row:
            n = len(sample)
            ids = torch.tensor(sample.input_ids, dtype=torch.long, device="cpu")
            mask = torch.tensor(sample.loss_mask, dtype=torch.bool, device="cpu")
            input_ids[r, offset : offset + n] = ids
            position_ids[r, offset : offset + n] = torch.arange(n, device="cpu")
            doc_ids[r, offset : offset + n] = doc
            shifted = torch.where(mask[1:], ids[1:], torch.full_like(ids[1:], -100))
            targets[r, offset : offset + n - 1] = shifted
            weights[r, offset : offset + n - 1] = mask[1:].float() * token_weight(int(mask[1:].sum()), reduction)
            if sample.image_spans:
                values = sample.pixels()
                if values is None:
                    raise ValueError(f"document {sample.origin} has image spans but no images or pixel values")
                pixels.append(values)
                spans[r].extend((offset + a, offset + b) for a, b in sample.image_spans)
                if sample.images:
                    tiles.extend(sample.tiles)
                elif len(sample.image_spans) == 1:
                    tiles.append(values.shape[0])
                else:
                    raise ValueError(f"document {sample.origin} holds pixel values of several images but no ImageRefs (tiles per image)")
            offset += n
            doc += 1
        if offset < length:
            # Padding continues the last document's positions: causally invisible to it, and a row
            # holding one document keeps the plain causal mask (sdpa's is_causal fast path).
            start = int(position_ids[r, offset - 1]) + 1 if offset else 0
            position_ids[r, offset:] = torch.arange(start, start + length - offset, device="cpu")
    if not pixels:
        return TokenBatch(input_ids, position_ids, targets, weights, doc_ids)
    return TokenBatch(input_ids, position_ids, targets, weights, doc_ids, torch.cat(pixels), spans, tiles)


def build_rows(samples: Sequence[Sample], max_length: int, packing: bool) -> list[list[int]]:
    """Sample indices per row: packed best-fit, or one document per row."""
    if packing:
        return pack_best_fit([len(s) for s in samples], max_length)
    return [[i] for i in range(len(samples))]
