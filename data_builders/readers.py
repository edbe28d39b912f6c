"""Readers for JSONL, Parquet and HF `datasets` (saved to disk, a local dir, or a hub name).

Each yields `(origin, row_number, row)` so any later error can name the file and the row.
Row numbers are 1-based line numbers for JSONL and 0-based indices elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_builders.bad_rows import BadRowError, BadRowPolicy

Row = tuple[str, int, Any]


def read_rows(path: str, split: str = "train", max_rows: int | None = None, policy: BadRowPolicy | None = None) -> Iterator[Row]:
    """Rows from `path`; unparsable JSON lines go through the bad-row policy."""
    policy = policy or BadRowPolicy()
    for count, item in enumerate(_iter_source(path, split, policy)):
        if max_rows is not None and count >= max_rows:
            return
        yield item


def _iter_source(path: str, split: str, policy: BadRowPolicy) -> Iterator[Row]:
    p = Path(path)
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        yield from _read_jsonl(p, policy)
    elif p.is_file() and p.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(p).to_pylist()):
            yield str(p), i, row
    elif p.is_dir() and (p / "dataset_info.json").exists():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        for i, row in enumerate(ds):
            yield str(p), i, row
    elif p.exists() or p.suffix in (".jsonl", ".json", ".parquet"):
        if not p.exists():
            raise FileNotFoundError(f"data file not found: {path}")
        import datasets

        ds = datasets.load_dataset(str(p), split=split)
        for i, row in enumerate(ds):
            yield str(p), i, row
    else:  # a hub dataset name; needs the network unless it is in the local HF cache
        import datasets

        ds = datasets.load_dataset(path, split=split)
        for i, row in enumerate(ds):
            yield f"{path}[{split}]", i, row


def _read_jsonl(p: Path, policy: BadRowPolicy) -> Iterator[Row]:
    with p.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield str(p), lineno, json.loads(line)
            except json.JSONDecodeError as err:
                policy.handle(BadRowError(str(p), lineno, "<json>", f"invalid JSON: {err.msg}"), line.rstrip("\n"))


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
