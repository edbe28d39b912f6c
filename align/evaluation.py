"""Task accuracy on held-out prompts, per condition, by greedy generation and rule-based scoring.

Prompts are sharded across ranks. Under ZeRO-3 the parameters are gathered once for the whole
generation pass (TRL's `unwrap_model_for_generation`), so ranks generate independently and
may stop at different lengths without waiting on each other.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import PreTrainedTokenizerBase

from align.rollout.engines import make_generator
from align.rollout.generation import HFGenerator, SamplingParams
from data_builders.bad_rows import BadRowError
from data_builders.conversations import row_images, with_image_parts
from data_builders.image_tokens import ImageText
from data_builders.images import base_dir_of
from data_builders.readers import read_rows
from data_builders.synthetic import make_task
from rewards.verifiers import task_score


def load_prompts(path: str | None, synthetic, num_prompts: int, split: str = "heldout") -> list[dict]:
    """Prompts with ground truth: a JSONL file (messages, condition, answer, unsafe; images as OpenAI parts or a row's
    `images` list with `<image>` markers) or the built-in task's `split`.

    A row without a `uid` gets `prompt-<index in the file>` here, before any rank takes its shard, so a prompt's id
    (which groups its samples in the rollout buffer) is the same on every rank and never collides across ranks.
    """
    if path:  # read like every data file: a missing, empty, non-UTF-8 or non-JSON file or row is one clear error naming it
        rows = []
        for origin, row, raw in read_rows(path, max_rows=num_prompts):
            if not isinstance(raw, dict) or not isinstance(raw.get("messages"), list) or not raw["messages"]:
                raise BadRowError(origin, row, "messages", "a prompt row needs a non-empty `messages` list (and optionally "
                                  "condition, answer, unsafe, uid)")  # fmt: skip
            listed = row_images(raw, origin, row)
            if listed or any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in raw["messages"]):
                # images as self-contained parts: the prompt travels into rollouts and sampled rows, far from its file
                raw = {k: v for k, v in raw.items() if k not in ("images", "image")}
                raw["messages"] = with_image_parts(raw["messages"], listed, base_dir_of(origin), origin, row)
            rows.append(raw)
        return [{**row, "uid": str(row.get("uid") or f"prompt-{i}")} for i, row in enumerate(rows)]
    task = make_task(synthetic)
    return task.rl_prompts(num_prompts, split=split)


def sample(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict]],
    accelerator: Accelerator,
    max_new_tokens: int,
    batch_size: int,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    prefixes: list[str] | None = None,
    images: ImageText | None = None,
    engine: Any = None,
) -> list[list[str]]:
    """Texts of `n` completions per prompt for this rank's prompts (greedy at temperature 0).

    With the job's `engine` the recipe's `rollout.engine` generates (`make_generator`), else HF `generate`.
    """
    generator = make_generator(model, tokenizer, engine, batch_size, images=images) if engine is not None else \
        HFGenerator(model, tokenizer, accelerator, batch_size, images=images)  # fmt: skip
    out = generator.generate(prompts, SamplingParams(max_new_tokens, n, temperature, top_p), prefixes)
    return [[g.text for g in group] for group in out]


def task_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[dict],
    accelerator: Accelerator,
    max_new_tokens: int = 48,
    batch_size: int = 100,
    images: ImageText | None = None,
    engine: Any = None,
) -> dict[str, Any]:
    """{"accuracy", "accuracy_by_condition", "num_prompts", "samples"} over all ranks' prompts (`images`: a VLM's image side)."""
    mine = problems[accelerator.process_index :: accelerator.num_processes]
    texts = [t[0] for t in sample(model, tokenizer, [p["messages"] for p in mine], accelerator, max_new_tokens, batch_size, images=images,
                                  engine=engine)]  # fmt: skip
    scored = [
        {"condition": p.get("condition") or "default", "score": task_score(p, text), "response": text}
        for p, text in zip(mine, texts)
    ]
    scored = gather_object(scored) if accelerator.num_processes > 1 else scored
    by_condition: dict[str, list[float]] = defaultdict(list)
    for item in scored:
        by_condition[item["condition"]].append(item["score"])
    total = [s["score"] for s in scored]
    return {
        "accuracy": sum(total) / max(1, len(total)),
        "accuracy_by_condition": {c: sum(v) / len(v) for c, v in sorted(by_condition.items())},
        "num_prompts": len(total),
        "samples": scored[:6],
    }
