"""Atomic checkpoints (temp dir, then rename; last N kept), exact resume, and the final export.

A checkpoint is `accelerator.save_state` (model, optimizer, scheduler, RNG; DeepSpeed shards
under ZeRO-3) plus `train_state.json` (step, tokens, guard counters, trainer state such as
MPO's running delta). A directory without the `.tmp` suffix is always complete: a run killed
mid-save leaves only a `.tmp` directory, which resume ignores and removes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

STATE_FILE = "train_state.json"


class Checkpointer:
    def __init__(self, accelerator: Accelerator, root: Path, keep_last: int):
        self.accelerator = accelerator
        self.root = root
        self.keep_last = max(1, keep_last)

    def complete(self) -> list[Path]:
        if not self.root.exists():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp")]
        return sorted(dirs, key=lambda p: int(p.name.split("-")[1]))

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def save(self, step: int, state: dict, extra: Callable[[Path], None] | None = None) -> Path:
        """`extra(directory)` runs on every rank before the rename, for files of the trainer's own (e.g. per-rank buffers)."""
        acc = self.accelerator
        final = self.root / f"step-{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        if extra is not None:
            extra(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> dict:
        self.accelerator.load_state(str(path))
        return json.loads((path / STATE_FILE).read_text())

    def clean_partial(self) -> None:
        if self.accelerator.is_main_process and self.root.exists():
            for p in self.root.glob("*.tmp"):
                shutil.rmtree(p, ignore_errors=True)
        self.accelerator.wait_for_everyone()


def export_model(
    accelerator: Accelerator, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path, merge_lora: bool = True
) -> Path:
    """Write a plain-transformers model (safetensors, consolidated from ZeRO-3 shards) and its tokenizer.

    LoRA adapters are merged into the base weights so `AutoModelForCausalLM.from_pretrained`
    loads the result with no align or PEFT code.
    """
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 partitions on rank 0
    if accelerator.is_main_process:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        if merge_lora and hasattr(unwrapped, "merge_and_unload"):
            unwrapped = _merged_copy(unwrapped, state_dict)
            state_dict = None
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    accelerator.wait_for_everyone()
    return out_dir


def _merged_copy(peft_model: torch.nn.Module, full_state: dict) -> torch.nn.Module:
    """Rebuild the PEFT model on CPU from the consolidated state, then merge its adapters."""
    from peft import get_peft_model

    base = peft_model.get_base_model()
    fresh = type(base)(base.config)
    clone = get_peft_model(fresh, peft_model.peft_config["default"])
    missing, unexpected = clone.load_state_dict({k: v.float() for k, v in full_state.items()}, strict=False)
    if unexpected or [k for k in missing if "lora" in k]:
        raise RuntimeError(f"LoRA export: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return clone.merge_and_unload()
