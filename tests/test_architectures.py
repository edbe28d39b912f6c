"""Log-probs, scores and masks equal each architecture's own plain forward (tiny models built from config, fp32).

Reference: each document or sequence alone, unpacked, through `model(input_ids)` (log-softmax of its logits) or
`AutoModelForSequenceClassification` (its score). Covered: Llama, Qwen2 with and without a sliding window smaller
than the sequences, Mistral (sliding window), Gemma 2 (alternating sliding/global layers, logit soft-capping),
Cohere (logit scale) and Granite (logits scaling); plus the logits path of every `*ForCausalLM` transformers ships,
and the flattened varlen layout under a flash-style attention checked on CPU.
"""

from __future__ import annotations

import ast
import pathlib
import random
import re

import pytest
import torch
import transformers
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    CohereConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GraniteConfig,
    LlamaConfig,
    MiniCPM3Config,
    MistralConfig,
    ModernBertDecoderConfig,
    Qwen2Config,
    RecurrentGemmaConfig,
)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

from align.engine import models
from align.losses.logits import UnsupportedLogits, logits_path, parse_head
from align.losses.logprobs import target_logprobs
from align.trainers.mpo import collate_preference, sequence_logprobs
from data_builders.attention_layout import attention_layout, forward_hidden, shared_prefix_unsupported
from data_builders.errors import UserError
from data_builders.packing import collate_rows
from data_builders.pair_rows import collate_pair_rows, resolve_share_prefix
from data_builders.preference_data import PreferencePair
from data_builders.samples import Sample
from rewards.model import pack_documents, packed_scores, pair_scores

VOCAB, WINDOW = 61, 5
VARLEN = "flash_varlen_cpu_reference"  # "flash" in the name: transformers and align treat it as flash-attention
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=128)  # fmt: skip
ARCHITECTURES = {
    "llama": lambda: LlamaConfig(**BASE),
    "qwen2": lambda: Qwen2Config(**BASE),
    "qwen2-sliding": lambda: Qwen2Config(**BASE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),  # full, sliding
    "mistral": lambda: MistralConfig(**BASE, sliding_window=WINDOW),
    "gemma2": lambda: Gemma2Config(**BASE, head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW, final_logit_softcapping=2.0),
    "cohere": lambda: CohereConfig(**BASE, logit_scale=0.5),
    "granite": lambda: GraniteConfig(**BASE, logits_scaling=3.0),
}
NO_SEQUENCE_CLASSIFICATION = {"cohere", "granite"}  # transformers ships no *ForSequenceClassification for these
CASES = [(arch, attn) for arch in ARCHITECTURES for attn in ("sdpa", "eager") if not (arch == "gemma2" and attn == "sdpa")]  # gemma2: eager only

rng = random.Random(0)
DOCUMENTS = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (9, 14, 6, 17, 11)]  # several longer than the window


def _pair(prefix: int, chosen: int, rejected: int) -> PreferencePair:
    shared = [rng.randrange(3, VOCAB) for _ in range(prefix)]
    return PreferencePair(shared + [rng.randrange(3, VOCAB) for _ in range(chosen)], shared + [rng.randrange(3, VOCAB) for _ in range(rejected)],
                          prefix)  # fmt: skip


PAIRS = [_pair(7, 4, 6), _pair(3, 9, 2), _pair(10, 3, 5)]  # shared prefixes and suffixes beyond the window


def build(arch: str, attn: str, sequence_classification: bool = False) -> torch.nn.Module:
    """A seeded tiny model; the CPU varlen reference is switched in after construction (transformers would look for a
    flash kernel at load time)."""
    config = ARCHITECTURES[arch]()
    config.num_labels = 1
    torch.manual_seed(0)
    auto = AutoModelForSequenceClassification if sequence_classification else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="sdpa" if attn == VARLEN else attn).eval()
    model.config._attn_implementation = attn
    if sequence_classification:
        torch.nn.init.normal_(model.score.weight)
    return model


