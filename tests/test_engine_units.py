"""Batch-shape validation, the learning-rate schedule and the step plan's sharding."""

import pytest
import torch

from align.engine.accelerator import BatchShape, fill_deepspeed_config, resolve_batch_shape
from align.engine.optim import lr_multiplier
from align.engine.plan import StepPlan


def test_global_batch_derives_accumulation():
    assert resolve_batch_shape(8, None, 64, 2).gradient_accumulation_steps == 4


@pytest.mark.parametrize("micro, acc, glob, world, msg", [
    (8, None, 60, 2, "not a positive multiple of micro_batch_size=8 × world size 2 = 16"),
    (8, 2, 64, 2, "micro_batch_size=8 × gradient_accumulation_steps=2 × world size 2 = 32"),
    (0, None, None, 1, "micro_batch_size must be >= 1"),
])
def test_batch_shape_errors_explain(micro, acc, glob, world, msg):
    with pytest.raises(ValueError, match=msg.replace("×", ".").replace("(", r"\(")):
        resolve_batch_shape(micro, acc, glob, world)


def test_schedule_warmup_then_cosine_to_min():
    values = [lr_multiplier(s, 110, 10, "cosine", 0.1) for s in range(110)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5)
    assert min(values[10:]) >= 0.1
    assert lr_multiplier(60, 110, 10, "linear", 0.0) == pytest.approx(0.5)


def test_plan_shards_ranks_and_matches_single_process():
    two = StepPlan(100, BatchShape(2, 2, 2), seed=1, epochs=1, max_steps=None)
    one = StepPlan(100, BatchShape(2, 4, 1), seed=1, epochs=1, max_steps=None)
    for step in range(two.total_steps):
        r0, r1 = two.micro_batches(step, 0), two.micro_batches(step, 1)
        flat0, flat1 = sum(r0, []), sum(r1, [])
        assert not set(flat0) & set(flat1)
        assert sorted(flat0 + flat1) == sorted(sum(one.micro_batches(step, 0), []))
    assert two.total_steps == 12 and two.unused_rows_per_epoch == 4
    assert two.step_rows(12) != two.step_rows(0)  # a new epoch reshuffles


def test_plan_needs_one_full_batch():
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        StepPlan(3, BatchShape(2, 1, 2), 0, 1, None)


def test_deepspeed_autos_filled():
    cfg = fill_deepspeed_config({"train_batch_size": "auto", "bf16": {"enabled": "auto"}}, BatchShape(4, 2, 2), 1.0, False)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (16, 4, 2)
    assert cfg["bf16"]["enabled"] is False and cfg["gradient_clipping"] == 1.0


def test_eval_batches_are_equal_in_count_on_every_rank():
    """ZeRO-3 forwards are collective: a rank with one forward fewer would hang the others."""
    from align.engine.plan import eval_micro_batches

    for rows, world, micro in [(5, 2, 2), (3, 2, 4), (1, 2, 1), (8, 2, 2), (7, 3, 2)]:
        shards = [eval_micro_batches(rows, r, world, micro) for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        real = sorted(i for s in shards for ids, ok in s if ok for i in ids)
        assert real == list(range(rows))  # every row once, fillers excluded


@pytest.mark.parametrize(("name", "millions"), [("builtin:tiny", 0.2), ("builtin:small", 1.1), ("builtin:base", 33.8), ("builtin:medium", 403.2)])
def test_builtin_shapes_have_their_documented_sizes(name, millions):
    """Benchmarks quote these sizes (`builtin:base` is the ~34M shape where matrix multiplies dominate a CPU step)."""
    from align.config import ModelConfig
    from align.engine.models import load_causal_lm, load_tokenizer

    cfg = ModelConfig(name_or_path=name)
    with torch.device("meta"):  # shapes only
        model = load_causal_lm(cfg, load_tokenizer(cfg), torch.float32)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)


@pytest.mark.parametrize(
    "cuda, cuda_bf16, flags, world, speedup, expected",
    [
        (True, True, frozenset(), 1, None, torch.bfloat16),  # a GPU with bf16
        (True, False, frozenset(), 1, None, torch.float32),  # an older GPU: fp32, not fp16 without loss scaling
        (False, False, frozenset({"avx2", "fma"}), 1, None, torch.float32),  # AVX2-only CPU: bf16 is emulated, 10-28x slower
        (False, False, frozenset({"avx512f", "avx512_bf16"}), 1, 2.6, torch.bfloat16),  # native bf16 that measures faster
        (False, False, frozenset({"avx512f", "avx512_bf16"}), 1, 1.1, torch.float32),  # native but not clearly faster
        (False, False, frozenset({"amx_bf16"}), 2, None, torch.bfloat16),  # several ranks: the flags decide, no measurement
    ],
)
def test_auto_dtype_picks_bf16_only_where_it_is_native_and_faster(cuda, cuda_bf16, flags, world, speedup, expected):
    from align.engine.models import auto_dtype

    def measure() -> float:
        assert speedup is not None, "measured where the flags or the device already decide"
        return speedup

    assert auto_dtype(cuda, cuda_bf16, flags, world, measure) == expected


def test_auto_dtype_on_this_machine_follows_its_flags():
    from align.engine.models import NATIVE_BF16_FLAGS, bf16_speedup, cpu_flags, resolve_dtype

    if torch.cuda.is_available():
        pytest.skip("the CPU rule; the GPU one is pinned above")
    chosen = resolve_dtype("auto")
    if not cpu_flags() & NATIVE_BF16_FLAGS:
        assert chosen == torch.float32
    else:
        assert chosen == (torch.bfloat16 if bf16_speedup() >= 1.3 else torch.float32)
    assert resolve_dtype("float32") == torch.float32 and resolve_dtype("bfloat16") == torch.bfloat16
