"""Run under `accelerate launch`: trains 2 steps and writes what this rank saw to OUT/rank-<i>.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from align.config import SFTRecipe, load_recipe
from align.engine.core import Engine
from align.engine.loop import fit
from align.engine.models import load_causal_lm, prepare_frozen
from align.trainers.sft import SFTTrainer

out = Path(sys.argv[1])
recipe = load_recipe(SFTRecipe, sys.argv[2], sys.argv[3:])
engine = Engine.create(recipe)
trainer = SFTTrainer(recipe, engine)
trainer.setup()
# A frozen reference (ZeRO-3 eval config) beside the trained policy: partitioned, and exact.
plain = load_causal_lm(recipe.model, trainer.tokenizer, torch.float32, seed=7)
frozen = prepare_frozen(load_causal_lm(recipe.model, trainer.tokenizer, torch.float32, seed=7), engine.accelerator)
probe_ids = torch.tensor([trainer.samples[0].input_ids])
with torch.no_grad():
    frozen_logits = frozen(input_ids=probe_ids).logits
    reference_exact = bool(torch.allclose(frozen_logits, plain(input_ids=probe_ids).logits, atol=1e-5))
frozen_partitioned = all(hasattr(p, "ds_tensor") for p in frozen.parameters())
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
    "frozen_partitioned": frozen_partitioned,
    "frozen_exact": reference_exact,
}
(out / f"rank-{engine.rank}.json").write_text(json.dumps(record))
