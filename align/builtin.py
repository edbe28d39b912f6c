"""Built-in assets for runs with no network: the tokenizer and tiny Llama-style configs."""

from __future__ import annotations

from pathlib import Path

from data_builders.errors import UserError

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"
PREFIX = "builtin:"

# Llama-style shapes sized for 2 CPU cores; `medium` (~0.4B) is for GPU benchmarks only.
CONFIGS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    "small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    # ~34M: where matrix multiplies dominate a CPU step (benchmarks at a realistic shape; a few steps in a minute or two)
    "base": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8),
    "medium": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16),
}


# A tiny InternVL (native transformers format: vision tower, pixel-shuffle projector, Qwen2 language model) for tests
# and quickstarts of the image path: 56-px tiles of 4×4 patches, 4 tokens per tile after the 0.5 pixel shuffle.
# `vlm-tiny` is the same model under the generic name.
VLM_CONFIGS: dict[str, dict] = {
    "internvl-tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=[56, 56], patch_size=[14, 14]),
        text=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        image_seq_length=4,
    ),
}
VLM_CONFIGS["vlm-tiny"] = VLM_CONFIGS["internvl-tiny"]


def is_builtin_vlm(name: str) -> bool:
    return is_builtin(name) and name[len(PREFIX) :] in VLM_CONFIGS


def is_builtin(name: str) -> bool:
    return name.startswith(PREFIX)


def builtin_shape(name: str) -> dict:
    size = name[len(PREFIX) :]
    if size in VLM_CONFIGS:
        return dict(VLM_CONFIGS[size])
    if size not in CONFIGS:
        raise UserError(f"unknown built-in model {name!r}; choose one of {', '.join(PREFIX + k for k in [*CONFIGS, *VLM_CONFIGS])}")
    return dict(CONFIGS[size])
