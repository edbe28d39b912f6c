"""Preference pairs as shared-prefix rows: one forward computes the prompt once for both responses.

A pair becomes one unit `[prefix | chosen suffix | rejected suffix]`, where the prefix is the
longest common token prefix of the two rendered sequences (at least one token of each side stays
its own). Rejected positions continue from the prefix (so they equal a separate forward's
positions), and a 4-D mask lets each suffix attend to the prefix and to itself but never to the
other suffix. Units are packed best-fit into rows and never attend to each other.

Peers (TRL, OpenRLHF) run chosen and rejected as two full sequences, so the shared prompt, and in
the synthetic math pairs the whole worked solution up to the final answer, is computed twice.

Without sharing (`share_prefix=False`, needed by flash-attention, which takes no 4-D mask) the same
layout has an empty prefix and no mask: chosen and rejected are two packed documents whose
positions restart at 0, which transformers turns into varlen / block-diagonal attention.

A pair's prompt images (`PreferencePair.images` / `image_spans`) sit in the shared prefix, so with sharing the
vision tower sees each image once per pair (InternVL's own MPO trainer repeats the pixels for both sides); without
sharing each side is its own document and holds its own copy. `PairRows.pixel_values` follows the order of the
image tokens in the rows, as `TokenBatch.pixel_values` does.

The mask built here is the pair structure only; `data_builders/attention_layout.py` adds each layer type's own
pattern (sliding windows, ...) and the form the attention takes when the rows reach the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from data_builders.attention_layout import shared_prefix_unsupported
from data_builders.errors import UserError
from data_builders.packing import pack_best_fit

PREFIX, CHOSEN, REJECTED = 0, 1, 2


def shared_prefix_length(chosen: Sequence[int], rejected: Sequence[int]) -> int:
    """Longest common prefix, capped so each side keeps at least one token of its own (its scored last token)."""
    cap = min(len(chosen), len(rejected)) - 1
    n = 0
    while n < cap and chosen[n] == rejected[n]:
        n += 1
    return n


def unit_length(chosen: Sequence[int], rejected: Sequence[int], share_prefix: bool) -> int:
    """Tokens a pair occupies in a row."""
    return len(chosen) + len(rejected) - (shared_prefix_length(chosen, rejected) if share_prefix else 0)


@dataclass(frozen=True)
class PairSpan:
    """Where one pair sits: row, first index, and the lengths of its prefix and two suffixes."""

    row: int
    start: int
    prefix: int
    chosen: int
    rejected: int

    def chosen_index(self) -> list[int]:
        """Row indices of the whole chosen sequence, in order."""
        return list(range(self.start, self.start + self.prefix + self.chosen))

    def rejected_index(self) -> list[int]:
        """Row indices of the whole rejected sequence, in order (prefix, then its own suffix)."""
        own = self.start + self.prefix + self.chosen
        return list(range(self.start, self.start + self.prefix)) + list(range(own, own + self.rejected))


@dataclass
class PairRows:
    """Padded rows of pair units. `attention_mask` is (rows, 1, L, L) bool (True = may attend) or None."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    spans: list[PairSpan]
    num_tokens: int  # non-padding positions fed to the model
    sequence_tokens: int  # tokens of chosen + rejected as separate sequences (what a peer feeds)
    pixel_values: torch.Tensor | None = None  # (tiles, 3, H, W) of every image, in the order of its tokens in the rows
    image_spans: list[list[tuple[int, int]]] | None = None  # per row, [start, end) of each image's context tokens
    image_tiles: list[int] | None = None  # tiles per image, same order

    def ends(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(2·pairs, 2) of (row, index of the last token): chosen at even, rejected at odd entries; made on `device`."""
        out = []
        for s in self.spans:
            out += [(s.row, s.start + s.prefix + s.chosen - 1), (s.row, s.start + s.prefix + s.chosen + s.rejected - 1)]
        return torch.tensor(out, dtype=torch.long, device=device)

    def lengths(self) -> torch.Tensor:
        """(rows,) real tokens per row, on the rows' device; padding is trailing."""
        out = [0] * self.input_ids.shape[0]
        for s in self.spans:
            out[s.row] = max(out[s.row], s.start + s.prefix + s.chosen + s.rejected)
        return torch.tensor(out, dtype=torch.long, device=self.input_ids.device)

    def to(self, device: torch.device | str) -> PairRows:
        mask = self.attention_mask.to(device) if self.attention_mask is not None else None
        pixels = self.pixel_values.to(device) if self.pixel_values is not None else None
        return PairRows(self.input_ids.to(device), self.position_ids.to(device), mask, self.spans, self.num_tokens, self.sequence_tokens,
                        pixels, self.image_spans, self.image_tiles)  # fmt: skip


def pack_pair_units(lengths: Sequence[int], capacity: int, packing: bool = True) -> list[list[int]]:
    """Unit indices per row, best fit. A unit longer than `capacity` gets a row of its own rather than being dropped."""
    if not packing:
        return [[i] for i in range(len(lengths))]
    return pack_best_fit([min(n, capacity) for n in lengths], capacity)


def pack_pairs(pairs: Sequence[object], capacity: int, packing: bool, share_prefix: bool) -> tuple[list[list[int]], float]:
    """Rows of pair indices (objects with `.chosen`/`.rejected` ids), and the share of tokens sharing saves."""
    lengths = [unit_length(p.chosen, p.rejected, share_prefix) for p in pairs]
    full = sum(len(p.chosen) + len(p.rejected) for p in pairs)
    return pack_pair_units(lengths, capacity, packing), round(1 - sum(lengths) / max(1, full), 4)


def collate_pair_rows(rows: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]], pad_id: int, share_prefix: bool = True,
                      multiple_of: int = 8, images: Sequence[Sequence[object]] | None = None) -> PairRows:
    """Rows of (chosen ids, rejected ids) → tensors, right-padded to a multiple of `multiple_of`.

    `images`, shaped like `rows`, gives each pair's image holder (a `PreferencePair`: `.images`, `.image_spans` in
    prompt coordinates); the rows then carry the pixel values and spans (see the module docstring).
    """
    spans: list[PairSpan] = []
    for r, row in enumerate(rows):
        offset = 0
        for chosen, rejected in row:
            p = shared_prefix_length(chosen, rejected) if share_prefix else 0
            spans.append(PairSpan(r, offset, p, len(chosen) - p, len(rejected) - p))
            offset += len(chosen) + len(rejected) - p
    lengths = [0] * len(rows)
    for s in spans:
        lengths[s.row] = s.start + s.prefix + s.chosen + s.rejected
    length = -(-max(lengths) // multiple_of) * multiple_of
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long, device="cpu")
    position_ids = torch.zeros(shape, dtype=torch.long, device="cpu")
    unit = torch.full(shape, -1, dtype=torch.long, device="cpu")
    branch = torch.full(shape, PREFIX, dtype=torch.long, device="cpu")
    pairs = (pair for row in rows for pair in row)
    for u, (s, (chosen, rejected)) in enumerate(zip(spans, pairs, strict=True)):
        own = s.start + s.prefix + s.chosen
        end = own + s.rejected
        input_ids[s.row, s.start : own] = torch.tensor(chosen, dtype=torch.long, device="cpu")
        input_ids[s.row, own:end] = torch.tensor(rejected[s.prefix :], dtype=torch.long, device="cpu")
        position_ids[s.row, s.start : own] = torch.arange(s.prefix + s.chosen, device="cpu")
        position_ids[s.row, own:end] = torch.arange(s.prefix, s.prefix + s.rejected, device="cpu")
        unit[s.row, s.start : end] = u
        branch[s.row, s.start + s.prefix : own] = CHOSEN
        branch[s.row, own:end] = REJECTED
    for r, n in enumerate(lengths):  # padding continues the row's last positions (invisible to real tokens)
        start = int(position_ids[r, n - 1]) + 1 if n else 0
        position_ids[r, n:] = torch.arange(start, start + length - n, device="cpu")
    mask = pair_attention_mask(unit, branch) if share_prefix else None
    sequence_tokens = sum(2 * s.prefix + s.chosen + s.rejected for s in spans)
    out = PairRows(input_ids, position_ids, mask, spans, sum(lengths), sequence_tokens)
    if images is not None:
        out.pixel_values, out.image_spans, out.image_tiles = _pair_images(spans, [h for row in images for h in row], len(rows))
    return out


