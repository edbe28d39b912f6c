"""Generation behind a small interface, so a vLLM backend can replace the HF one without touching trainers.

`HFGenerator` samples with `model.generate` in left-padded batches. Under ZeRO-3 it gathers the
parameters once per call (`full_weights`; peers report ~10× over generating with sharded weights), so
ranks never wait on each other inside `generate` and may produce different lengths.
A response ends at the first of the model's end tokens (`end_token_ids`: the tokenizer's EOS and every id in the
model's `generation_config.eos_token_id`, e.g. Qwen2's `<|im_end|>` and `<|endoftext|>`); one that reaches
`max_new_tokens` without any of them is flagged `truncated`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from align.engine.models import eos_ids
from data_builders.render import render_prompt


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 48
    n: int = 1
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    # 0 = no top-k: samples come from the distribution the losses score (full softmax); transformers would otherwise
    # apply its default top-k of 50 (or a checkpoint's own), an off-policy bias in every PPO/GRPO ratio
    top_k: int = 0


@dataclass
class Generation:
    prompt_ids: list[int]
    response_ids: list[int]  # up to and including the end-of-turn token when there is one
    text: str  # the response without special tokens
    truncated: bool


class Generator(Protocol):
    def generate(self, prompts: list[list[dict]], params: SamplingParams, prefixes: list[str] | None = None) -> list[list[Generation]]:
        """`params.n` generations per prompt (chat messages), in prompt order, for this rank's prompts."""
        ...


@contextmanager
def full_weights(model: torch.nn.Module, accelerator: Accelerator) -> Iterator[torch.nn.Module]:
    """The model with all its weights present for `generate`, gathered once for the whole block.

    Prepared under ZeRO-3: TRL's `unwrap_model_for_generation`. Not prepared but partitioned at load time
    (`from_pretrained` under an active ZeRO-3 config runs `zero.Init`): DeepSpeed's `GatheredParameters`.
    Otherwise the model already holds its weights.
    """
    if accelerator.unwrap_model(model) is not model:
        from trl.models.utils import unwrap_model_for_generation

        with unwrap_model_for_generation(model, accelerator) as unwrapped:
            yield unwrapped
    elif any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield model
    else:
        yield model


def end_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS first, then every EOS id of the model's generation config (an int or a list)."""
    return eos_ids(tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None))


class HFGenerator:
    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, accelerator: Accelerator, batch_size: int = 64,
                 submodule: str | None = None):  # fmt: skip
        """`submodule` names the generating part of a composite model (the actor of an actor-critic pair)."""
        self.model, self.tokenizer, self.accelerator, self.batch_size = model, tokenizer, accelerator, batch_size
        self.submodule = submodule

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], params: SamplingParams, prefixes: list[str] | None = None) -> list[list[Generation]]:
        """With `prefixes`, each assistant turn starts with its prefix and the generation continues it."""
        model, tok = self.model, self.tokenizer
        was_training = model.training
        model.eval()
        outputs: list[list[Generation]] = []
        with full_weights(model, self.accelerator) as unwrapped:
            if self.submodule:
                unwrapped = getattr(unwrapped, self.submodule)
            for i in range(0, len(prompts), self.batch_size):
                chunk = [render_prompt(tok, messages) for messages in prompts[i : i + self.batch_size]]
                if prefixes is not None:
                    chunk = [ids + tok(p, add_special_tokens=False)["input_ids"] for ids, p in zip(chunk, prefixes[i : i + self.batch_size])]
                outputs += self._batch(unwrapped, chunk, params)
        if was_training:
            model.train()
        return outputs

    def _batch(self, model: torch.nn.Module, chunk: list[list[int]], params: SamplingParams) -> list[list[Generation]]:
        tok = self.tokenizer
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long, device="cpu")
        attention = torch.zeros((len(chunk), width), dtype=torch.long, device="cpu")
        for r, ids in enumerate(chunk):
            input_ids[r, width - len(ids) :] = torch.tensor(ids, device="cpu")
            attention[r, width - len(ids) :] = 1
        ends = end_token_ids(model, tok)
        greedy = params.temperature <= 0
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
        out = model.generate(input_ids=input_ids.to(self.accelerator.device), attention_mask=attention.to(self.accelerator.device),
                             max_new_tokens=params.max_new_tokens, num_return_sequences=1 if greedy else params.n,
                             # whole weights here: no rank needs the others (transformers would otherwise sync every token under ZeRO-3)
                             synced_gpus=False,
                             eos_token_id=ends, pad_token_id=tok.pad_token_id, **sampling)  # fmt: skip
        if greedy and params.n > 1:  # n greedy samples are n copies
            out = out.repeat_interleave(params.n, dim=0)
        generations = []
        for j, row in enumerate(out[:, width:].tolist()):
            end = next((k + 1 for k, token in enumerate(row) if token in ends), len(row))
            response = row[:end]
            truncated = not (response and response[-1] in ends)
            if truncated:  # without an end-of-turn the row may still end in padding (another row ran longer)
                while response and response[-1] == tok.pad_token_id:
                    response.pop()
            generations.append(Generation(chunk[j // params.n], response, tok.decode(response, skip_special_tokens=True), truncated))
        return [generations[k : k + params.n] for k in range(0, len(generations), params.n)]