def plain_logprobs(model: torch.nn.Module, ids: list[int], start: int = 1) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t ≥ start, from the model's own forward of this sequence alone."""
    logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return logprobs[torch.arange(start - 1, len(ids) - 1), torch.tensor(ids[start:])]


def plain_score(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, 0]


@pytest.mark.parametrize(("arch", "attn"), CASES)
@torch.no_grad()
def test_packed_sft_logprobs_equal_separate_forwards(arch, attn):
    """Restarting positions keep packed documents apart, sliding windows per document, logit post-processing applied."""
    model = build(arch, attn)
    rows = [[Sample(d, [1] * len(d)) for d in DOCUMENTS[:3]], [Sample(d, [1] * len(d)) for d in DOCUMENTS[3:]]]
    logprobs, _ = target_logprobs(model, collate_rows(rows, 0))
    expected = torch.cat([plain_logprobs(model, d) for d in DOCUMENTS])
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_flex_attention_keeps_packed_documents_and_windows_apart():
    """`model.attn_implementation: flex_attention` (compiled on CPU too): positions alone separate the documents."""
    model = build("mistral", "flex_attention")
    rows = [[Sample(d, [1] * len(d)) for d in DOCUMENTS[:3]], [Sample(d, [1] * len(d)) for d in DOCUMENTS[3:]]]
    logprobs, _ = target_logprobs(model, collate_rows(rows, 0))
    model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(logprobs, torch.cat([plain_logprobs(model, d) for d in DOCUMENTS]), rtol=0, atol=1e-5)
    assert resolve_share_prefix(None, build("mistral", "flex_attention")) is False  # it takes no 4-D pair mask


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize(("arch", "attn"), CASES)
@torch.no_grad()
def test_mpo_sequence_logprobs_equal_separate_forwards(arch, attn, share_prefix):
    model = build(arch, attn)
    assert resolve_share_prefix(None, model) is True
    batch = collate_preference([PAIRS[:2], PAIRS[2:]], [0, 1, 2], 0, share_prefix)
    expected = torch.stack([torch.stack([plain_logprobs(model, p.chosen, p.prompt_length).sum(),
                                         plain_logprobs(model, p.rejected, p.prompt_length).sum()]) for p in PAIRS])  # fmt: skip
    torch.testing.assert_close(sequence_logprobs(model, batch), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("arch", "attn"), [c for c in CASES if c[0] not in NO_SEQUENCE_CLASSIFICATION])
@torch.no_grad()
def test_reward_scores_equal_sequence_classification_alone(arch, attn):
    model = build(arch, attn, sequence_classification=True)
    rows = [[(p.chosen, p.rejected) for p in PAIRS[:2]], [(p.chosen, p.rejected) for p in PAIRS[2:]]]
    expected = torch.stack([torch.stack([plain_score(model, p.chosen), plain_score(model, p.rejected)]) for p in PAIRS])
    for share_prefix in (True, False):
        chosen, rejected = pair_scores(model, collate_pair_rows(rows, 0, share_prefix))
        torch.testing.assert_close(torch.stack([chosen, rejected], 1), expected, rtol=0, atol=1e-5)
    input_ids, position_ids, ends, _ = pack_documents([DOCUMENTS[:3], DOCUMENTS[3:]], 0)
    packed = packed_scores(model, input_ids, position_ids, ends)
    torch.testing.assert_close(packed, torch.stack([plain_score(model, d) for d in DOCUMENTS]), rtol=0, atol=1e-5)


# --- the logits path of every causal LM ---------------------------------------------------------------------

