"""Every tensor the library makes lands on the model's device.

The guarded step and each trainer's loss run with the model and batch on the CPU while torch's default device is
`meta`: a tensor created without a device (the way a CPU scalar meets CUDA tensors on a GPU, where `torch.stack`
refuses to mix them) is then a meta tensor and fails here, instead of on a GPU user's first micro-batch.
"""

from __future__ import annotations

import ast
import math

import pytest
import torch

from tests.conftest import ROOT, tiny_overrides

FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "randperm", "linspace", "eye", "rand", "randn", "randint"}
CONFIGS = {"sft": "configs/sft/quickstart.yaml", "rm": "configs/rm/quickstart.yaml", "mpo": "configs/mpo/quickstart.yaml"}


def test_a_tensor_made_without_a_device_fails_under_the_meta_default():
    """The mechanism the tests below rely on: the guard as it was (a CPU scalar stacked with the loss) is caught."""
    loss = torch.ones((), device="cpu")
    with torch.device("meta"), pytest.raises(RuntimeError, match="device"):
        torch.stack([torch.isfinite(loss).float(), loss, torch.tensor(8.0)])


def test_every_tensor_the_library_makes_names_its_device():
    """The audit as a rule: a `torch.<factory>(...)` in library code names its device (`"cpu"` for host-side collation,
    statistics and permutations; the model's or an input's device otherwise). A call without one lands on the default
    device, which is the CPU on a GPU run and whatever `torch.set_default_device` says elsewhere."""
    offenders = []
    for path in sorted(p for package in ("align", "rewards", "data_builders") for p in (ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch" and node.func.attr in FACTORIES and not any(k.arg == "device" for k in node.keywords)):  # fmt: skip
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: torch.{node.func.attr}")
    assert not offenders, "\n".join(offenders)


def test_the_pair_mask_is_built_on_the_device_of_its_inputs():
    from data_builders.pair_rows import pair_attention_mask

    unit = torch.tensor([[0, 0, 0, -1]], device="meta")
    assert pair_attention_mask(unit, torch.zeros_like(unit)).device.type == "meta"


def _trainer(method: str, tmp_path, sft_checkpoint):
    from align.config import RECIPES, load_recipe
    from align.engine.core import Engine

    extra = {} if method == "rm" else {"eval.enabled": False}
    if method != "sft":
        extra |= {"model.name_or_path": str(sft_checkpoint)}
    if method == "mpo":
        extra |= {"mpo.sampled_pairs.enabled": False, "mpo.reference": "model", "data.train": "[{path: synthetic}]"}
    overrides = [o for o in tiny_overrides(tmp_path / method, steps=1, **extra) if method != "rm" or not o.startswith("eval.")]
    recipe = load_recipe(RECIPES[method], str(ROOT / CONFIGS[method]), overrides)
    engine = Engine.create(recipe)
    if method == "sft":
        from align.trainers.sft import SFTTrainer as cls
    elif method == "rm":
        from align.trainers.rm import RMTrainer as cls
    else:
        from align.trainers.mpo import MPOTrainer as cls
    trainer = cls(recipe, engine)
    trainer.setup()
    return engine, trainer


@pytest.mark.parametrize("method", ["sft", "rm", "mpo"])
def test_guarded_step_and_loss_make_no_tensor_off_the_model_device(method, tmp_path, sft_checkpoint):
    from align.engine.loop import Stepper
    from align.engine.optim import build_optimizer, build_scheduler
    from align.engine.plan import StepPlan

    engine, trainer = _trainer(method, tmp_path, sft_checkpoint)
    plan = StepPlan(len(trainer.train_rows), engine.shape, 0, 1.0, 1)
    optimizer = build_optimizer(trainer.model, engine.recipe.optim)
    model, optimizer, scheduler = engine.accelerator.prepare(trainer.model, optimizer, build_scheduler(optimizer, engine.recipe.optim, 1))
    stepper = Stepper(engine, model, optimizer, scheduler, engine.recipe.optim.max_grad_norm)
    batches = [trainer.collate(ids, "train") for ids in plan.micro_batches(0, 0)]
    totals = trainer.units(plan.step_rows(0), "train")
    with torch.device("meta"):
        result = stepper.step(batches, lambda b: trainer.loss(model, b.to(engine.device), totals), sum(b.num_tokens for b in batches))
    assert result.applied and math.isfinite(result.loss) and result.tokens > 0
    assert all(v.device.type == "cpu" for values in result.metrics.values() for v in values)


def test_a_whole_rlhf_iteration_and_task_accuracy_make_no_tensor_off_their_devices(tmp_path, sft_checkpoint, tiny_rm):
    """Generate, score through the router (reward model + verifiers), experience (old/reference log-probs, values),
    GAE, advantage whitening over the buffer, the guarded PPO steps, then greedy task accuracy: all under a `meta`
    default device, so a tensor made without naming its device fails here."""
    from align.evaluation import task_accuracy
    from tests.test_rlhf import in_process_trainer

    trainer = in_process_trainer(tmp_path, sft_checkpoint, tiny_rm, **{"ppo.critic_warmup_iterations": 0})
    with torch.device("meta"):
        stats = trainer.run_iteration(0)
        accuracy = task_accuracy(trainer.engine.accelerator.unwrap_model(trainer.model).actor, trainer.tokenizer,
                                 trainer.prompts[:4], trainer.engine.accelerator, max_new_tokens=8)  # fmt: skip
    assert math.isfinite(stats["policy_loss"]) and trainer.state.tokens > 0 and trainer.stepper.skipped_steps == 0
    assert accuracy["num_prompts"] == 4
    fresh = [r for r in trainer.buffer.rollouts if r.advantages is not None]  # this iteration's, with their experience
    assert fresh and all(t.device.type == "cpu" for r in fresh for t in (r.logprobs, r.ref_logprobs, r.values, r.advantages, r.returns))