def _pair_images(spans: Sequence[PairSpan], holders: Sequence[object], num_rows: int
                 ) -> tuple[torch.Tensor | None, list[list[tuple[int, int]]] | None, list[int] | None]:  # fmt: skip
    """Pixels, row spans and tiles of the pairs' prompt images: once in a shared prefix, else once per side."""
    pixels, row_spans, tiles = [], [[] for _ in range(num_rows)], []
    for s, holder in zip(spans, holders, strict=True):
        refs, own = list(getattr(holder, "images", [])), list(getattr(holder, "image_spans", []))
        if not own:
            continue
        values = torch.cat([ref.pixels() for ref in refs])
        if s.prefix:  # shared: the prompt (and its images) are the prefix
            if max(b for _, b in own) > s.prefix:
                raise ValueError(f"pair {getattr(holder, 'origin', '?')}: an image lies outside the shared prefix")
            starts = [s.start]
        else:  # two documents: chosen at s.start, rejected after it
            starts = [s.start, s.start + s.chosen]
        for start in starts:
            pixels.append(values)
            row_spans[s.row].extend((start + a, start + b) for a, b in own)
            tiles.extend(ref.tiles for ref in refs)
    if not pixels:
        return None, None, None
    return torch.cat(pixels), row_spans, tiles


def pair_attention_mask(unit: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """(rows, 1, L, L) bool: causal within a unit; a suffix sees the prefix and itself, never the other suffix.

    Padding (unit −1) attends only to itself, so no query row is fully masked (sdpa would return NaN there).
    """
    length = unit.shape[1]
    idx = torch.arange(length, device=unit.device)
    causal = idx[None, :] <= idx[:, None]  # (q, k)
    same_unit = (unit[:, :, None] == unit[:, None, :]) & (unit[:, :, None] >= 0)
    visible_branch = (branch[:, None, :] == PREFIX) | (branch[:, None, :] == branch[:, :, None])
    mask = same_unit & causal & visible_branch
    mask |= (unit < 0)[:, :, None] & torch.eye(length, dtype=torch.bool, device=unit.device)
    return mask[:, None]


def resolve_share_prefix(setting: bool | None, model: torch.nn.Module) -> bool:
    """Auto (None): share whenever the model can (its attention takes a 4-D mask, its layer pattern can be expressed in one).

    `true` on a model that cannot is an error naming the setting and the reason, before any data is built.
    """
    reason = shared_prefix_unsupported(model)
    if setting is None:
        return reason is None
    if setting and reason is not None:
        raise UserError(f"data.share_prefix: true, but this model cannot run shared-prefix pair rows: {reason}; "
                        "set data.share_prefix: false (or leave it null)")
    return setting
