"""Verified atomic checkpoints (temp dir, manifest last, fsync, rename; last N kept), exact resume, and the final export.

A checkpoint is `accelerator.save_state` (model, optimizer, scheduler, RNG; DeepSpeed shards under ZeRO-3),
`train_state.json` (step, tokens, guard counters, trainer state such as MPO's running delta), the trainer's own
files (`extra`, e.g. RLHF's per-rank buffers) and, written last, `manifest.json`: every file's size (and CRC32
up to `CHECKSUM_MAX_BYTES`), the step and the recipe fingerprint (`align/run_state.py`). Every file and
directory is fsynced before the rename, so a directory without the `.tmp` suffix was complete when renamed; a
run killed mid-save leaves only a `.tmp` directory, which resume removes.

Resume (`resume_point`) takes the newest checkpoint that still matches its manifest (a file lost or truncated
later is caught), names the damaged ones it skipped in one line, and refuses one written by another recipe unless
`train.resume=force`. A checkpoint written before manifests existed is accepted if its state file parses and its
safetensors files are whole (said in one line).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from transformers import PreTrainedTokenizerBase

from align.run_state import MANIFEST, RecipeChanged, describe_change, read_json, recipe_fingerprint, recipe_keys

STATE_FILE = "train_state.json"
CHECKSUM_MAX_BYTES = 256 << 20  # larger files (weights, optimizer states of big models) are checked by size only
_STEP_DIR = re.compile(r"step-(\d+)")


class Checkpointer:
    def __init__(self, accelerator: Accelerator, root: Path, keep_last: int, recipe: Any = None):
        self.accelerator = accelerator
        self.root = Path(root)
        self.keep_last = max(1, keep_last)
        self.fingerprint: str | None = None
        self.recipe_keys: dict[str, Any] = {}
        self.recipe_type: type | None = None
        if recipe is not None:
            self.for_recipe(recipe)

    def for_recipe(self, recipe: Any) -> Checkpointer:
        """Checkpoints record this recipe's fingerprint (and keys); `resume_point` refuses one of another recipe."""
        self.fingerprint, self.recipe_keys, self.recipe_type = recipe_fingerprint(recipe), recipe_keys(recipe), type(recipe)
        return self

    def complete(self) -> list[Path]:
        """Every renamed (so once complete) checkpoint directory, oldest first; `.tmp` and foreign names are not."""
        if not self.root.exists():
            return []
        steps = {p: _STEP_DIR.fullmatch(p.name) for p in self.root.iterdir() if p.is_dir()}
        return sorted((p for p, m in steps.items() if m), key=lambda p: int(steps[p].group(1)))

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies, chosen on rank 0 and the same on every rank."""
        choice = [self._newest_verified() if self.accelerator.is_main_process else None]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(choice)
        return Path(choice[0]) if choice[0] else None

    def resume_point(self, resume: bool | str = True) -> Path | None:
        """What a start resumes: nothing when `resume` is false, else `latest()`, if it was written by this recipe (or `force`)."""
        if resume is False:
            return None
        latest = self.latest()
        if latest is None:
            return None
        manifest = read_json(latest / MANIFEST) or {}
        saved = manifest.get("fingerprint")
        if self.fingerprint and saved and saved != self.fingerprint:
            change = describe_change(manifest.get("recipe", {}), self.recipe_keys, self.recipe_type)
            if resume != "force":
                raise RecipeChanged(f"{latest} was written by another recipe ({change}); use a new output_dir, "
                                    "set train.resume=false to start over, or train.resume=force to continue it anyway")  # fmt: skip
            if self.accelerator.is_main_process:
                print(f"align: train.resume=force: resuming {latest} although the recipe changed ({change})", flush=True)
        return latest

    def _newest_verified(self) -> str | None:
        damaged = []
        for path in reversed(self.complete()):
            problem = verify_checkpoint(path)
            if problem is not None:
                damaged.append(f"{path.name} ({problem})")
                continue
            if damaged:
                print(f"align: skipped damaged checkpoint {'; '.join(damaged)}; resuming from the older {path.name}", flush=True)
            if not (path / MANIFEST).exists():
                print(f"align: {path.name} has no {MANIFEST} (written by an older align); accepted: its {STATE_FILE} parses", flush=True)
            return str(path)
        if damaged:
            print(f"align: no checkpoint in {self.root} verifies ({'; '.join(damaged)}); training starts from step 0", flush=True)
        return None

    def save(self, step: int, state: dict, extra: Callable[[Path], None] | None = None) -> Path:
        """`extra(directory)` runs on every rank before the manifest and the rename, for files of the trainer's own (e.g. per-rank buffers)."""
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
            _write_synced(tmp / STATE_FILE, json.dumps(state, indent=1))
            write_manifest(tmp, {"step": step, "fingerprint": self.fingerprint, "recipe": self.recipe_keys})
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync_dir(self.root)
            self._rotate(step)
        acc.wait_for_everyone()
        return final

    def _rotate(self, step: int) -> None:
        """Keep the newest `keep_last` up to `step`; any later one is from before a resume that skipped it (damaged)."""
        found = self.complete()
        newer = [p for p in found if int(_STEP_DIR.fullmatch(p.name).group(1)) > step]
        kept = [p for p in found if p not in newer]
        for old in newer + kept[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path) -> dict:
        self.accelerator.load_state(str(path))
        return json.loads((path / STATE_FILE).read_text())

    def clean_partial(self) -> None:
        if self.accelerator.is_main_process and self.root.exists():
            for p in self.root.glob("*.tmp"):
                shutil.rmtree(p, ignore_errors=True)
        self.accelerator.wait_for_everyone()


