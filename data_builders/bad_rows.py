"""The bad-row policy: fail naming file, row and field, or skip into quarantine. Never drop silently."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_builders.errors import UserError


class BadRowError(UserError):
    """A row that cannot be used; the message names where it came from, its 1-based row number and the field.

    Row numbers are 1-based everywhere: the line number in a JSONL file, the n-th row of a Parquet file,
    HF dataset or generated list, as a person counts rows.
    """

    def __init__(self, origin: str, row: int, field: str, reason: str):
        self.origin, self.row, self.field, self.reason = origin, row, field, reason
        super().__init__(f"{origin}: row {row}: field {field!r}: {reason}")


@dataclass
class BadRowPolicy:
    """Collects bad rows under `skip`, raises under `error`.

    `path` is where skipped rows go (a run's `quarantine.jsonl`); `writer` says whether this process writes it
    (the main rank: every rank reads the same rows). Builders write it before any data error they raise, so a
    run that stops on its data still leaves the rows it skipped.
    """

    mode: Literal["error", "skip"] = "error"
    path: Path | None = None
    writer: bool = True
    quarantined: list[dict] = field(default_factory=list)

    def handle(self, err: BadRowError, row: Any) -> None:
        if self.mode == "error":
            raise err
        self.quarantined.append(
            {"origin": err.origin, "row": err.row, "field": err.field, "reason": err.reason, "data": row}
        )

    @classmethod
    def for_run(cls, mode: Literal["error", "skip"], run_dir: Path, is_main: bool, name: str = "quarantine.jsonl") -> BadRowPolicy:
        """A run's policy: skipped rows go to `run_dir/name`, written by the main rank."""
        return cls(mode, Path(run_dir) / name, writer=is_main)

    @property
    def count(self) -> int:
        return len(self.quarantined)

    def where(self) -> str:
        """Where the skipped rows are, for messages."""
        return str(self.path) if self.path is not None else "the bad-row policy (no quarantine file configured)"

    def summary(self) -> str:
        return f"{self.count} bad row{'s' * (self.count != 1)} skipped (data.on_bad_row: skip); quarantined in {self.where()}"

    def write(self, path: Path | None = None) -> Path | None:
        """Write every skipped row with its reason (one JSON object per line) to `path` (default: `self.path`), say so on
        stderr, and return the file; None when nothing was skipped."""
        path = Path(path) if path is not None else self.path
        if not self.quarantined or path is None:
            return None
        self.path = path
        if self.writer:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w") as f:
                for item in self.quarantined:
                    f.write(json.dumps(item, default=str) + "\n")
            print(f"[data] {self.summary()}", file=sys.stderr, flush=True)
        return path


def no_usable_rows(what: str, split: str, policy: BadRowPolicy, skipped: int) -> UserError:
    """The error for a split with nothing left to train on; the quarantine is written first, so the skipped rows can be looked at."""
    policy.write()
    why = f"all {skipped} were skipped as bad rows; quarantined in {policy.where()}" if skipped else "the sources hold none"
    return UserError(f"no usable {split} {what}: {why}")
