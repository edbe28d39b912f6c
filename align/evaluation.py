"""Task accuracy on held-out prompts, per condition, by greedy generation and rule-based scoring.

Prompts are sharded across ranks. Under ZeRO-3 the parameters are gathered once for the whole
generation pass (TRL's `unwrap_model_for_generation`), so ranks generate independently and
may stop at different lengths without waiting on each other.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import PreTrainedTokenizerBase

from data_builders.render import render_prompt
from data_builders.synthetic import SyntheticTask


def load_prompts(path: str | None, synthetic, num_prompts: int) -> list[dict]:
    """Held-out prompts: a JSONL file (messages, condition, answer, unsafe) or the synthetic suite."""
    if path:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        return rows[:num_prompts]
    task = SyntheticTask(synthetic.seed, synthetic.digits, synthetic.concise_share, synthetic.system_share)
    return task.rl_prompts(num_prompts, split="heldout")


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict]],
    accelerator: Accelerator,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy completions for this rank's prompts (left-padded batches)."""
    from trl.models.utils import unwrap_model_for_generation

    outputs: list[str] = []
    was_training = model.training
    model.eval()
    with unwrap_model_for_generation(model, accelerator) as unwrapped:
        for i in range(0, len(prompts), batch_size):
            chunk = [render_prompt(tokenizer, messages) for messages in prompts[i : i + batch_size]]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, ids in enumerate(chunk):
                input_ids[r, width - len(ids) :] = torch.tensor(ids)
                attention[r, width - len(ids) :] = 1
            out = unwrapped.generate(
                input_ids=input_ids.to(accelerator.device),
                attention_mask=attention.to(accelerator.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    if was_training:
        model.train()
    return outputs


def task_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[dict],
    accelerator: Accelerator,
    max_new_tokens: int = 48,
    batch_size: int = 100,
) -> dict[str, Any]:
    """{"accuracy", "accuracy_by_condition", "num_prompts", "samples"} over all ranks' prompts."""
    mine = problems[accelerator.process_index :: accelerator.num_processes]
    texts = generate(model, tokenizer, [p["messages"] for p in mine], accelerator, max_new_tokens, batch_size)
    scored = [
        {"condition": p.get("condition") or "default", "score": SyntheticTask.score(p, text), "response": text}
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
