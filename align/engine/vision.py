"""Vision-language models on the text path: loading, the built-in tiny InternVL, and the image side of the tokenizer.

A VLM is any checkpoint whose config has a `vision_config` (transformers' image-text-to-text models: InternVL's native
`-hf` checkpoints first), loaded with `AutoModelForImageTextToText`; everything after loading is the text path (the
same loop, losses, packing and buffer), with the batch's image tiles passed as `pixel_values` to the model's forward.
`prepare_images` makes the tokenizer and model agree on the image tokens (`data_builders/image_tokens.py`) and returns
the `ImageText` the data builders render image rows with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from align import builtin
from data_builders.errors import UserError
from data_builders.image_tokens import ImageText, add_image_tokens
from data_builders.images import ImageConfig, image_config_for

if TYPE_CHECKING:
    from align.config import ImagesConfig, ModelConfig


def is_vision_language(cfg: ModelConfig) -> bool:
    """Whether `model.name_or_path` names a vision-language model (reads the config only)."""
    if builtin.is_builtin(cfg.name_or_path):
        return builtin.is_builtin_vlm(cfg.name_or_path)
    config = AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    return getattr(config, "vision_config", None) is not None


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def has_vision(model: torch.nn.Module) -> bool:
    return getattr(_base(model).config, "vision_config", None) is not None


def image_text_for(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, images: ImagesConfig | None) -> ImageText | None:
    """`prepare_images` for a vision-language model; None for a text model (image rows are then bad rows)."""
    return prepare_images(model, tokenizer, images) if has_vision(model) else None


def image_config(images: ImagesConfig | None) -> ImageConfig:
    """The recipe's `data.images` as the data builders' frozen config."""
    if images is None:
        return ImageConfig()
    return ImageConfig(**{**dataclasses.asdict(images), "mean": tuple(images.mean), "std": tuple(images.std)})


def builtin_vlm(name: str, tokenizer: PreTrainedTokenizerBase, attn: str, seed: int,
                model_class: type = InternVLForConditionalGeneration) -> torch.nn.Module:  # fmt: skip
    """The built-in tiny InternVL (as `model_class`, a subclass of it), seeded; the tokenizer gets the image tokens first."""
    shape = builtin.builtin_shape(name)
    ids = add_image_tokens(tokenizer, ImageConfig(tile_size=shape["vision"]["image_size"][0], tokens_per_tile=shape["image_seq_length"]))
    text = dict(shape["text"], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)  # fmt: skip
    config = InternVLConfig(vision_config=shape["vision"], text_config=text, image_token_id=ids.context, image_seq_length=shape["image_seq_length"],
                            downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1)  # fmt: skip
    config._attn_implementation = attn
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = attn
    from align.engine.models import without_zero3_init

    # whole, as the built-in Llama: its sub-models come from `from_config`, which would partition them under a ZeRO-3
    # config while the outer model initialises its weights (accelerate partitions the whole model at `prepare`)
    with torch.random.fork_rng(), without_zero3_init():
        torch.manual_seed(seed)
        return model_class(config)


def load_vision_language(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype, attn: str, seed: int,
                         derive: Callable[[type], type] | None = None) -> torch.nn.Module:  # fmt: skip
    """The VLM; `derive` maps its transformers class to the class built instead (the reward model's adds a scalar head)."""
    if builtin.is_builtin(cfg.name_or_path):
        base = InternVLForConditionalGeneration
        return builtin_vlm(cfg.name_or_path, tokenizer, attn, seed, derive(base) if derive else base).to(dtype)
    loader = AutoModelForImageTextToText if derive is None else derive(vision_language_class(cfg))
    return loader.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=dtype,
                                  attn_implementation=attn)  # fmt: skip


def vision_language_class(cfg: ModelConfig) -> type:
    """The transformers class `AutoModelForImageTextToText` builds for this checkpoint (reads the config only)."""
    config = AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        raise UserError(f"model.name_or_path {cfg.name_or_path!r}: {type(config).__name__} is not an image-text-to-text model transformers "
                        "ships, so align cannot put a reward head on it")  # fmt: skip
    return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]


