"""Which generator a job samples with (`rollout.engine`), and the one vLLM engine each process keeps for its run.

`auto` picks vLLM when it is installed and the model takes text prompts, else HF `generate`, with one line saying
why. `vllm` without vLLM installed is an error naming the install command. One engine per process and run directory:
a trainer's rollouts and its evaluations share it (a second engine would double the memory and the start-up).
"""

from __future__ import annotations

import atexit
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from align.config import RolloutConfig
from align.rollout.generation import Generator, HFGenerator
from align.rollout.vllm_engine import INSTALL, VLLMEngine, check_head_size, require_vllm, vllm_installed
from data_builders.errors import UserError
from data_builders.image_tokens import ImageText

_ENGINES: dict[str, VLLMEngine] = {}
_announced: set[str] = set()


def resolve_engine(rollout: RolloutConfig, takes_images: bool, config: Any = None) -> tuple[str, str | None]:
    """(hf | vllm, the line that explains an `auto` fallback to HF or None); `config`: the generating model's."""
    if rollout.engine == "hf":
        return "hf", None
    if rollout.engine == "vllm":
        require_vllm()
        if takes_images:
            raise UserError("rollout.engine=vllm takes text-only models so far; this one takes images: use rollout.engine=hf")
        if config is not None:
            check_head_size(config)
        return "vllm", None
    if not vllm_installed():
        return "hf", f"align: rollout.engine=auto: vLLM is not installed, generating with HF (for vLLM rollouts: {INSTALL})"
    if takes_images:
        return "hf", "align: rollout.engine=auto: vLLM rollouts take text-only models so far, generating with HF for this one"
    if config is not None:
        try:
            check_head_size(config)
        except UserError as error:
            why = str(error).removeprefix("rollout.engine=vllm: ").removesuffix("; use rollout.engine=hf")
            return "hf", f"align: rollout.engine=auto: generating with HF: {why}"
    return "vllm", None


def make_generator(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, engine: Any, batch_size: int, submodule: str | None = None,
                   images: ImageText | None = None, version: Callable[[], int] | None = None) -> Generator:  # fmt: skip
    """The recipe's generator for `model` (`engine`: the job's `align.engine.core.Engine`)."""
    rollout = getattr(engine.recipe, "rollout", None) or RolloutConfig()
    kind, note = resolve_engine(rollout, images is not None, generating_config(model, engine, submodule))
    if note and engine.is_main and note not in _announced:
        print(note, flush=True)
        _announced.add(note)
    if kind == "hf":
        return HFGenerator(model, tokenizer, engine.accelerator, batch_size, submodule=submodule, images=images)
    from align.rollout.vllm_generator import VLLMGenerator

    return VLLMGenerator(shared_engine(engine, rollout), model, tokenizer, engine.accelerator, submodule=submodule, version=version)


def generating_config(model: torch.nn.Module, engine: Any, submodule: str | None) -> Any:
    """The config of the model that generates (the actor of an actor-critic pair), through any DeepSpeed/PEFT wrapping."""
    inner = engine.accelerator.unwrap_model(model) if engine.accelerator is not None else model
    inner = getattr(inner, submodule) if submodule else inner
    return getattr(inner, "config", None)


def rollout_summary(generator: Generator) -> dict[str, Any]:
    """The engine a job generated with and, for vLLM, its start and weight-reload seconds (for `summary.json`)."""
    engine = getattr(generator, "engine", None)
    if not isinstance(engine, VLLMEngine):
        return {"engine": "hf"}
    syncs = engine.sync_seconds
    return {"engine": "vllm", "start_s": round(syncs[0], 3) if syncs else None, "reloads": len(syncs[1:]),
            "reload_mean_s": round(sum(syncs[1:]) / len(syncs[1:]), 4) if syncs[1:] else None}  # fmt: skip


def shared_engine(engine: Any, rollout: RolloutConfig) -> VLLMEngine:
    """This process's vLLM engine for the run (started on first use by its generator)."""
    key = str(engine.run_dir)
    if key not in _ENGINES:
        for other in list(_ENGINES):  # one engine per process: a new run's replaces the last
            release(other)
        _ENGINES[key] = VLLMEngine(engine.run_dir / "vllm", rollout, engine.recipe.train.seed, engine.rank, engine.world_size)
    return _ENGINES[key]


def release(key: str | None = None) -> None:
    """Shut down the engine of one run directory (all when None): frees its memory and processes."""
    for name in [key] if key is not None else list(_ENGINES):
        live = _ENGINES.pop(name, None)
        if live is not None:
            live.close()


atexit.register(release)
