"""Which rows each rank trains on at each optimizer step: a pure function of (seed, step).

Step s of an epoch takes the next `global_batch` rows of that epoch's seeded permutation;
rank r gets micro-batches r·G … r·G+G−1 of it. The same global batch therefore trains in one
process with accumulation G·W or in W processes with accumulation G, and resuming at step s
needs nothing but s. The tail of an epoch that fills no whole step is left out (reported).

Length: `max_steps` > 0 optimizer steps; `max_steps` None or -1 (transformers' "no limit") lets
`epochs` (> 0, fractions allowed) decide. Any other value is refused, so no run exports an untrained
model as if it had trained.
"""

from __future__ import annotations

import math

import torch

from align.engine.accelerator import BatchShape
from data_builders.errors import UserError

NO_LIMIT = -1  # train.max_steps: -1 means "no step limit" (transformers' convention); epochs decide


def total_steps(steps_per_epoch: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of a run: `max_steps` when > 0, else `epochs` × steps per epoch rounded up (at least one)."""
    if max_steps is not None and max_steps > 0:
        return max_steps
    if max_steps not in (None, NO_LIMIT):
        raise UserError(f"train.max_steps must be >= 1, or -1 / null for no limit (epochs decide), got {max_steps}")
    if not epochs > 0:
        raise UserError(f"train.epochs must be > 0 when train.max_steps is not set, got {epochs}")
    return max(1, math.ceil(epochs * steps_per_epoch))


class StepPlan:
    def __init__(self, num_rows: int, shape: BatchShape, seed: int, epochs: float, max_steps: int | None):
        self.num_rows = num_rows
        self.shape = shape
        self.seed = seed
        self.steps_per_epoch = num_rows // shape.global_batch_size
        if self.steps_per_epoch == 0:
            raise UserError(
                f"{num_rows} training rows cannot fill one global batch of {shape.global_batch_size} "
                f"(micro {shape.micro_batch_size} × accumulation {shape.gradient_accumulation_steps} × world {shape.world_size})"
            )
        self.total_steps = total_steps(self.steps_per_epoch, epochs, max_steps)
        self.unused_rows_per_epoch = num_rows - self.steps_per_epoch * shape.global_batch_size
        self._cached_epoch, self._cached_order = -1, []

    def _order(self, epoch: int) -> list[int]:
        if self._cached_epoch != epoch:  # one permutation per epoch, computed once
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._cached_epoch, self._cached_order = epoch, torch.randperm(self.num_rows, generator=generator, device="cpu").tolist()
        return self._cached_order

    def step_rows(self, step: int) -> list[int]:
        """All rows of one optimizer step, across ranks."""
        epoch, index = divmod(step, self.steps_per_epoch)
        size = self.shape.global_batch_size
        return self._order(epoch)[index * size : (index + 1) * size]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This rank's micro-batches (lists of row ids) for `step`."""
        rows = self.step_rows(step)
        micro, accumulation = self.shape.micro_batch_size, self.shape.gradient_accumulation_steps
        start = rank * accumulation
        return [rows[(start + g) * micro : (start + g + 1) * micro] for g in range(accumulation)]


def eval_micro_batches(num_rows: int, rank: int, world_size: int, micro: int) -> list[tuple[list[int], bool]]:
    """This rank's share of `num_rows` eval rows as (row ids, real) micro-batches, the same count on every rank.

    ZeRO-3 gathers parameters collectively inside each forward, so a rank that ran one forward fewer
    would leave the others waiting forever. A rank short of rows runs a filler batch (row 0, `real`
    False) whose result the caller discards.
    """
    mine = list(range(rank, num_rows, world_size))
    count = math.ceil(math.ceil(num_rows / world_size) / micro)
    batches = [mine[i * micro : (i + 1) * micro] for i in range(count)]
    return [(ids, True) if ids else ([0], False) for ids in batches]
