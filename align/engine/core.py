"""The Engine: one accelerator, the batch shape, the compute dtype and the run directory of a job."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from align.config import save_resolved
from align.engine.accelerator import BatchShape, build_accelerator, resolve_batch_shape, uses_deepspeed, world_size_from_env
from align.engine.models import resolve_dtype


@dataclass
class Engine:
    recipe: Any
    accelerator: Accelerator
    shape: BatchShape
    dtype: torch.dtype
    run_dir: Path

    @classmethod
    def create(cls, recipe: Any) -> Engine:
        train = recipe.train
        shape = resolve_batch_shape(train.micro_batch_size, train.gradient_accumulation_steps, train.global_batch_size, world_size_from_env())
        if not torch.cuda.is_available():  # before `auto` measures the dtype on these threads; OMP_NUM_THREADS wins when set
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // shape.world_size))
        dtype = resolve_dtype(recipe.model.dtype)
        accelerator = build_accelerator(recipe.engine.deepspeed, shape, recipe.optim.max_grad_norm, dtype == torch.bfloat16)
        if accelerator.num_processes != shape.world_size:
            raise RuntimeError(f"accelerate sees {accelerator.num_processes} processes but WORLD_SIZE is {shape.world_size}")
        set_seed(train.seed)
        run_dir = Path(recipe.output_dir)
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(recipe, run_dir / "config.yaml")
        accelerator.wait_for_everyone()
        return cls(recipe, accelerator, shape, dtype, run_dir)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def deepspeed(self) -> bool:
        return uses_deepspeed(self.accelerator)
