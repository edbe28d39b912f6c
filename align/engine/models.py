"""Model and tokenizer loading: built-in tiny configs, hub names or local paths, LoRA, frozen copies.

`trust_remote_code` is passed only when the recipe turns it on. Trainable models are loaded
in fp32 (mixed precision casts on GPU); frozen ones (reference, reward) in the compute dtype,
partitioned with ZeRO-3's eval config via TRL's `prepare_deepspeed`.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerBase,
)
from transformers import initialization as hf_init

from align import builtin
from align.model_paths import check_tokenizer_path
from data_builders.errors import UserError
from rewards.model import HEAD_NAMES, reward_head

if TYPE_CHECKING:
    from align.config import LoraConfig, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # CPU instructions that multiply bf16 natively


def resolve_dtype(name: str) -> torch.dtype:
    """The compute dtype; `auto` is `auto_dtype` on this machine and launch (the same answer everywhere in a process)."""
    if name != "auto":
        return DTYPES[name]
    from align.engine.accelerator import world_size_from_env

    cuda = torch.cuda.is_available()
    return auto_dtype(cuda, cuda and torch.cuda.is_bf16_supported(), cpu_flags(), world_size_from_env(), bf16_speedup)


def auto_dtype(cuda: bool, cuda_bf16: bool, flags: frozenset[str], world_size: int, measure: Callable[[], float]) -> torch.dtype:
    """`model.dtype: auto`: the fastest dtype that trains correctly here.

    GPU: bf16 where the device has it, else fp32 (fp16 would need loss scaling). CPU: fp32 unless it multiplies bf16
    natively (AVX-512 BF16 / AMX): AVX2-only CPUs emulate bf16 10-28x slower than fp32; an AVX-512 BF16 EPYC ran a
    2048² matmul 2.6x faster in bf16. With the flags, one process measures (`measure`: bf16 over fp32 matmul speed) and
    takes bf16 only when it is clearly faster; several processes decide by the flags alone, since a measurement could
    differ between ranks and every rank must train in the same dtype.
    """
    if cuda:
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if not flags & NATIVE_BF16_FLAGS:
        return torch.float32
    if world_size > 1:
        return torch.bfloat16
    return torch.bfloat16 if measure() >= 1.3 else torch.float32


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux `/proc/cpuinfo`; none elsewhere, so fp32)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


@functools.cache
def bf16_speedup(size: int = 1024, repeats: int = 3) -> float:
    """bf16 over fp32 throughput of a `size`² matmul on this process's threads (best of `repeats`; ~0.1 s)."""
    import time

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(size, size, device="cpu").to(dtype)
        a @ a  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def resolve_attention(name: str, needs_4d_mask: bool = False) -> str:
    """auto: flash-attention 2 when installed on a GPU and the batch layout needs no 4-D mask, else sdpa.

    Shared-prefix pair rows (`data.share_prefix: true`) need a 4-D mask, which flash-attention ignores; every other
    layout runs under flash-attention as one flattened row with sequence boundaries (`data_builders/attention_layout.py`).
    An explicit name is kept as given; `resolve_share_prefix` says when it cannot run the layout asked for.
    """
    if name != "auto":
        return name
    if not needs_4d_mask and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    check_tokenizer_path(cfg)  # a missing local path is an error naming it, not a hub lookup
    source = cfg.tokenizer or (str(builtin.TOKENIZER_DIR) if builtin.is_builtin(cfg.name_or_path) else cfg.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise UserError(f"tokenizer {source!r} has no chat template; set model.tokenizer to one that has")
    return tokenizer


def builtin_config(name: str, tokenizer: PreTrainedTokenizerBase, attn: str, **extra: object) -> LlamaConfig:
    config = LlamaConfig(
        **builtin.builtin_shape(name),
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **extra,
    )
    config._attn_implementation = attn
    return config


def eos_ids(first: int | None, kept: int | list[int] | None) -> list[int]:
    """`first` (the tokenizer's end-of-turn), then every id of `kept` (a config's `eos_token_id`: an int or a list)."""
    kept = [kept] if isinstance(kept, int) else list(kept or [])
    return [i for i in dict.fromkeys([first, *kept]) if i is not None]


def load_causal_lm(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A causal LM from a built-in shape (random init, seeded) or from pretrained weights; a vision-language model
    (`align/engine/vision.py`) is loaded as one, since its language model is what every loss reads."""
    attn = resolve_attention(cfg.attn_implementation)
    from align.engine.vision import freeze_parts, is_vision_language, load_vision_language

    if is_vision_language(cfg):  # an image-text-to-text model: the same text path, tiles passed as pixel_values
        model = load_vision_language(cfg, tokenizer, dtype, attn, seed)
    elif builtin.is_builtin(cfg.name_or_path):
        config = builtin_config(cfg.name_or_path, tokenizer, attn)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=dtype,
            attn_implementation=attn,
        )
    if model.generation_config is not None:  # the tokenizer's end-of-turn first, every EOS the model already has kept
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        ids = eos_ids(tokenizer.eos_token_id, model.generation_config.eos_token_id)
        model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else (ids or None)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, cfg.gradient_checkpointing, target_modules=lora_targets(model, cfg.lora))
    freeze_parts(model, cfg.freeze)
    return model


def load_reward_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A scalar-head model (`AutoModelForSequenceClassification(num_labels=1)`): built-in, hub or local (e.g. our SFT export,
    as InternLM2 starts its RM from the SFT model); a newly created head is zero-initialised, as xtuner does.

    A vision-language model has no sequence-classification class: it is loaded as one (`load_vision_language`) with a
    `score` head beside its LM head (`with_score_head`), so scoring reads hidden states through the same path as a text RM.
    """
    attn = resolve_attention(cfg.attn_implementation)
    from align.engine.vision import freeze_parts, is_vision_language, load_vision_language

    new_head = False
    if is_vision_language(cfg):  # the head comes back from a reward model's export, or starts at zero (`with_score_head`)
        model = load_vision_language(cfg, tokenizer, dtype, attn, seed, derive=with_score_head)
        freeze_lm_head(model)
    elif builtin.is_builtin(cfg.name_or_path):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForSequenceClassification(builtin_config(cfg.name_or_path, tokenizer, attn, num_labels=1)).to(dtype)
        new_head = True
    else:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            cfg.name_or_path,
            num_labels=1,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=dtype,
            attn_implementation=attn,
            output_loading_info=True,
        )
        new_head = any(k.split(".")[0] in HEAD_NAMES for k in info["missing_keys"])
    if new_head:
        torch.nn.init.zeros_(reward_head(model).weight)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:  # adapters on the backbone; the scalar head trains in full (peft's modules_to_save for SEQ_CLS)
        model = apply_lora(model, cfg.lora, cfg.gradient_checkpointing, task_type="SEQ_CLS", target_modules=lora_targets(model, cfg.lora))
    freeze_parts(model, cfg.freeze)
    return model


@functools.cache
def with_score_head(base: type) -> type:
    """`base` (a transformers image-text-to-text class) with `score`, a bias-free `Linear(hidden, 1)`, beside its LM head.

    A subclass rather than a wrapper module: `save_pretrained` writes `score.weight` with the other weights and
    `from_pretrained` restores it (a checkpoint without one, e.g. an SFT export, gets a zero head through `_init_weights`),
    ZeRO-3 partitions it as any parameter of the model, and the LoRA export, which rebuilds the model from its config
    (`type(model)(config)`), gets the head back. Saved checkpoints name this class in `architectures`; they still load
    as plain `AutoModelForImageTextToText` models (the head is then an unused key).
    """

    class WithScore(base):
        def __init__(self, config):
            super().__init__(config)
            self.score = torch.nn.Linear(config.get_text_config().hidden_size, 1, bias=False)
            self._init_weights(self.score)

        def _init_weights(self, module: torch.nn.Module) -> None:
            if module is getattr(self, "score", None):
                hf_init.zeros_(module.weight)  # skips a weight `from_pretrained` loaded
            else:
                super()._init_weights(module)

        def forward(self, *args, logits_to_keep: int | torch.Tensor = 1, **kwargs):
            """The score reads the final hidden states: the LM head runs on one position, not on every token × vocabulary."""
            return super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)

    WithScore.__name__ = WithScore.__qualname__ = f"{base.__name__}WithScore"
    return WithScore


