"""Generation behind a small interface, so a vLLM backend can replace the HF one without touching trainers.

`HFGenerator` samples with `model.generate` in left-padded batches. Under ZeRO-3 it gathers the
parameters once per call (`full_weights`; peers report ~10× over generating with sharded weights), so
ranks never wait on each other inside `generate` and may produce different lengths.
A response ends at the first of the model's end tokens (`end_token_ids`: the tokenizer's EOS and every id in the
model's `generation_config.eos_token_id`, e.g. Qwen2's `<|im_end|>` and `<|endoftext|>`); one that reaches
`max_new_tokens` without any of them is flagged `truncated`.
Prompts may carry images (OpenAI image parts in their messages) for a vision-language model: they are rendered to image
tokens as in training and their tiles passed as `pixel_values` (`HFGenerator.render`).
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
from data_builders.conversations import text_messages
from data_builders.errors import UserError
from data_builders.image_tokens import ImageText
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
    logprobs: list[float] | None = None  # the sampler's log-prob of each response token, where the engine returns them (vLLM)


class Generator(Protocol):
    def generate(self, prompts: list[list[dict]], params: SamplingParams, prefixes: list[str] | None = None) -> list[list[Generation]]:
        """`params.n` generations per prompt (chat messages), in prompt order, for this rank's prompts."""
        ...

    def close(self) -> None:
        """Release what the engine holds (a vLLM engine's processes); a no-op for HF."""
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
                 submodule: str | None = None, images: ImageText | None = None):  # fmt: skip
        """`submodule` names the generating part of a composite model (the actor of an actor-critic pair); `images` is a
        vision-language model's image side (`align.engine.vision.image_text_for`), without which image prompts are refused."""
        self.model, self.tokenizer, self.accelerator, self.batch_size = model, tokenizer, accelerator, batch_size
        self.submodule, self.images = submodule, images

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
                chunk = [self.render(messages, i + k) for k, messages in enumerate(prompts[i : i + self.batch_size])]
                if prefixes is not None:
                    chunk = [(ids + tok(p, add_special_tokens=False)["input_ids"], pixels)
                             for (ids, pixels), p in zip(chunk, prefixes[i : i + self.batch_size])]  # fmt: skip
                outputs += self._batch(unwrapped, chunk, params)
        if was_training:
            model.train()
        return outputs

    def close(self) -> None:
        pass

    def render(self, messages: list[dict], index: int) -> tuple[list[int], torch.Tensor | None]:
        """The prompt's token ids ending in the assistant header, and the (tiles, 3, H, W) pixels of its images (or None).

        Image parts become their image tokens as in training (`data_builders/image_tokens.py`); a prompt with images for a
        model without them is one clear error naming the prompt (its 1-based position in this call).
        """
        text, values = text_messages(messages, "prompts", index + 1)
        if not values:
            return render_prompt(self.tokenizer, text), None
        if self.images is None:
            raise UserError(f"prompt {index + 1} has {len(values)} image(s) but the model takes no images (a text-only model)")
        refs = self.images.resolve(values, text, "prompts", index + 1)
        ids = render_prompt(self.tokenizer, self.images.substitute(text))
        return self.images.expand(ids, [0] * len(ids), refs, "prompts", index + 1)[0], torch.cat([ref.pixels() for ref in refs])

    def _batch(self, model: torch.nn.Module, chunk: list[tuple[list[int], torch.Tensor | None]], params: SamplingParams) -> list[list[Generation]]:
        tok = self.tokenizer
        greedy = params.temperature <= 0
        with_images = any(pixels is not None for _, pixels in chunk)
        # transformers repeats every input along dim 0 for n samples, but pixel values are tiles (a prompt has several):
        # with images the n copies of each prompt are made here, tiles included, and generated as one sample each
        copies = params.n if with_images and not greedy else 1
        rows = [item for item in chunk for _ in range(copies)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long, device="cpu")
        attention = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
        for r, (ids, _) in enumerate(rows):
            input_ids[r, width - len(ids) :] = torch.tensor(ids, device="cpu")
            attention[r, width - len(ids) :] = 1
        extra = {}
        if with_images:  # in row order, as the image tokens appear in the flattened batch
            extra["pixel_values"] = torch.cat([pixels for _, pixels in rows if pixels is not None]).to(self.accelerator.device)
        ends = end_token_ids(model, tok)
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
        out = model.generate(input_ids=input_ids.to(self.accelerator.device), attention_mask=attention.to(self.accelerator.device),
                             max_new_tokens=params.max_new_tokens, num_return_sequences=1 if greedy or copies > 1 else params.n,
                             # whole weights here: no rank needs the others (transformers would otherwise sync every token under ZeRO-3)
                             synced_gpus=False,
                             eos_token_id=ends, pad_token_id=tok.pad_token_id, **extra, **sampling)  # fmt: skip
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
            generations.append(Generation(chunk[j // params.n][0], response, tok.decode(response, skip_special_tokens=True), truncated))
        return [generations[k : k + params.n] for k in range(0, len(generations), params.n)]