MORE_HEADS = {  # one model per other feature of the head grammar
    "gemma3-softcap": lambda: Gemma3TextConfig(**BASE, head_dim=8, query_pre_attn_scalar=8, sliding_window=4, final_logit_softcapping=3.0),
    "minicpm3-hidden-scaling": lambda: MiniCPM3Config(**{**BASE, "num_key_value_heads": 4}, q_lora_rank=16, kv_lora_rank=16,
                                                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),  # hidden / (32 / 256)  # fmt: skip
    "recurrentgemma-local-cap": lambda: RecurrentGemmaConfig(**BASE, lru_width=32, attention_window_size=4, logits_soft_cap=3.0,
                                                             block_types=["recurrent", "attention"], head_dim=8),  # fmt: skip
    "modernbert-decoder-head-chain": lambda: ModernBertDecoderConfig(**BASE),  # decoder(lm_head(hidden))
}


@pytest.mark.parametrize("config", [*ARCHITECTURES, *MORE_HEADS])
@torch.no_grad()
def test_logits_path_equals_the_models_logits(config):
    make = ARCHITECTURES.get(config) or MORE_HEADS[config]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make()).eval()
    out = model(input_ids=torch.tensor([DOCUMENTS[1]]), output_hidden_states=True)
    hidden = out.hidden_states[-1][0]
    torch.testing.assert_close(logits_path(model)(hidden), out.logits[0].float(), rtol=0, atol=1e-6)
    if config not in ("llama", "qwen2", "qwen2-sliding", "mistral"):  # the head alone is not the model's logits here
        assert not torch.allclose(model.get_output_embeddings()(hidden), out.logits[0], atol=1e-4)


# audio / multi-stream heads whose logits are not one distribution per position, and xLSTM's in-place chunked
# soft-cap; a new class outside the grammar fails the test below until it is supported or knowingly listed here
UNSUPPORTED_HEADS = {"CsmDepthDecoderForCausalLM", "MusicgenForCausalLM", "MusicgenMelodyForCausalLM", "ProphetNetForCausalLM",
                     "xLSTMForCausalLM"}  # fmt: skip
_CAUSAL_LM = re.compile(r"^class (\w+ForCausalLM)\(.*?(?=^(?:class |def |@|\S+ = )|\Z)", re.S | re.M)
_TOP_LEVEL = re.compile(r"^(?:def|class) (\w+)|^(\w+)\s*[:=]", re.M)


def _module_names(source: str) -> set[str]:
    """What a modeling module defines or imports at top level (the names a head program may call)."""
    names = {a or b for a, b in _TOP_LEVEL.findall(source)}
    header = source[: re.search(r"^(?:class |def |@)", source, re.M).start()]
    for node in ast.walk(ast.parse(header)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def test_every_causal_lm_in_transformers_has_a_logits_path_we_evaluate():
    """Source scan (no model built): what each `*ForCausalLM.forward` does between its backbone and its loss is in
    the grammar `align/losses/logits.py` evaluates; otherwise the class must be a known exception."""
    supported, unsupported = set(), {}
    for path in sorted((pathlib.Path(transformers.__file__).parent / "models").glob("*/modeling_*.py")):
        source = path.read_text()
        if "ForCausalLM(" not in source:
            continue
        names = _module_names(source)
        for match in _CAUSAL_LM.finditer(source):
            cls = ast.parse(match.group(0)).body[0]
            forward = next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "forward"), None)
            if forward is None:  # inherits a forward scanned under its own class
                continue
            try:
                program = parse_head(ast.unparse(forward), cls.name, names)
                supported.add(cls.name)
            except UnsupportedLogits as err:
                unsupported[cls.name] = str(err)
                continue
            assert any("logits" in ast.unparse(s) for s in program.statements), f"{cls.name}: no logits computed\n{program.describe()}"
    assert {"CohereForCausalLM", "GraniteForCausalLM", "Gemma2ForCausalLM", "LlamaForCausalLM"} <= supported and len(supported) > 150
    assert set(unsupported) == UNSUPPORTED_HEADS, {k: v for k, v in unsupported.items() if k not in UNSUPPORTED_HEADS}