def freeze_lm_head(model: torch.nn.Module) -> None:
    """A reward model never reads its LM head: frozen (unless tied to the input embeddings, which do train), so AdamW keeps
    no state for vocabulary × hidden weights and DDP does not wait for a gradient that never comes."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not embeddings.weight:
        head.requires_grad_(False)


def lora_targets(model: torch.nn.Module, lora: LoraConfig) -> str | None:
    """On a vision-language model, the adapters' target modules inside its language model only (else peft's own match)."""
    from align.engine.vision import has_vision

    return language_model_targets(lora.target_modules) if has_vision(model) else None


def language_model_targets(names: Sequence[str]) -> str:
    """peft's target regex for the modules `names` inside the language model only.

    A VLM's vision tower reuses the same names (`q_proj`, ...); the reward is read from the language model's hidden
    states, so adapters go there (the vision tower and projector stay as the SFT model left them, frozen).
    """
    return rf"(.*\.)?language_model\..*\.({'|'.join(map(re.escape, names))})"


def apply_lora(model: torch.nn.Module, lora: LoraConfig, gradient_checkpointing: bool = False, task_type: str = "CAUSAL_LM",
               target_modules: str | None = None) -> torch.nn.Module:  # fmt: skip
    """peft adapters on `lora.target_modules` (or `target_modules`, a regex peft full-matches against module names)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if gradient_checkpointing:
        model.enable_input_require_grads()
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=target_modules or list(lora.target_modules), task_type=task_type)  # fmt: skip
    return get_peft_model(model, peft_cfg)


def prepare_frozen(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """Freeze a model for inference: ZeRO-3 eval partitioning under DeepSpeed, else moved to the device."""
    model.eval()
    model.requires_grad_(False)
    if accelerator.state.deepspeed_plugin is not None:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    return model.to(accelerator.device)


@contextmanager
def without_zero3_init() -> Iterator[None]:
    """Load a full replica even while a ZeRO-3 config is active (transformers would partition it at load time via `zero.Init`).

    For models every rank keeps whole and uses outside DeepSpeed, e.g. the RLHF reward model, which the fast path trains locally.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)

