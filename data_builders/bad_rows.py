"""The bad-row policy: fail naming file, row and field, or skip into quarantine. Never drop silently."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class BadRowError(ValueError):
    """A row that cannot be used; the message names where it came from and which field is wrong."""

    def __init__(self, origin: str, row: int, field: str, reason: str):
        self.origin, self.row, self.field, self.reason = origin, row, field, reason
        super().__init__(f"{origin}: row {row}: field {field!r}: {reason}")


@dataclass
class BadRowPolicy:
    """Collects bad rows under `skip`, raises under `error`."""

    mode: Literal["error", "skip"] = "error"
    quarantined: list[dict] = field(default_factory=list)

    def handle(self, err: BadRowError, row: Any) -> None:
        if self.mode == "error":
            raise err
        self.quarantined.append(
            {"origin": err.origin, "row": err.row, "field": err.field, "reason": err.reason, "data": row}
        )

    @property
    def count(self) -> int:
        return len(self.quarantined)

    def write(self, path: Path) -> None:
        """Write every skipped row with its reason (append-safe: one JSON object per line)."""
        if not self.quarantined:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for item in self.quarantined:
                f.write(json.dumps(item, default=str) + "\n")
