"""The policy's own samples for MPO pairs and rejection-sampling SFT, drawn through the shared rollout buffer.

Both trainers sample in `setup` from the model they are about to train: prompts are sharded across ranks,
`collect_rollouts` samples and scores them with the task verifier alone (`verifier_routes`: no reward model),
and each rank keeps its samples in a `RolloutBuffer` saved beside the run (`rollouts-rankR.{json,safetensors}`),
so what a run trained on can be inspected or rebuilt from disk. The rows built from a rank's buffer are then
gathered and sorted, so every rank trains on identical data whatever the world size.

`rows_once` saves those gathered rows (`run_dir/policy_sample_rows.json`, with the recipe fingerprint) and a
later start of the same recipe reads them back instead of sampling again: sampling is not reproducible across
hardware, world sizes or library versions, and a resumed run must train on exactly the rows it started with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers import PreTrainedTokenizerBase

from align.config import PolicySamplingConfig, SyntheticConfig
from align.engine.core import Engine
from align.evaluation import load_prompts
from align.rollout.buffer import RolloutBuffer
from align.rollout.collect import collect_rollouts, verifier_routes
from align.rollout.engines import make_generator
from align.rollout.generation import Generator, SamplingParams
from align.run_state import POLICY_ROWS, read_json, recipe_fingerprint
from data_builders.image_tokens import ImageText
from rewards.router import RewardRouter


def buffer_name(rank: int) -> str:
    """Each rank saves its own shard of the samples; `RolloutBuffer.load(run_dir, buffer_name(r))` reads it back."""
    return f"rollouts-rank{rank}"


def sample_rollouts(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    engine: Engine,
    cfg: PolicySamplingConfig,
    synthetic: SyntheticConfig,
    seed: int,
    round_index: int = 0,
    images: ImageText | None = None,
) -> tuple[RolloutBuffer, Generator]:
    """This rank's share of `cfg.num_prompts` train prompts, `cfg.samples_per_prompt` scored samples each, in a saved buffer.

    Prompt ids are fixed before sharding (`load_prompts`: the prompt's `uid`, else its index), so groups never collide across ranks.
    The generator is returned for follow-up generations on the same weights (Dropout-NTP continuations). `images` (a VLM's
    image side) lets prompts carry images.
    """
    problems = load_prompts(cfg.prompts_path, synthetic, cfg.num_prompts, split="train")
    mine = problems[engine.rank :: engine.world_size]
    torch.manual_seed(seed * 1009 + engine.rank + 7919 * round_index)  # per rank and round: different draws, reproducible
    generator = make_generator(model, tokenizer, engine, cfg.batch_size, images=images)
    router = RewardRouter(verifier_routes(sorted({p.get("condition") or "default" for p in problems})))
    params = SamplingParams(cfg.max_new_tokens, cfg.samples_per_prompt, cfg.temperature, cfg.top_p)
    buffer = RolloutBuffer()
    buffer.add(collect_rollouts(generator, router, mine, params, round_index=round_index, policy_version=round_index))
    buffer.save(engine.run_dir, buffer_name(engine.rank))
    return buffer, generator


def rows_once(engine: Engine, recipe: Any, draw: Callable[[], tuple[list[dict], dict[str, Any]]]) -> tuple[list[dict], dict[str, Any]]:
    """(rows, stats) of the policy's samples: the ones an earlier start of this recipe saved, else `draw()`, saved by rank 0.

    `draw` samples, builds and gathers the rows (the same on every rank). Every rank reads the file before any
    rank could write it (the draw gathers across ranks), so all ranks agree on whether to sample.
    """
    path, fingerprint = engine.run_dir / POLICY_ROWS, recipe_fingerprint(recipe)
    saved = read_json(path)
    if saved is not None and saved.get("fingerprint") == fingerprint:
        if engine.is_main:
            print(f"align: training on the {len(saved['rows'])} rows an earlier start sampled ({path}); not sampling again", flush=True)
        return saved["rows"], saved["stats"]
    rows, stats = draw()
    rows, stats = json.loads(json.dumps(rows)), json.loads(json.dumps(stats))  # exactly what a later start reads back
    if engine.is_main:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "rows": rows, "stats": stats}))
        os.replace(tmp, path)
    engine.accelerator.wait_for_everyone()
    return rows, stats


def gather_rows(engine: Engine, rows: list[dict], key: Callable[[dict], Any]) -> list[dict]:
    """Every rank's rows, sorted by `key`: the same list on every rank, independent of how prompts were sharded."""
    rows = gather_object(rows) if engine.world_size > 1 else list(rows)
    return sorted(rows, key=key)


def sum_over_ranks(engine: Engine, counts: list[int]) -> list[int]:
    if engine.world_size == 1:
        return list(counts)
    return [int(x) for x in engine.accelerator.reduce(torch.tensor(counts, device=engine.device), "sum").tolist()]


def buffer_counts(buffer: RolloutBuffer) -> list[int]:
    """[samples, verifier-correct, truncated] of one rank's buffer."""
    return [len(buffer), sum(bool(r.correct) for r in buffer.rollouts), sum(r.truncated for r in buffer.rollouts)]
