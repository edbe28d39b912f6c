"""Builds the one Accelerator every trainer uses: DeepSpeed ZeRO-3 when configured, plain otherwise.

Two things accelerate does not do for us:
- On a machine without a GPU, accelerate leaves the process-group backend unset under
  DeepSpeed and then reports `num_processes == 1` and rank 0 on every rank. Passing the gloo
  backend explicitly fixes the ranks (and so data sharding and saving).
- Batch-size fields of the DeepSpeed JSON marked "auto" are filled from the recipe, because
  align feeds its own batches rather than a prepared DataLoader.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

from data_builders.errors import UserError
from data_builders.paths import MissingPathError


@dataclass
class BatchShape:
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_batch_shape(micro: int, accumulation: int | None, global_batch: int | None, world_size: int) -> BatchShape:
    """global batch = micro × accumulation × world size; derive the missing one or explain the mismatch."""
    if micro < 1:
        raise UserError(f"train.micro_batch_size must be >= 1, got {micro}")
    if accumulation is None:
        if global_batch is None:
            accumulation = 1
        elif global_batch % (micro * world_size) or global_batch < micro * world_size:
            raise UserError(
                f"train.global_batch_size={global_batch} is not a positive multiple of micro_batch_size={micro} × "
                f"world size {world_size} = {micro * world_size}"
            )
        else:
            accumulation = global_batch // (micro * world_size)
    shape = BatchShape(micro, accumulation, world_size)
    if accumulation < 1:
        raise UserError(f"train.gradient_accumulation_steps must be >= 1, got {accumulation}")
    if global_batch is not None and shape.global_batch_size != global_batch:
        raise UserError(
            f"train.global_batch_size={global_batch} but micro_batch_size={micro} × gradient_accumulation_steps="
            f"{accumulation} × world size {world_size} = {shape.global_batch_size}"
        )
    return shape


def deepspeed_config_path(recipe_path: str | None) -> str | None:
    """`accelerate launch` with a DeepSpeed config file wins over the recipe's `engine.deepspeed`."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or recipe_path
    return recipe_path


def fill_deepspeed_config(config: dict, shape: BatchShape, max_grad_norm: float, bf16: bool) -> dict:
    """Replace "auto" batch, clipping and precision fields with the recipe's values."""
    config = json.loads(json.dumps(config))
    config["train_micro_batch_size_per_gpu"] = shape.micro_batch_size
    config["gradient_accumulation_steps"] = shape.gradient_accumulation_steps
    config["train_batch_size"] = shape.global_batch_size
    config["gradient_clipping"] = max_grad_norm
    config.setdefault("bf16", {})["enabled"] = bf16
    config.setdefault("fp16", {})["enabled"] = False
    return config


def fill_model_sizes(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """DeepSpeed's "auto" bucket sizes from the language model's hidden size, with accelerate's own formulas.

    accelerate reads `model.config.hidden_size`, which a vision-language model keeps in its `text_config`: without this,
    `prepare` refuses an InternVL under a ZeRO-3 config that leaves the sizes on auto (ours does)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    config = getattr(getattr(model, "module", model), "config", None)
    if plugin is None or config is None or getattr(config, "hidden_size", None) or getattr(config, "hidden_sizes", None):
        return
    hidden = getattr(config.get_text_config(), "hidden_size", None)
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    if not hidden:
        return
    for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", 10 * hidden)):  # fmt: skip
        if zero.get(key) == "auto":
            zero[key] = value


def _ensure_single_process_env() -> None:
    """DeepSpeed needs a process group even for one process started without a launcher."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def build_accelerator(recipe_deepspeed: str | None, shape: BatchShape, max_grad_norm: float, bf16: bool) -> Accelerator:
    path = deepspeed_config_path(recipe_deepspeed)
    plugin, handlers = None, []
    if path or shape.world_size > 1:
        handlers.append(InitProcessGroupKwargs(backend="nccl" if torch.cuda.is_available() else "gloo"))
    if path:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise MissingPathError(f"DeepSpeed config not found: {path}") from None
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: invalid DeepSpeed JSON: {err}") from None
        _ensure_single_process_env()
        plugin = DeepSpeedPlugin(hf_ds_config=fill_deepspeed_config(raw, shape, max_grad_norm, bf16))
    return Accelerator(
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_steps=1,  # the loop accumulates itself (see loop.py)
        step_scheduler_with_optimizer=False,
    )


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def zero_stage(accelerator: Accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0