def test_a_head_outside_the_grammar_is_an_error_naming_the_line():
    source = '''
def forward(self, input_ids=None, labels=None):
    outputs = self.model(input_ids=input_ids)
    logits = self.lm_head(outputs.last_hidden_state)
    logits = torch.sort(logits).values
    return CausalLMOutput(logits=logits)
'''
    with pytest.raises(UnsupportedLogits, match=r"NewForCausalLM.forward .* `logits = torch.sort\(logits\).values` \(calls torch.sort\)"):
        parse_head(source, "NewForCausalLM", {"torch", "CausalLMOutput"})


# --- flash-style varlen layout, checked on CPU ---------------------------------------------------------------

VARLEN_CALLS: list[dict] = []


def varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, softcap=None, **kwargs):
    """Block-diagonal causal attention computed from the sequence boundaries alone, as flash-attention's varlen kernel does."""
    assert query.shape[0] == 1, "flash-attention tells documents apart only inside one flattened row"
    assert attention_mask is None
    cu = kwargs["cu_seq_lens_q"]
    assert torch.equal(cu, kwargs["cu_seq_lens_k"]) and cu.dtype == torch.int32 and int(cu[-1]) == query.shape[2]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == int(cu.diff().max())
    VARLEN_CALLS.append({"cu_seq_lens": cu.tolist(), "sliding_window": sliding_window})
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = torch.empty_like(query)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        i = torch.arange(end - start)
        allowed = i[None, :] <= i[:, None]
        if sliding_window is not None:
            allowed &= i[:, None] - i[None, :] < sliding_window
        out[:, :, start:end] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], attn_mask=allowed, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(VARLEN, varlen_reference)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, flash_attention_mask)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@torch.no_grad()
def test_varlen_attention_gets_one_flattened_row_with_boundaries(arch):
    """Two rows per micro-batch: flattened into one padding-free row with cu_seq_lens, equal to the sdpa path."""
    sdpa = build(arch, "sdpa")
    varlen = build(arch, VARLEN)
    assert varlen.config._attn_implementation == VARLEN and attention_layout(VARLEN).varlen
    rows = [[Sample(d, [1] * len(d)) for d in DOCUMENTS[:3]], [Sample(d, [1] * len(d)) for d in DOCUMENTS[3:]]]
    batch = collate_rows(rows, 0)
    VARLEN_CALLS.clear()
    got, _ = target_logprobs(varlen, batch)
    lengths = [len(d) for d in DOCUMENTS]
    boundaries = [sum(lengths[:k]) for k in range(len(lengths) + 1)]
    assert VARLEN_CALLS and all(call["cu_seq_lens"] == boundaries for call in VARLEN_CALLS)
    assert {call["sliding_window"] for call in VARLEN_CALLS} == ({WINDOW} if arch == "mistral" else {None})
    torch.testing.assert_close(got, target_logprobs(sdpa, batch)[0], rtol=0, atol=1e-5)
    expected = torch.cat([plain_logprobs(sdpa, d) for d in DOCUMENTS])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_varlen_pair_rows_without_sharing_equal_sdpa():
    """RM and MPO under flash-attention: no shared prefix (chosen never sees rejected), one flattened row."""
    rm_sdpa, rm_varlen = build("llama", "sdpa", True), build("llama", VARLEN, True)
    assert resolve_share_prefix(None, rm_varlen) is False and shared_prefix_unsupported(rm_varlen) == f"{VARLEN!r} attention takes no 4-D attention mask"
    rows = collate_pair_rows([[(p.chosen, p.rejected) for p in PAIRS[:2]], [(p.chosen, p.rejected) for p in PAIRS[2:]]], 0, share_prefix=False)
    VARLEN_CALLS.clear()
    torch.testing.assert_close(torch.stack(pair_scores(rm_varlen, rows)), torch.stack(pair_scores(rm_sdpa, rows)), rtol=0, atol=1e-5)
    assert VARLEN_CALLS[0]["cu_seq_lens"][-1] == rows.num_tokens  # padding-free
    lm_sdpa, lm_varlen = build("llama", "sdpa"), build("llama", VARLEN)
    batch = collate_preference([PAIRS[:2], PAIRS[2:]], [0, 1, 2], 0, share_prefix=False)
    torch.testing.assert_close(sequence_logprobs(lm_varlen, batch), sequence_logprobs(lm_sdpa, batch), rtol=0, atol=1e-5)


