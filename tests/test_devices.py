"""Every tensor the library makes lands on the model's device.

The guarded step and each trainer's loss run with the model and batch on the CPU while torch's default device is
`meta`: a tensor created without a device (the way a CPU scalar meets CUDA tensors on a GPU, where `torch.stack`
refuses to mix them) is then a meta tensor and fails here, instead of on a GPU user's first micro-batch.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from tests.conftest import ROOT, tiny_overrides

CONFIGS = {"sft": "configs/sft/quickstart.yaml", "rm": "configs/rm/quickstart.yaml", "mpo": "configs/mpo/quickstart.yaml"}


def test_a_tensor_made_without_a_device_fails_under_the_meta_default():
    """The mechanism the tests below rely on: the guard as it was (a CPU scalar stacked with the loss) is caught."""
    loss = torch.ones((), device="cpu")
    with torch.device("meta"), pytest.raises(RuntimeError, match="device"):
        torch.stack([torch.isfinite(loss).float(), loss, torch.tensor(8.0)])


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


def test_ppo_step_makes_no_tensor_off_the_model_device(tmp_path, sft_checkpoint, tiny_rm):
    from tests.test_rlhf import in_process_trainer

    trainer = in_process_trainer(tmp_path, sft_checkpoint, tiny_rm, **{"ppo.critic_warmup_iterations": 0})
    trainer.run_iteration(0)  # rollouts with their experience (old log-probs, values, advantages)
    rollouts = trainer.buffer.rollouts[:4]
    items = [(trainer.ppo_batch(rollouts[i : i + 2]), trainer._ptx_batch(i)) for i in (0, 2)]
    loss_fn = functools.partial(trainer.micro_loss, total_tokens=50.0, total_ptx=50.0, actor_on=True)
    with torch.device("meta"):
        result = trainer.stepper.step(items, loss_fn, 10)
    assert result.applied and math.isfinite(result.loss)
    assert {"policy_loss", "value_loss", "ptx_nll"} <= set(result.metrics)
