"""Reference log-probs computed once and cached on disk, keyed by the data and the reference's identity.

The key hashes every pair's token ids (so any change of data, template, tokenizer or max_length
misses) with the reference model's identity (built-in shape and seed; or the weight files' names,
sizes and mtimes of a local directory; or a hub name and revision) and the dtype and attention it runs in,
as resolved on this machine. Resumed runs and sweep runs that
share data and reference reuse the file. Written atomically (temporary file + rename) by rank 0.

The pass shards pairs across ranks with the same number of forwards on every rank (ZeRO-3 gathers
parameters collectively, so a rank with fewer batches would hang the others).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from align import builtin
from align.engine.models import prepare_frozen, resolve_attention, resolve_dtype

if TYPE_CHECKING:
    from align.config import ModelConfig
    from align.engine.core import Engine
    from data_builders.preference_data import PreferencePair

PAIRS_PER_FORWARD = 8


def model_identity(cfg: ModelConfig, seed: int) -> dict[str, Any]:
    """What makes two references the same model, without hashing their weights.

    The dtype and attention are the resolved ones (`auto` is fp32 + sdpa on CPU, bf16 + flash-attention on a GPU),
    so log-probs computed on one kind of machine are not reused where the reference runs differently.
    """
    identity: dict[str, Any] = {"name": cfg.name_or_path, "revision": cfg.revision, "dtype": str(resolve_dtype(cfg.dtype)),
                                "attention": resolve_attention(cfg.attn_implementation)}  # fmt: skip
    if builtin.is_builtin(cfg.name_or_path):
        identity |= {"shape": builtin.builtin_shape(cfg.name_or_path), "seed": seed}
    elif Path(cfg.name_or_path).is_dir():
        root = Path(cfg.name_or_path).resolve()
        identity["name"] = str(root)
        identity["files"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.iterdir()
                                   if p.suffix in (".safetensors", ".bin", ".json"))  # fmt: skip
    return identity


def data_digest(splits: dict[str, list[PreferencePair]]) -> str:
    h = hashlib.sha256()
    for split in sorted(splits):
        h.update(split.encode())
        for p in splits[split]:
            h.update(json.dumps([p.prompt_length, p.chosen, p.rejected]).encode())
    return h.hexdigest()


class ReferenceCache:
    def __init__(self, cache_dir: str | Path, reference: ModelConfig, seed: int):
        self.dir = Path(cache_dir)
        self.identity = model_identity(reference, seed)

    def path_for(self, splits: dict[str, list[PreferencePair]]) -> Path:
        key = hashlib.sha256((json.dumps(self.identity, sort_keys=True) + data_digest(splits)).encode()).hexdigest()[:24]
        return self.dir / f"{key}.safetensors"

    def load_or_compute(
        self,
        splits: dict[str, list[PreferencePair]],
        load_model: Callable[[], torch.nn.Module],
        sums: Callable[[torch.nn.Module, list[PreferencePair], list[int]], torch.Tensor],
        engine: Engine,
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """({split: (pairs, 2) reference sums}, whether the cache had them); a miss computes them on all ranks."""
        path = self.path_for(splits)
        if not path.exists():
            reference = prepare_frozen(load_model(), engine.accelerator)
            tensors = {split: _shard_pass(reference, pairs, sums, engine) for split, pairs in splits.items() if pairs}
            del reference
            if engine.is_main:
                self.dir.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                save_file(tensors, str(tmp), metadata={"identity": json.dumps(self.identity)})
                os.replace(tmp, path)
            engine.accelerator.wait_for_everyone()
            return tensors, False
        return load_file(str(path)), True


def _shard_pass(reference: torch.nn.Module, pairs: list[PreferencePair], sums: Callable, engine: Engine) -> torch.Tensor:
    mine = list(range(engine.rank, len(pairs), engine.world_size))
    forwards = math.ceil(math.ceil(len(pairs) / engine.world_size) / PAIRS_PER_FORWARD)
    results: list[tuple[int, list[float]]] = []
    for f in range(forwards):
        ids = mine[f * PAIRS_PER_FORWARD : (f + 1) * PAIRS_PER_FORWARD]
        if not ids:  # keep step with the other ranks; the result is discarded
            sums(reference, [pairs[0]], [0])
            continue
        values = sums(reference, [pairs[i] for i in ids], ids)
        results += list(zip(ids, values.tolist()))
    if engine.world_size > 1:
        results = gather_object(results)
    out = torch.zeros(len(pairs), 2, dtype=torch.float32, device="cpu")
    for i, value in results:
        out[i] = torch.tensor(value, device="cpu")
    return out