PARTS = {"vision": ("vision_tower",), "projector": ("multi_modal_projector",), "language": ("language_model", "lm_head")}


def freeze_parts(model: torch.nn.Module, parts: list[str]) -> None:
    """`model.freeze`: the named parts of a vision-language model stop training (transformers' common module names:
    `vision_tower`, `multi_modal_projector`, `language_model` + `lm_head`); the optimizer then holds none of their state."""
    if not parts:
        return
    inner = _base(model)
    if not has_vision(inner):
        raise UserError(f"model.freeze {parts} names parts of a vision-language model, but {type(inner).__name__} is a text model")
    modules = dict(inner.named_modules())
    for part in parts:
        found = [m for name in PARTS[part] for key, m in modules.items() if key == name or key.endswith(f".{name}")]
        if not found:
            raise UserError(f"model.freeze: {type(inner).__name__} has no {' or '.join(PARTS[part])} module for {part!r}")
        for module in found:
            module.requires_grad_(False)


def prepare_images(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, images: ImagesConfig | None) -> ImageText:
    """Image tokens in the tokenizer (added if missing, embeddings resized), the model told which one is the image's,
    and the tiling/token counts the model's vision side defines (tile side, tokens per tile)."""
    inner = _base(model)
    if getattr(inner.config, "model_type", None) != "internvl":  # another family tiles and counts image tokens its own way
        raise UserError(f"{type(inner).__name__} ({inner.config.model_type}): align's image path implements InternVL's tiling and "
                        "image tokens so far; other image-text-to-text models need their processor's rule (an ImageHandler "
                        "in data_builders/images.py)")  # fmt: skip
    text = ImageText.internvl(tokenizer, image_config_for(inner.config, image_config(images), tokenizer))
    if len(tokenizer) > inner.get_input_embeddings().num_embeddings:
        inner.resize_token_embeddings(len(tokenizer))
    inner.config.image_token_id = text.ids.context
    keep_vision_in_step(model)
    return text


def keep_vision_in_step(model: torch.nn.Module) -> None:
    """On several ranks, make a VLM run its vision tower in every forward, on one blank tile (weight 0) when the batch
    has no image: a forward pre-hook on the language model adds 0 × those features to its input embeddings.

    ZeRO-3 gathers each module's weights collectively inside its forward (and backward): a rank whose batch has an
    image runs embeddings → vision tower → language model, so every other rank must run the same modules in the same
    order, inside the same engine forward, or the gathers no longer pair up (gloo aborts, NCCL hangs: transformers
    #37186). The hook runs exactly where the real image's features would be computed.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return
    inner = _base(model)
    vision = getattr(getattr(inner, "config", None), "vision_config", None)
    language = getattr(getattr(inner, "model", None), "language_model", None)
    if vision is None or language is None or not hasattr(inner, "get_image_features"):
        return
    size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    state = {"images": False}

    def note_images(_module, args, kwargs):  # on the outer model: did this forward get pixel values?
        state["images"] = kwargs.get("pixel_values") is not None
        return None

    def idle_tile(_module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        # generation runs on whole (gathered) weights with a KV cache: no collective to pair up, so no idle tile per token
        if state["images"] or embeds is None or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return None
        out = inner.get_image_features(pixel_values=torch.zeros(1, 3, size, size, device=embeds.device),
                                       vision_feature_layer=getattr(inner.config, "vision_feature_layer", -1),
                                       vision_feature_select_strategy=getattr(inner.config, "vision_feature_select_strategy", None))  # fmt: skip
        tensors = [out] if isinstance(out, torch.Tensor) else [t for t in (out.to_tuple() if hasattr(out, "to_tuple") else out) if isinstance(t, torch.Tensor)]
        return args, {**kwargs, "inputs_embeds": embeds + 0.0 * sum(t.sum() for t in tensors).to(embeds.dtype)}

    inner.register_forward_pre_hook(note_images, with_kwargs=True)
    language.register_forward_pre_hook(idle_tile, with_kwargs=True)
