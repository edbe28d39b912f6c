"""How packed rows reach a model's attention: the one place that knows what each attention implementation supports.

`attention_layout(name)` says what an implementation takes, read from transformers' own registries:
- a dense 4-D mask (its mask interface is `sdpa_mask` or `eager_mask`): rows go as they are; packed documents are kept
  apart by restarting `position_ids` (transformers builds the block mask, sliding windows included, from positions);
  shared-prefix pair rows add a 4-D mask per layer type (`pair_layer_masks`);
- sequence boundaries (any "flash" implementation, transformers' own test): transformers finds documents only in a
  single row, so a micro-batch is flattened into one padding-free row with explicit `cu_seq_lens_q/k` and
  `max_length_q/k`, as `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` does; it takes no 4-D mask;
- positions only (flex attention, any other registered mask interface): rows as they are, no 4-D mask;
- nothing (no mask interface registered): transformers gives such an attention no mask at all, so a row may hold
  one document only.

A custom 4-D mask passed as `attention_mask` is used as-is by every layer, so it would silently drop a sliding
window. The pair masks are therefore the pair structure AND, per layer type, the mask transformers builds for one
plain sequence, read at each (query, key) pair of positions, which is what a separate forward of each side sees.
Several layer types go to the model as a `{layer_type: mask}` mapping, which transformers' models with per-layer
masks accept; a model whose forward does not, or whose layers are not attention (recurrent, linear), cannot share
a prefix and the pair rows fall back to two documents per pair (`shared_prefix_unsupported` says why).
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import masking_utils
from transformers.utils.generic import is_flash_attention_requested

from data_builders.errors import UserError

MaskForm = Literal["bool", "additive"]


@dataclass(frozen=True)
class AttentionLayout:
    implementation: str
    mask_form: MaskForm | None  # the form of 4-D mask it takes, or None: it takes none
    varlen: bool  # documents are told apart by explicit boundaries in one flattened row
    separates_documents: bool  # restarting positions (or boundaries) keep packed documents apart

    @property
    def takes_4d_mask(self) -> bool:
        return self.mask_form is not None


@functools.cache
def attention_layout(implementation: str) -> AttentionLayout:
    """What a (registered) attention implementation can be given; see the module docstring."""
    if is_flash_attention_requested(requested_attention_implementation=implementation):
        return AttentionLayout(implementation, None, True, True)
    interfaces = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    mask_interface = interfaces[implementation] if implementation in interfaces.valid_keys() else None
    if mask_interface is masking_utils.sdpa_mask:
        return AttentionLayout(implementation, "bool", False, True)
    if mask_interface is masking_utils.eager_mask:
        return AttentionLayout(implementation, "additive", False, True)
    return AttentionLayout(implementation, None, False, mask_interface is not None)


def _config(model: torch.nn.Module):
    return getattr(model, "module", model).config


def model_layout(model: torch.nn.Module) -> AttentionLayout:
    return attention_layout(_config(model)._attn_implementation)


# --- shared-prefix pair masks --------------------------------------------------------------------------------


def mask_layer_types(config) -> tuple[str, ...]:
    """The distinct mask types a model's layers use: `config.layer_types`, else one sliding or full type for all."""
    text = config.get_text_config()
    types = getattr(text, "layer_types", None)
    if types:
        return tuple(dict.fromkeys(types))
    return ("sliding_attention",) if getattr(text, "sliding_window", None) is not None else ("full_attention",)


def _backbone_class(model: torch.nn.Module) -> type:
    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return type(getattr(inner, "base_model", inner))


@functools.cache
def _accepts_mask_mapping(backbone: type) -> bool:
    """Whether the backbone's forward takes `attention_mask` as a {layer_type: mask} mapping (as `generate` passes it)."""
    try:
        source = inspect.getsource(backbone.forward)
    except (OSError, TypeError):
        return False
    return re.search(r"isinstance\(\s*\(?\s*(\w+\s*:=\s*)?attention_mask\s*\)?\s*,\s*dict\s*\)", source) is not None


def _mask_builder(layer_type: str):
    build = masking_utils.LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING.get(layer_type)
    if not callable(build) or build is masking_utils.create_recurrent_attention_mask:
        return None
    return build


def shared_prefix_unsupported(model: torch.nn.Module) -> str | None:
    """Why this model cannot run shared-prefix pair rows, or None when it can."""
    config = _config(model)
    layout = attention_layout(config._attn_implementation)
    if not layout.takes_4d_mask:
        return f"{layout.implementation!r} attention takes no 4-D attention mask"
    types = mask_layer_types(config)
    other = [t for t in types if _mask_builder(t) is None]
    if other:
        return f"its {', '.join(other)} layers are not masked attention, so a suffix cannot skip the other suffix"
    if len(types) > 1 and not _accepts_mask_mapping(_backbone_class(model)):
        return f"{_backbone_class(model).__name__} takes one attention mask for layers of types {', '.join(types)}"
    return None