def write_manifest(directory: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Size (and CRC32 up to CHECKSUM_MAX_BYTES) of every file under `directory`, each fsynced; then the manifest, then the directories."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST:
            files[rel] = _file_record(path, sync=True)
    manifest = {**info, "files": files}
    _write_synced(directory / MANIFEST, json.dumps(manifest, indent=1))
    for sub in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync_dir(sub)
    _fsync_dir(directory)
    return manifest


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint is whole, else what is wrong (a file missing, of another size or checksum; no state file)."""
    manifest = read_json(path / MANIFEST)
    if manifest is None:
        return f"{MANIFEST} unreadable" if (path / MANIFEST).exists() else _verify_without_manifest(path)
    files = manifest.get("files", {})
    if STATE_FILE not in files:
        return f"{MANIFEST} lists no {STATE_FILE}"
    for rel, expected in files.items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        size = file.stat().st_size
        if size != expected.get("size"):
            return f"{rel} has {size} bytes, the manifest says {expected.get('size')}"
        if "crc32" in expected and _file_record(file)["crc32"] != expected["crc32"]:
            return f"{rel} does not match its checksum"
    return None


def _verify_without_manifest(path: Path) -> str | None:
    """Checkpoints from before manifests: the state file must parse and every safetensors file must be whole."""
    if read_json(path / STATE_FILE) is None:
        return f"{STATE_FILE} is missing or unreadable"
    from safetensors import SafetensorError, safe_open

    for file in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            return f"{file.relative_to(path)}: {err}"
    return None


def _file_record(path: Path, sync: bool = False) -> dict[str, int]:
    size = path.stat().st_size
    record = {"size": size}
    with path.open("rb") as handle:
        if size <= CHECKSUM_MAX_BYTES:
            crc = 0
            while chunk := handle.read(8 << 20):
                crc = zlib.crc32(chunk, crc)
            record["crc32"] = crc
        if sync:
            os.fsync(handle.fileno())
    return record


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """Rebuild the PEFT model on CPU from the consolidated state, check that every weight came from it, then merge (peft).

    The copy is built from the config (random init), so a weight the state does not cover would be exported random:
    that is an error, not a warning. Keys tied to a loaded one (an LM head tied to the input embeddings) are covered.
    """
    from peft import get_peft_model

    base = peft_model.get_base_model()
    clone = get_peft_model(type(base)(base.config), peft_model.peft_config["default"])
    missing, unexpected = clone.load_state_dict({k: v.float() for k, v in full_state.items()}, strict=False)
    untouched = _not_loaded(clone, missing, full_state)
    if unexpected or untouched:
        raise RuntimeError(f"LoRA export: {len(untouched)} weights of the model are not in the trained state (e.g. {untouched[:3]}) and "
                           f"would be exported randomly initialised; {len(unexpected)} keys of the state fit no weight (e.g. {unexpected[:3]})")  # fmt: skip
    return clone.merge_and_unload()


def _not_loaded(model: torch.nn.Module, missing: list[str], loaded: dict) -> list[str]:
    """The missing keys, less those whose tensor is tied to a loaded key's."""
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    loaded_ids = {id(tensors[k]) for k in loaded if k in tensors}
    return [k for k in missing if k not in tensors or id(tensors[k]) not in loaded_ids]
