"""Task accuracy on held-out prompts, per condition, by greedy generation and rule-based scoring.

Prompts are sharded across ranks. Under ZeRO-3 the parameters are gathered once for the whole
generation pass (TRL's `unwrap_model_for_generation`), so ranks generate independently and
may stop at different lengths without waiting on each other.
"""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import PreTrainedTokenizerBase

from data_builders.render import render_prompt
from data_builders.synthetic import SyntheticTask


def load_prompts(path: str | None, synthetic, num_prompts: int, split: str = "heldout") -> list[dict]:
    """Prompts with ground truth: a JSONL file (messages, condition, answer, unsafe) or the synthetic suite's `split`."""
    if path:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        return rows[:num_prompts]
    task = SyntheticTask(synthetic.seed, synthetic.digits, synthetic.concise_share, synthetic.system_share)
    return task.rl_prompts(num_prompts, split=split)


@torch.no_grad()
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
) -> list[list[str]]:
    """`n` completions per prompt for this rank's prompts: greedy at temperature 0, else sampled.

    With `prefixes`, each prompt's assistant turn starts with its prefix and the completion continues it.

    Under ZeRO-3 the parameters are gathered once for the whole call (`unwrap_model_for_generation`),
    so ranks never wait on each other inside `generate` and may produce different lengths.
    """
    from trl.models.utils import unwrap_model_for_generation

    outputs: list[list[str]] = []
    was_training = model.training
    model.eval()
    wrapped = accelerator.unwrap_model(model) is not model  # a model not yet prepared holds all its weights already
    with unwrap_model_for_generation(model, accelerator) if wrapped else nullcontext(model) as unwrapped:
        for i in range(0, len(prompts), batch_size):
            chunk = [render_prompt(tokenizer, messages) for messages in prompts[i : i + batch_size]]
            if prefixes is not None:
                chunk = [ids + tokenizer(p, add_special_tokens=False)["input_ids"] for ids, p in zip(chunk, prefixes[i : i + batch_size])]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, ids in enumerate(chunk):
                input_ids[r, width - len(ids) :] = torch.tensor(ids)
                attention[r, width - len(ids) :] = 1
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
            out = unwrapped.generate(
                input_ids=input_ids.to(accelerator.device),
                attention_mask=attention.to(accelerator.device),
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            outputs += [texts[j : j + n] for j in range(0, len(texts), n)]
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
    texts = [t[0] for t in sample(model, tokenizer, [p["messages"] for p in mine], accelerator, max_new_tokens, batch_size)]  # greedy
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
