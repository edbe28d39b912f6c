"""`Generator` on a vLLM engine: the same prompts, sampling and `Generation` records as `HFGenerator`, faster.

Before each `generate` whose weights may have changed, the policy's weights are synced in place:
- gathered from ZeRO-3 on every rank (`full_weights`), with LoRA deltas merged into the base weights;
- written once by the main rank, and reloaded by every rank's engine (`VLLMEngine.reload`).
`version` (e.g. the trainer's optimizer-step count) skips syncs when nothing moved. The engine starts on the first call.

Samples draw their seeds from torch's generator, one per prompt. The trainer's `torch.manual_seed` then fixes them
as it fixes HF's, so a resumed run draws the same samples whatever vLLM's batching. The sampled tokens' log-probs
come back from vLLM's raw logits (before temperature), the same quantity as the trainer's `actor_logprobs`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from align.rollout.generation import Generation, SamplingParams, end_token_ids, full_weights
from align.rollout.vllm_engine import VLLMEngine
from data_builders.conversations import text_messages
from data_builders.errors import UserError
from data_builders.render import render_prompt


def policy_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain-transformers state dict of a (possibly PEFT-wrapped) causal LM, with LoRA merged, without touching the model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    deltas = {}
    for name, module in base.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight") and not getattr(module, "merged", False):
            active = [a for a in module.active_adapters if a in getattr(module, "lora_A", {})]
            if active:
                deltas[f"{name}.weight"] = sum(module.get_delta_weight(a) for a in active)
    state = {}
    for key, value in base.state_dict().items():
        if "lora_" in key or "modules_to_save" in key:
            continue
        key = key.replace(".base_layer.", ".")
        state[key] = value + deltas[key].to(value.dtype) if key in deltas else value
    return state


class VLLMGenerator:
    def __init__(self, engine: VLLMEngine, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, accelerator: Accelerator,
                 submodule: str | None = None, version: Callable[[], int] | None = None):  # fmt: skip
        """`submodule` names the generating part of a composite model (the actor); `version` tells when the weights moved."""
        self.engine, self.model, self.tokenizer, self.accelerator = engine, model, tokenizer, accelerator
        self.submodule, self.version = submodule, version
        self.last_sync_seconds = 0.0  # of this generator's latest sync (the engine's start on the first call); 0 when none was needed

    def sync(self) -> None:
        """Bring the engine to the policy's current weights (a collective under ZeRO-3: every rank calls it)."""
        # the engine remembers what it holds, so generators sharing it (a trainer's rollouts and evaluations) sync once
        held = (id(self.model), self.submodule, self.version()) if self.version is not None else None
        if self.engine.llm is not None and held is not None and held == self.engine.holds:
            self.last_sync_seconds = 0.0
            return
        began = time.perf_counter()
        acc = self.accelerator
        with full_weights(self.model, acc) as unwrapped:
            module = getattr(unwrapped, self.submodule) if self.submodule else unwrapped
            state = policy_weights(module) if acc.is_main_process else {}
            config = getattr(module, "get_base_model", lambda: module)().config
            dtype = next(module.parameters()).dtype
            if self.engine.llm is None:
                self.last_sync_seconds = self.engine.start(state, config, dtype, write=acc.is_main_process, barrier=acc.wait_for_everyone)
            else:
                if acc.is_main_process:
                    from align.rollout.vllm_engine import write_weights

                    write_weights(state, self.engine.weights_dir)
                acc.wait_for_everyone()
                self.last_sync_seconds = self.engine.reload(began)
        acc.wait_for_everyone()  # no rank writes the next weights while another engine still reads these
        self.engine.holds = held

    def generate(self, prompts: list[list[dict]], params: SamplingParams, prefixes: list[str] | None = None) -> list[list[Generation]]:
        """With `prefixes`, each assistant turn starts with its prefix and the generation continues it."""
        from vllm import SamplingParams as VLLMSampling

        if params.temperature > 2.0:
            raise UserError(f"rollout.engine=vllm samples at temperature at most 2 (vLLM's limit), got {params.temperature}; "
                            "lower the temperature or use rollout.engine=hf")  # fmt: skip
        self.sync()
        tok = self.tokenizer
        ids = []
        for i, messages in enumerate(prompts):
            text, images = text_messages(messages, "prompts", i + 1)
            if images:
                raise UserError(f"prompt {i + 1} has {len(images)} image(s): rollout.engine=vllm takes text prompts only so far; "
                                "use rollout.engine=hf for image prompts")  # fmt: skip
            prompt = render_prompt(tok, text)
            ids.append(prompt + tok(prefixes[i], add_special_tokens=False)["input_ids"] if prefixes is not None else prompt)
        greedy = params.temperature <= 0
        ends = end_token_ids(self.model, tok)
        seeds = torch.randint(0, 2**31 - 1, (len(ids),), device="cpu").tolist()
        requests = [VLLMSampling(n=1 if greedy else params.n, temperature=0.0 if greedy else params.temperature, top_p=params.top_p,
                                 top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens, stop_token_ids=ends,
                                 logprobs=0, detokenize=False, seed=seed)  # fmt: skip
                    for seed in seeds]
        outputs = self.engine.generate(ids, requests) if ids else []
        groups = []
        for prompt, out in zip(ids, outputs, strict=True):
            group = [self._generation(prompt, sample, ends) for sample in out.outputs]
            groups.append(group * params.n if greedy else group)  # n greedy samples are n copies
        return groups

    def _generation(self, prompt: list[int], sample: object, ends: list[int]) -> Generation:
        response = list(sample.token_ids)
        logprobs = [entry[token].logprob for token, entry in zip(response, sample.logprobs or [], strict=False)]
        truncated = not (response and response[-1] in ends)
        return Generation(list(prompt), response, self.tokenizer.decode(response, skip_special_tokens=True), truncated,
                          logprobs if len(logprobs) == len(response) else None)  # fmt: skip

    def close(self) -> None:
        self.engine.close()
        self.engine.holds = None