# --- layout choice ---------------------------------------------------------------------------------------------


def test_attention_layouts_come_from_transformers_registries():
    sdpa, eager, flash, flex = (attention_layout(n) for n in ("sdpa", "eager", "flash_attention_2", "flex_attention"))
    assert (sdpa.mask_form, eager.mask_form, flash.mask_form, flex.mask_form) == ("bool", "additive", None, None)
    assert flash.varlen and not sdpa.varlen and not flex.varlen and flex.separates_documents
    unknown = attention_layout("no_mask_interface_anywhere")
    assert not unknown.takes_4d_mask and not unknown.separates_documents


def test_a_4d_mask_never_goes_to_an_attention_that_ignores_it():
    model = build("llama", VARLEN)
    rows = collate_pair_rows([[(p.chosen, p.rejected) for p in PAIRS]], 0, share_prefix=True)
    with pytest.raises(ValueError, match="takes no 4-D attention mask; set data.share_prefix: false"):
        forward_hidden(model, rows.input_ids, rows.position_ids, rows.lengths(), rows.attention_mask)
    with pytest.raises(UserError, match=r"data.share_prefix: true, but this model cannot run shared-prefix pair rows: .* takes no 4-D"):
        resolve_share_prefix(True, model)


def test_auto_attention_picks_sdpa_when_the_layout_needs_a_4d_mask(monkeypatch):
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: object())
    assert models.resolve_attention("auto") == "flash_attention_2"  # packed rows, unshared pairs: flattened varlen rows
    assert models.resolve_attention("auto", needs_4d_mask=True) == "sdpa"  # data.share_prefix: true
    assert models.resolve_attention("eager", needs_4d_mask=True) == "eager"


def test_layers_that_are_not_masked_attention_cannot_share_a_prefix():
    class Hybrid(torch.nn.Module):
        config = Qwen2Config(**BASE, layer_types=["linear_attention", "full_attention"])

    Hybrid.config._attn_implementation = "sdpa"
    assert "linear_attention layers are not masked attention" in shared_prefix_unsupported(Hybrid())
    assert resolve_share_prefix(None, Hybrid()) is False
    packed = collate_rows([[Sample(d, [1] * len(d)) for d in DOCUMENTS[:2]]], 0)  # their state would run from one into the next
    with pytest.raises(UserError, match="its linear_attention layers carry state across the whole row, so packed documents would see each other"):
        forward_hidden(Hybrid(), packed.input_ids, packed.position_ids, packed.lengths())


def test_several_layer_types_need_a_model_that_takes_one_mask_per_type():
    assert shared_prefix_unsupported(build("qwen2-sliding", "sdpa")) is None  # Qwen2Model takes {layer_type: mask}
    mistral = build("mistral", "sdpa")
    mistral.config.layer_types = ["sliding_attention", "full_attention"]  # MistralModel builds one mask for all layers
    assert shared_prefix_unsupported(mistral) == "MistralModel takes one attention mask for layers of types sliding_attention, full_attention"


def test_an_attention_without_a_mask_interface_refuses_packed_documents():
    model = build("llama", "sdpa")
    model.config._attn_implementation = "no_mask_interface_anywhere"
    batch = collate_rows([[Sample(d, [1] * len(d)) for d in DOCUMENTS[:2]]], 0)
    with pytest.raises(ValueError, match="gets no attention mask from transformers, so packed documents would see each other"):
        forward_hidden(model, batch.input_ids, batch.position_ids, batch.lengths())
