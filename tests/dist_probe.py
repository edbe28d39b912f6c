"""Run under `accelerate launch`: trains 2 steps and writes what this rank saw to OUT/rank-<i>.json."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from align.config import SFTRecipe, load_recipe
from align.engine.core import Engine
from align.engine.loop import fit
from align.trainers.sft import SFTTrainer

out = Path(sys.argv[1])
recipe = load_recipe(SFTRecipe, sys.argv[2], sys.argv[3:])
engine = Engine.create(recipe)
trainer = SFTTrainer(recipe, engine)
trainer.setup()
result = fit(engine, trainer)
result["logger"].close()
params = list(trainer.model.parameters())
record = {
    "process_index": engine.rank,
    "num_processes": engine.world_size,
    "dist_world": dist.get_world_size(),
    "rows_step0": sum(result["plan"].micro_batches(0, engine.rank), []),
    "partitioned": all(hasattr(p, "ds_tensor") for p in params),
    "local_numel": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
    "full_numel": sum(p.ds_numel for p in params if hasattr(p, "ds_numel")),
}
(out / f"rank-{engine.rank}.json").write_text(json.dumps(record))
