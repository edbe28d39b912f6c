"""Readers for JSONL, Parquet and HF `datasets` (saved to disk, a local dir, or a hub name).

Each yields `(origin, row_number, row)` so any later error can name the file and the row. Row numbers are
1-based everywhere: the line number for JSONL, the n-th row elsewhere (as a person counts rows).
A JSONL line is decoded on its own, so a line that is not UTF-8 is one bad row (field `<utf-8>`), like a
line that is not JSON; both follow the bad-row policy. A file with no rows at all is an error naming it.
A local-looking path that does not exist is an error naming it; only a hub-looking name goes to the hub.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_builders.bad_rows import BadRowError, BadRowPolicy
from data_builders.errors import UserError
from data_builders.paths import DATA_SUFFIXES, MissingPathError, local_path, looks_local

Row = tuple[str, int, Any]


class EmptyDataError(UserError):
    """A data file or dataset with no rows at all."""


def data_path_problem(path: str) -> str | None:
    """Why `path` cannot be data (missing, or a file of an unknown kind), or None: it exists, is `synthetic`, or is a hub name."""
    if path == "synthetic":
        return None
    p = local_path(path)
    if p.is_dir():
        return None
    if p.is_file():
        return None if p.suffix else f"has no file suffix; name a {', '.join(DATA_SUFFIXES)} file or a saved HF dataset directory"
    if p.suffix in DATA_SUFFIXES or looks_local(path):
        return "does not exist (no such file or directory)"
    return None


def check_data_path(path: str, field: str = "data path") -> None:
    """Raise naming `field` and the path when `path` is a missing local path or a file of an unknown kind."""
    problem = data_path_problem(path)
    if problem is None:
        return
    error = MissingPathError if "does not exist" in problem else UserError
    raise error(f"{field} {path!r} {problem}")


def read_rows(path: str, split: str = "train", max_rows: int | None = None, policy: BadRowPolicy | None = None) -> Iterator[Row]:
    """Rows from `path`; lines that are not UTF-8 or not JSON go through the bad-row policy."""
    policy = policy or BadRowPolicy()
    for count, item in enumerate(_iter_source(path, split, policy)):
        if max_rows is not None and count >= max_rows:
            return
        yield item


def _iter_source(path: str, split: str, policy: BadRowPolicy) -> Iterator[Row]:
    check_data_path(path)
    p = local_path(path)
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        yield from read_jsonl(p, policy)
    elif p.is_file() and p.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from _numbered(str(p), pq.read_table(p).to_pylist())
    elif p.is_file():  # another file type `datasets` may read (check_data_path refused files with no suffix)
        import datasets

        yield from _numbered(str(p), datasets.load_dataset(str(p), split=split))
    elif p.is_dir() and (p / "dataset_info.json").exists():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        yield from _numbered(str(p), ds)
    elif p.is_dir():  # a folder of data files that `datasets` can read
        import datasets

        yield from _numbered(str(p), datasets.load_dataset(str(p), split=split))
    else:  # a hub dataset name; needs the network unless it is in the local HF cache
        import datasets

        try:
            ds = datasets.load_dataset(path, split=split)
        except (ConnectionError, FileNotFoundError) as err:  # offline, or no such dataset on the hub
            raise UserError(f"data path {path!r} is not a local file or directory, and the hub has no dataset by that name "
                            f"or cannot be reached: {err}") from None  # fmt: skip
        yield from _numbered(f"{path}[{split}]", ds)


def _numbered(origin: str, rows: Any) -> Iterator[Row]:
    """Rows numbered from 1; none at all is an error naming `origin`."""
    count = 0
    for count, row in enumerate(rows, start=1):
        yield origin, count, row
    if count == 0:
        raise EmptyDataError(f"{origin}: data file is empty (no rows)")


def read_jsonl(p: Path, policy: BadRowPolicy) -> Iterator[Row]:
    """One row per non-blank line, each decoded on its own (a UTF-8 byte-order mark on the first line is allowed)."""
    origin, seen = str(p), 0
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                seen += 1
                reason = f"not valid UTF-8 ({err.reason} at byte {err.start} of the line)"
                policy.handle(BadRowError(origin, lineno, "<utf-8>", reason), raw.decode("utf-8", errors="replace").rstrip("\r\n"))
                continue
            if not line.strip():
                continue
            seen += 1
            try:
                yield origin, lineno, json.loads(line)
            except json.JSONDecodeError as err:
                policy.handle(BadRowError(origin, lineno, "<json>", f"invalid JSON: {err.msg}"), line.rstrip("\r\n"))
    if seen == 0:
        raise EmptyDataError(f"{origin}: data file is empty (no rows)")


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