def packed_documents_unsupported(model: torch.nn.Module) -> str | None:
    """Why documents packed into one row would leak into each other under this model, or None when they cannot.

    Restarting positions separate documents only in masked attention: an attention that gets no mask, or recurrent and
    linear-attention layers (whose state runs through the whole row), carry one document into the next.
    """
    config = _config(model)
    layout = attention_layout(config._attn_implementation)
    if not layout.separates_documents:
        return f"{layout.implementation!r} attention gets no attention mask from transformers"
    other = [t for t in mask_layer_types(config) if _mask_builder(t) is None]
    if other:
        return f"its {', '.join(other)} layers carry state across the whole row"
    return None


def plain_sequence_mask(config, layer_type: str, length: int, device: torch.device | str) -> torch.Tensor:
    """(length, length) bool: what transformers lets position q see of position k in one plain sequence, for a layer type."""
    build = _mask_builder(layer_type)
    if build is None:
        raise ValueError(f"{layer_type!r} layers take no attention mask")
    embeds = torch.empty(1, length, 1, device=device)
    positions = torch.arange(length, device=device)[None]
    # the cache goes by position: transformers 5.19 (vLLM's pin) names it past_key_values, 5.24 cache
    mask = build(config, embeds, None, None, position_ids=positions, allow_is_causal_skip=False)
    if mask is None:  # nothing to mask beyond causality
        return torch.ones(length, length, dtype=torch.bool, device=device).tril()
    mask = mask[0, 0]
    return mask if mask.dtype == torch.bool else mask == 0


def in_mask_form(mask: torch.Tensor, form: MaskForm, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = may attend) as the attention takes it: bool for sdpa, additive (0 / min) for eager."""
    if form == "bool":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def pair_layer_masks(model: torch.nn.Module, mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """The pair rows' (rows, 1, L, L) bool mask as the model's attention needs it: per layer type, in the attention's form.

    Each layer type's own pattern (sliding window, chunks, ...) is the plain-sequence mask read at the positions of
    each (query, key) pair; the pair mask keeps units and suffixes apart. One layer type: one tensor, else a mapping.
    """
    reason = shared_prefix_unsupported(model)
    if reason is not None:
        raise ValueError(f"shared-prefix pair rows cannot run on this model: {reason}; set data.share_prefix: false (or leave it null)")
    config = _config(model)
    form = attention_layout(config._attn_implementation).mask_form
    dtype = next(model.parameters()).dtype
    length = int(position_ids.max()) + 1
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    masks = {}
    for layer_type in mask_layer_types(config):
        plain = plain_sequence_mask(config.get_text_config(), layer_type, length, mask.device)
        layer = mask if torch.equal(plain, causal) else mask & plain[position_ids[:, :, None], position_ids[:, None, :]][:, None]
        masks[layer_type] = in_mask_form(layer, form, dtype)
    return next(iter(masks.values())) if len(masks) == 1 else masks


# --- the forward -------------------------------------------------------------------------------------------


def varlen_inputs(input_ids: torch.Tensor, position_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """Rows (right-padded, `lengths` real tokens each) → one padding-free row with document boundaries, and the kept mask.

    Documents start where positions restart at 0; the boundaries are what flash-attention's varlen kernel reads.
    """
    keep = torch.arange(input_ids.shape[1], device=input_ids.device)[None] < lengths[:, None]
    positions = position_ids[keep]
    starts = (positions == 0).nonzero().flatten()
    cu_seq_lens = torch.cat([starts, starts.new_tensor([positions.numel()])]).to(torch.int32)
    longest = int(cu_seq_lens.diff().max())
    inputs = {"input_ids": input_ids[keep][None], "position_ids": positions[None], "cu_seq_lens_q": cu_seq_lens,
              "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest, "max_length_k": longest}  # fmt: skip
    return inputs, keep


def forward_hidden(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, lengths: torch.Tensor,
                   pair_mask: torch.Tensor | None = None, attention_of: torch.nn.Module | None = None,
                   **extra: Any) -> torch.Tensor:  # fmt: skip
    """(rows, L, hidden) final hidden states of packed rows, laid out for the model's attention (see the module docstring).

    `lengths` are the real tokens per row (padding is trailing); `pair_mask` the pair rows' 4-D bool mask, if any;
    `attention_of` the module whose attention decides the layout (default `model`, e.g. the critic inside an
    actor-critic wrapper); `extra` goes to the forward (`logits_to_keep`, `role`). Padding positions come back as 0.
    """
    layout = model_layout(attention_of if attention_of is not None else model)
    inputs: dict[str, Any] = {"input_ids": input_ids, "position_ids": position_ids}
    keep = None
    if pair_mask is not None:
        inputs["attention_mask"] = pair_layer_masks(attention_of if attention_of is not None else model, pair_mask, position_ids)
    elif layout.varlen:
        inputs, keep = varlen_inputs(input_ids, position_ids, lengths)
    elif (reason := packed_documents_unsupported(attention_of if attention_of is not None else model)) and bool(((position_ids == 0).sum(-1) > 1).any()):
        # the config is read first: the position check syncs with the device, so only a model that cannot separate pays it
        raise UserError(f"{reason}, so packed documents would see each other; set data.packing: false (one document per row)")
    out = model(**inputs, use_cache=False, output_hidden_states=True, **extra)
    hidden = out.hidden_states[-1]
    if keep is None:
        return hidden
    unflat = hidden.new_zeros(*input_ids.shape, hidden.shape[-1])
    unflat[keep] = hidden[0]
    return unflat
