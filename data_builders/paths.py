"""Local path or hub name? One rule for model, tokenizer and data paths, so a missing local path is an error naming it.

A hub name is `name` or `org/name`; everything that looks like a path on disk is checked on disk instead of being
sent to the hub (where a typo in a local path would surface as a confusing 404 or an offline-mode error).
"""

from __future__ import annotations

from pathlib import Path

from data_builders.errors import UserError

# suffixes of files (data, weights, tokenizers, configs): a name ending in one is a file, never a hub repo
FILE_SUFFIXES = frozenset({".json", ".jsonl", ".parquet", ".arrow", ".csv", ".safetensors", ".bin", ".pt", ".gguf", ".model",
                           ".txt", ".yaml", ".yml"})  # fmt: skip
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class MissingPathError(UserError, FileNotFoundError):
    """A local path in the recipe that does not exist; still a FileNotFoundError for callers that catch one."""


def looks_local(name: str) -> bool:
    """A path rather than a hub name: relative (`.`), absolute (`/`), home (`~`), under runs/, with more than one slash,
    with a Windows separator, ending in a file suffix, or whose first directory exists here (a path that exists partially)."""
    if name.startswith((".", "/", "~", "runs/")) or name.count("/") > 1:
        return True
    if "\\" in name:  # a Windows separator; hub names never hold one
        return True
    if Path(name).suffix.lower() in FILE_SUFFIXES:
        return True
    first, slash, _ = name.partition("/")
    return bool(slash) and Path(first).is_dir()


def local_path(name: str) -> Path:
    return Path(name).expanduser()
