"""The trainer interface: a method is its data, its models, its loss and its metrics.

The engine owns everything else (accelerator, optimizer, schedule, loop, checkpoints,
logging, export). A trainer never steps an optimizer.

Loss normalisation is exact across accumulation and ranks: `units(rows)` counts what the
loss averages over (target tokens, samples, pairs) without a forward pass; the loop sums it
over every row of the step on every rank and passes those `totals` to `loss`, which returns
this micro-batch's share of the step loss. Summing the shares gives the true step mean, so
a batch split into more micro-batches or ranks trains identically.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from align.engine.core import Engine


class Trainer(ABC):
    name: ClassVar[str]
    recipe_type: ClassVar[type]

    def __init__(self, recipe: Any, engine: Engine):
        self.recipe = recipe
        self.engine = engine
        self.model: torch.nn.Module | None = None  # the trained model; the loop swaps in the prepared one
        self.tokenizer = None
        self.train_rows: Sequence[Any] = ()
        self.eval_rows: Sequence[Any] = ()
        self.data_stats: dict[str, Any] = {}

    @abstractmethod
    def setup(self) -> None:
        """Load the tokenizer, the model(s) and the data."""

    @abstractmethod
    def collate(self, row_ids: Sequence[int], split: str = "train") -> Any:
        """A device-ready batch from row ids of `train_rows` or `eval_rows`."""

    @abstractmethod
    def units(self, row_ids: Sequence[int], split: str = "train") -> dict[str, float]:
        """What the loss averages over in these rows, e.g. {"weight": summed token weights}."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Any, totals: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This micro-batch's share of the step loss, and detached metrics to log."""

    def final_metrics(self) -> dict[str, Any]:
        """Metrics measured once at the end (e.g. task accuracy); they go into summary.json."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Trainer state that must survive resume (e.g. MPO's running delta); JSON-serialisable."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook, no state by default
        """Restore what `state_dict` returned."""
