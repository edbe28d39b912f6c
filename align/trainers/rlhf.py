"""COOL RLHF (InternLM2 §4.2): conditional online PPO against the reward router, in rounds; and the critic-free
estimators (GRPO, RLOO, REINFORCE++-baseline: `ppo.advantage_estimator`) on the same loop.

Models: the actor (policy, from the SFT checkpoint) and the critic (the reward model's backbone and
head) are one `ActorCritic` module, prepared once (one ZeRO-3 partitioning, one optimizer with a
group per model); a frozen reference (ZeRO-3 eval partitioning); the conditional reward model, a
frozen replica on every rank, behind the `RewardRouter`. Each prompt carries a condition whose
system prompt reaches the reward model only: actor, critic and reference see the plain prompt.

One iteration (all of it a pure function of (seed, iteration, rank), so a resumed run repeats it):
  1. generate: this rank's prompts, `samples_per_prompt` each, with the actor's weights gathered once;
  2. score: the router (RM with the condition prompt + verifiers) → clip → running normalisation;
  3. experience: old log-probs, reference log-probs and values in packed forwards; token rewards
     (score at the last token − kl_coef·KL), GAE advantages and returns;
  4. train: `ppo_epochs` × `mini_batches` optimizer steps of clipped policy loss + value loss (+ PTX
     NLL on `data.train`); only the value loss during the critic warm-up.
Critic-free (`grpo`, `rloo`, `reinforce_baseline`): no critic is built or trained; step 3 takes the baseline from the
prompt's other samples (`align/losses/advantages.py`), the KL goes in the reward or (GRPO) into the loss as k3, and the
policy loss is normalised per `ppo.loss_type`. With one optimizer step per iteration and no KL in the reward, the old
log-probs are the trained forward's own (detached), so the experience pass skips the policy forward, as TRL does.
Between rounds, the fast path flags reward hacking, turns the round's early-vs-late contradictions
(plus slow-path rows dropped in `comparisons_dir`) into comparisons, and updates the reward model.

Every rank holds the same number of rollouts and runs the same number of forwards, so ZeRO-3's
collective gathers never wait on a rank that ran out of work; generation uses gathered weights, so
ranks may produce different lengths. Checkpoints hold the accelerate state, the loop state, the
rollout buffer (one file per rank) and the reward model once the fast path has changed it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from align.config import ModelConfig, RLHFRecipe, flat_dict
from align.engine.accelerator import fill_model_sizes, world_size_from_env
from align.engine.checkpoint import Checkpointer
from align.engine.core import Engine
from align.engine.logger import RunLogger
from align.engine.loop import Stepper
from align.engine.models import load_causal_lm, load_reward_model, load_tokenizer, prepare_frozen, without_zero3_init
from align.evaluation import load_prompts
from align.losses.advantages import k3_kl, token_loss_weights
from align.losses.logprobs import target_logprobs
from align.losses.ppo import RunningMoments, explained_variance, policy_loss_tokens, value_loss_tokens
from align.model_paths import MAKE_RM, check_model_path
from align.reward_model_info import RewardModelInfo, reward_token_id
from align.rollout.buffer import RolloutBuffer, global_sums
from align.rollout.collect import collect_rollouts
from align.rollout.detectors import detect_hacking, split_early_late
from align.rollout.drift import SamplerDrift
from align.rollout.engines import make_generator, rollout_summary
from align.rollout.experience import (
    RolloutBatch,
    actor_logprobs,
    assign_advantages,
    assign_group_advantages,
    collate_rollouts,
    critic_values,
)
from align.rollout.generation import Generator, SamplingParams
from align.rollout.process_rewards import dense_step_rewards, load_process_scorer, outcome_reward
from align.run_state import check_run_dir, prepare_run_dir, recipe_fingerprint
from align.trainers.actor_critic import ActorCritic, build_actor_critic_optimizer, build_actor_critic_scheduler, export_actor_critic
from align.trainers.rm_update import comparison_pairs, read_comparison_files, update_reward_model
from data_builders.bad_rows import BadRowPolicy
from data_builders.conversations import text_messages
from data_builders.errors import UserError
from data_builders.packing import build_rows, collate_rows
from data_builders.sft_data import build_samples
from rewards.router import RewardRouter
from rewards.verifiers import task_score

RM_FILE = "reward_model.safetensors"


@dataclasses.dataclass
class RLHFState:
    iteration: int = 0
    optimizer_steps: int = 0
    tokens: int = 0  # response tokens trained on, summed over optimizer steps and ranks
    skipped_steps: int = 0  # guarded steps discarded for a non-finite loss or gradient norm
    reward_moments: dict[str, float] = dataclasses.field(default_factory=dict)
    ingested: list[str] = dataclasses.field(default_factory=list)  # slow-path files already used
    rounds: list[dict] = dataclasses.field(default_factory=list)  # what happened between rounds
    before: dict[str, Any] = dataclasses.field(default_factory=dict)  # held-out eval of the starting policy
    rm_updated: bool = False
    reward_stats: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # per-condition RM stats after a fast-path update
    last: dict[str, float] = dataclasses.field(default_factory=dict)  # the last iteration's metrics
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # generate / score / experience / train totals


@dataclasses.dataclass
class PPOBatch:
    """One PPO micro-batch: packed rows and, per response token in target order, what the loss needs."""

    rows: RolloutBatch
    weight: torch.Tensor  # 1 where the token is trained on (0 for dropped truncated answers)
    returns: torch.Tensor
    values: torch.Tensor  # the critic's values at experience time (for value clipping)
    logprobs: torch.Tensor  # old log-probs
    ref_logprobs: torch.Tensor  # for the KL loss term
    advantages: torch.Tensor
    loss_weight: torch.Tensor  # per token: its weight in the step's policy loss (`ppo.loss_type`), 0 where not trained
    sampler_logprobs: torch.Tensor | None = None  # the generating engine's (vLLM's), for the drift metric

    def to(self, device: torch.device | str) -> PPOBatch:
        moved = {f.name: getattr(self, f.name).to(device) if getattr(self, f.name) is not None else None for f in dataclasses.fields(self)}
        return PPOBatch(**moved)


class RLHFTrainer:
    name = "rlhf"
    recipe_type = RLHFRecipe

    def __init__(self, recipe: RLHFRecipe):
        ppo = recipe.ppo
        world = world_size_from_env()
        if ppo.prompts_per_iteration % world:
            raise UserError(f"ppo.prompts_per_iteration {ppo.prompts_per_iteration} must be divisible by the {world} processes")
        per_iteration = ppo.prompts_per_iteration * ppo.samples_per_prompt
        if per_iteration % ppo.mini_batches:
            raise UserError(f"{per_iteration} rollouts per iteration do not split into ppo.mini_batches={ppo.mini_batches}")
        per_rank_step = per_iteration // ppo.mini_batches // world
        if per_rank_step == 0 or (per_iteration // ppo.mini_batches) % world or per_rank_step % recipe.train.micro_batch_size:
            raise UserError(
                f"ppo.prompts_per_iteration × ppo.samples_per_prompt / ppo.mini_batches = {per_iteration // ppo.mini_batches} rollouts per "
                f"optimizer step cannot be split over {world} processes in micro-batches of train.micro_batch_size="
                f"{recipe.train.micro_batch_size} rollouts; each rank needs a multiple of the micro-batch")
        # one optimizer step = one mini-batch of rollouts; DeepSpeed's batch config follows from it
        recipe.train.global_batch_size, recipe.train.gradient_accumulation_steps = per_iteration // ppo.mini_batches, None
        self.recipe, self.ppo = recipe, ppo
        self.engine = Engine.create(recipe)
        self.state = RLHFState()
        self.moments = RunningMoments()

    # --- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        recipe, ppo, engine = self.recipe, self.ppo, self.engine
        check_model_path(recipe.model.name_or_path)
        if ppo.uses_reward_model:
            check_model_path(ppo.reward_model, "ppo.reward_model", MAKE_RM)
        self.tokenizer = tok = load_tokenizer(recipe.model)
        actor = load_causal_lm(recipe.model, tok, torch.float32, seed=recipe.train.seed)
        rm_cfg = ModelConfig(name_or_path=ppo.reward_model or "", trust_remote_code=recipe.model.trust_remote_code,
                             attn_implementation=recipe.model.attn_implementation)  # fmt: skip
        critic = None
        if ppo.uses_critic:  # gae: the critic starts from the reward model; the critic-free estimators build none
            critic = load_reward_model(rm_cfg, tok, torch.float32, seed=recipe.train.seed)
            if critic.config.vocab_size != actor.config.vocab_size:
                raise UserError(f"ppo.reward_model has vocabulary {critic.config.vocab_size}, the policy {actor.config.vocab_size}: "
                                 "the critic starts from the reward model, so they must share a tokenizer")  # fmt: skip
        self.reference = None  # kl_coef 0: no KL anywhere, so no reference model
        if ppo.kl_coef > 0:
            reference_cfg = dataclasses.replace(recipe.model, gradient_checkpointing=False, lora=dataclasses.replace(recipe.model.lora, enabled=False))
            self.reference = prepare_frozen(load_causal_lm(reference_cfg, tok, engine.dtype, seed=recipe.train.seed), engine.accelerator)
        self.conditions = recipe.reward.conditions
        self.reward_model, self.reward_token, self.reward_token_id, stats = None, None, None, {}
        if ppo.uses_reward_model:
            with without_zero3_init():  # a whole replica per rank: scoring needs no collectives and the fast path trains it locally
                # the fast path trains it: fp32 master weights (bf16 would round a 1e-5 step away), scored under autocast
                rm_dtype = torch.float32 if self.updates_reward_model else engine.dtype
                self.reward_model = load_reward_model(rm_cfg, tok, rm_dtype).to(engine.device).eval().requires_grad_(False)
            info = RewardModelInfo.read(ppo.reward_model)
            info.check_conditions(self.conditions, ppo.reward_model)
            # scored at its reward token everywhere (router and fast-path comparisons) if it was trained with one
            self.reward_token = info.resolve_reward_token(recipe.reward.reward_token, ppo.reward_model)
            self.reward_token_id = reward_token_id(tok, self.reward_token)
            stats = info.stats
        # short rows: CPU attention computes each row's whole length × length block, masked or not
        self.router = RewardRouter(ppo.routes, self.reward_model, tok, self.conditions, stats, self.reward_token_id,
                                   row_tokens=self._row_tokens(), autocast_dtype=engine.dtype,
                                   process_scorer=load_process_scorer(ppo, recipe.model, tok, engine.device, engine.dtype,
                                                                      actor.config.vocab_size, self._row_tokens()))  # fmt: skip

        self.prompts = load_prompts(ppo.prompts_path, recipe.data.synthetic, ppo.num_prompts, split="train")
        self.eval_problems = load_prompts(recipe.eval.prompts_path, recipe.data.synthetic, recipe.eval.num_prompts) if recipe.eval.enabled else []
        for problem in (*self.prompts, *self.eval_problems):  # PPO's experience forward carries no tiles yet
            if text_messages(problem["messages"], "prompts", 0)[1]:
                raise UserError(f"align rlhf trains on text prompts only so far; prompt {problem['uid']!r} has images (image prompts go "
                                "through align mpo's sampled pairs or align sft's rejection sampling)")  # fmt: skip
        self.ptx_samples, self.ptx_rows = [], []
        if ppo.ptx_coef > 0 and recipe.data.train:
            policy = BadRowPolicy.for_run(recipe.data.on_bad_row, engine.run_dir, engine.is_main)
            self.ptx_samples, _ = build_samples(recipe.data.train, recipe.data, tok, policy, "train")
            policy.write()  # skipped pretraining rows are quarantined, never dropped silently
            self.ptx_rows = build_rows(self.ptx_samples, recipe.data.max_length, recipe.data.packing)

        model = ActorCritic(actor, critic)
        self.total_iterations = ppo.rounds * ppo.iterations_per_round
        steps_per_iteration = ppo.ppo_epochs * ppo.mini_batches
        optimizer = build_actor_critic_optimizer(model, recipe.optim, ppo.critic_lr)
        scheduler = build_actor_critic_scheduler(optimizer, recipe.optim, self.total_iterations * steps_per_iteration,
                                                 ppo.critic_warmup_iterations * steps_per_iteration)  # fmt: skip
        fill_model_sizes(engine.accelerator, model)
        self.model, optimizer, scheduler = engine.accelerator.prepare(model, optimizer, scheduler)
        self.critic = engine.accelerator.unwrap_model(self.model).critic  # None without one
        self.stepper = Stepper(engine, self.model, optimizer, scheduler, recipe.optim.max_grad_norm, recipe.train.max_bad_steps)
        self.scheduler = scheduler
        self.buffer = RolloutBuffer()
        self.drift = SamplerDrift()
        self.checkpointer = Checkpointer(engine.accelerator, engine.run_dir / "checkpoints", recipe.train.keep_last)

    @property
    def updates_reward_model(self) -> bool:
        return self.ppo.rm_update_steps > 0

    @property
    def on_policy(self) -> bool:
        """One optimizer step per iteration and nothing needs the old log-probs before it: the policy that sampled is the
        one being trained, so the old log-probs are the trained forward's own, detached (TRL's shortcut), one forward saved."""
        ppo = self.ppo
        return ppo.ppo_epochs == 1 and ppo.mini_batches == 1 and not (ppo.kl_coef > 0 and not ppo.kl_in_loss)

    # --- one iteration ------------------------------------------------------------------------
    def iteration_prompts(self, iteration: int) -> list[dict]:
        """This rank's prompts: the next slice of a seeded permutation of the pool (a new one per pass)."""
        per, pool = self.ppo.prompts_per_iteration, len(self.prompts)
        picked = []
        for k in range(iteration * per, (iteration + 1) * per):
            epoch, index = divmod(k, pool)
            order = torch.randperm(pool, generator=torch.Generator().manual_seed(self.recipe.train.seed * 7919 + epoch), device="cpu").tolist()
            picked.append(self.prompts[order[index]])
        mine = per // self.engine.world_size
        return picked[self.engine.rank * mine : (self.engine.rank + 1) * mine]

    def generator(self, batch_size: int | None = None) -> Generator:
        """The recipe's generator (`rollout.engine`) on the actor; a vLLM engine syncs when the optimizer has stepped."""
        return make_generator(self.model, self.tokenizer, self.engine, batch_size or self.ppo.generation_batch_size, submodule="actor",
                              version=lambda: self.state.optimizer_steps)  # fmt: skip

    def _seed(self, iteration: int, salt: int = 0) -> int:
        return self.recipe.train.seed * 1_000_003 + iteration * 1009 + salt * 101 + self.engine.rank

    def _trained(self, rollout) -> bool:
        return not (rollout.truncated and self.ppo.truncated == "drop")

    def run_iteration(self, iteration: int) -> dict[str, float]:
        ppo, engine = self.ppo, self.engine
        timings = {}
        start = time.perf_counter()
        torch.manual_seed(self._seed(iteration))
        params = SamplingParams(ppo.max_new_tokens, ppo.samples_per_prompt, ppo.temperature, ppo.top_p)
        problems = self.iteration_prompts(iteration)
        generator = self.generator()
        generations = generator.generate([p["messages"] for p in problems], params)
        timings["generate"] = time.perf_counter() - start
        if getattr(generator, "last_sync_seconds", None) is not None:  # inside `generate`: the weights into the engine
            timings["weight_sync"] = generator.last_sync_seconds

        start = time.perf_counter()
        round_index = iteration // ppo.iterations_per_round
        rollouts = collect_rollouts(_Replay(generations), self.router, problems, params, round_index, iteration)
        raw = torch.tensor([r.reward for r in rollouts], device="cpu")
        outcome = [outcome_reward(self.router, r, ppo.dense_process_rewards) for r in rollouts]
        scores = torch.tensor(outcome, device="cpu").clamp(-ppo.reward_clip, ppo.reward_clip)
        dense = dense_step_rewards(self.router, rollouts) if ppo.dense_process_rewards else None  # the PRM's steps, on their tokens
        truncated = torch.tensor([r.truncated for r in rollouts], device="cpu")
        if ppo.truncated == "penalty":
            scores = scores + truncated.float() * ppo.truncation_penalty
        trained = torch.tensor([self._trained(r) for r in rollouts], device="cpu")
        if ppo.normalize_reward:
            self.moments.update(*global_sums(scores[trained], engine.accelerator))
            scores = self.moments.normalize(scores)
        timings["score"] = time.perf_counter() - start

        start = time.perf_counter()
        self.compute_experience(rollouts)
        kl_in_reward = 0.0 if ppo.kl_in_loss else ppo.kl_coef
        if ppo.uses_critic:
            kl = assign_advantages(rollouts, scores, kl_in_reward, ppo.kl_estimator, ppo.gamma, ppo.lam, dense)
        else:
            kl = assign_group_advantages(rollouts, scores, ppo.advantage_estimator, ppo.samples_per_prompt, kl_in_reward, ppo.kl_estimator,
                                         ppo.gamma, ppo.scale_rewards, self._batch_std, dense)  # fmt: skip
        if self.on_policy:  # the old log-probs were not computed: the per-token k3 KL of the update is `kl_loss`
            kl = torch.full_like(kl, float("nan"))
        if ppo.whiten_advantages or ppo.advantage_estimator == "reinforce_baseline":  # REINFORCE++: whitened over the global batch
            RolloutBuffer([r for r in rollouts if self._trained(r)]).normalize_advantages(engine.accelerator)
        timings["experience"] = time.perf_counter() - start

        start = time.perf_counter()
        actor_on = iteration >= ppo.critic_warmup_iterations
        losses = self.train_on(rollouts, iteration, actor_on)
        timings["train"] = time.perf_counter() - start

        self.buffer.add(rollouts)
        for r in self.buffer.rollouts:  # step-level fields are spent once the update has used them
            if r.policy_version < iteration:
                r.logprobs = r.ref_logprobs = r.values = r.advantages = r.returns = r.sampler_logprobs = None
        return self.iteration_metrics(rollouts, raw, kl, trained, losses, timings, actor_on)

    @torch.no_grad()
    def compute_experience(self, rollouts: list) -> None:
        """Old log-probs, reference log-probs and values, in the same micro-batches on every rank."""
        model, engine = self.model, self.engine
        model.eval()
        micro = self.recipe.train.micro_batch_size
        row_tokens = self._row_tokens()
        for start in range(0, len(rollouts), micro):
            part = rollouts[start : start + micro]
            batch = collate_rollouts(part, self.tokenizer.pad_token_id, row_tokens).to(engine.device)
            width = int(sum(batch.lengths))
            # what is not needed is not computed: placeholders keep the buffer's record shape (old = ref = 0: no KL)
            logprobs = torch.zeros(width, device=engine.device) if self.on_policy else actor_logprobs(model, batch)[0]
            if not self.on_policy and all(r.sampler_logprobs is not None for r in part):
                self.drift.add(logprobs, batch.flat([r.sampler_logprobs for r in part]).to(engine.device))
            reference = actor_logprobs(self.reference, batch)[0] if self.reference is not None else logprobs.clone()
            values = critic_values(model, batch, self.critic, role="critic") if self.critic is not None else torch.zeros_like(logprobs)
            for name, flat in (("logprobs", logprobs), ("ref_logprobs", reference), ("values", values)):
                for r, value in zip(part, batch.per_rollout(flat.float().cpu(), len(part)), strict=True):
                    setattr(r, name, value)
        model.train()

    def _row_tokens(self) -> int:
        return max(self.recipe.data.max_length, 2 * self.ppo.max_new_tokens)

    def _ptx_batch(self, draw: int):
        """The PTX rows of one rank's micro-step: a seeded walk over the packed `data.train` rows."""
        n, k = len(self.ptx_rows), self.ppo.ptx_rows
        ids = []
        for j in range(draw * k, (draw + 1) * k):
            epoch, index = divmod(j, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.recipe.train.seed * 104_729 + epoch), device="cpu").tolist()
            ids.append(order[index])
        return collate_rows([[self.ptx_samples[i] for i in self.ptx_rows[r]] for r in ids], self.tokenizer.pad_token_id)

    def train_on(self, rollouts: list, iteration: int, actor_on: bool) -> dict[str, float]:
        """`ppo_epochs` × `mini_batches` guarded optimizer steps over this iteration's rollouts; exact token means over all ranks.

        Each step goes through `Stepper.step`, as every trainer's does: a non-finite PPO loss (the importance ratio is where
        NaNs come from) skips the step on every rank and counts it; `train.max_bad_steps` in a row stop the run.
        """
        ppo, engine, acc = self.ppo, self.engine, self.engine.accelerator
        micro = self.recipe.train.micro_batch_size
        use_ptx = actor_on and bool(self.ptx_rows)
        seen: dict[str, list[torch.Tensor]] = defaultdict(list)
        norms: list[float] = []
        for epoch in range(ppo.ppo_epochs):
            order = torch.randperm(len(rollouts), generator=torch.Generator().manual_seed(self._seed(iteration, 1 + epoch)), device="cpu").tolist()
            size = len(order) // ppo.mini_batches
            for m in range(ppo.mini_batches):
                chosen = [rollouts[i] for i in order[m * size : (m + 1) * size]]
                parts = [chosen[g : g + micro] for g in range(0, len(chosen), micro)]
                draws = [(self.state.optimizer_steps * len(parts) + g) * engine.world_size + engine.rank for g in range(len(parts))]
                ptx_batches = [self._ptx_batch(d) for d in draws] if use_ptx else [None] * len(parts)
                tokens = float(sum(len(r.response_ids) for r in chosen if self._trained(r)))
                sequences = float(sum(self._trained(r) for r in chosen))
                ptx_tokens = float(sum(float(b.weights.sum()) for b in ptx_batches if b is not None))
                local = torch.tensor([tokens, ptx_tokens, sequences], device="cpu")
                total_tokens, total_ptx, total_sequences = (acc.reduce(local.to(engine.device), "sum").cpu() if engine.world_size > 1 else local).tolist()
                step_totals = {"tokens": total_tokens, "sequences": total_sequences, "micro_batches": float(len(parts) * engine.world_size)}
                weights = token_loss_weights([[(len(r.response_ids), self._trained(r)) for r in part] for part in parts], ppo.loss_type,
                                             step_totals, ppo.max_new_tokens)  # fmt: skip
                items = [(self.ppo_batch(part, w), ptx) for part, w, ptx in zip(parts, weights, ptx_batches, strict=True)]  # host tensors

                loss_fn = functools.partial(self.micro_loss, total_tokens=max(total_tokens, 1.0), total_ptx=max(total_ptx, 1.0), actor_on=actor_on)
                result = self.stepper.step(items, loss_fn, tokens)
                self.state.optimizer_steps += 1
                self.state.skipped_steps = self.stepper.skipped_steps
                if result.applied:
                    self.state.tokens += result.tokens
                    norms.append(result.grad_norm or 0.0)
                    for key, values in result.metrics.items():
                        seen[key] += values
        sums = {k: float(torch.stack(v).sum()) for k, v in seen.items() if k not in ("values", "returns")}
        tokens = max(sums.pop("tokens", 0.0), 1.0)
        out = {k: sums[k] / tokens for k in ("policy_loss", "value_loss", "clip_fraction", "entropy", "kl_loss") if k in sums}
        if "ptx_nll" in sums:
            out["ptx_loss"] = sums["ptx_nll"] / max(sums["ptx_tokens"], 1.0)
        out["grad_norm"] = sum(norms) / max(len(norms), 1)
        out["skipped_steps"] = float(self.stepper.skipped_steps)
        if seen.get("values"):
            v, r = torch.cat(seen["values"]).cpu(), torch.cat(seen["returns"]).cpu()
            out["explained_variance"] = explained_variance(v, r, torch.ones_like(v))
        return out

    def ppo_batch(self, part: list, loss_weights: list[torch.Tensor]) -> PPOBatch:
        """A micro-batch's rollouts packed into rows with their per-token training targets, built on the host."""
        batch = collate_rollouts(part, self.tokenizer.pad_token_id, self._row_tokens())
        weight = batch.flat([torch.full((len(r.response_ids),), float(self._trained(r)), device="cpu") for r in part])
        fields = {name: batch.flat([getattr(r, name) for r in part]) for name in ("returns", "values", "logprobs", "ref_logprobs", "advantages")}
        if all(r.sampler_logprobs is not None for r in part):
            fields["sampler_logprobs"] = batch.flat([r.sampler_logprobs for r in part])
        return PPOBatch(batch, weight, loss_weight=batch.flat(loss_weights), **fields)

    def _batch_std(self, scores: torch.Tensor) -> float:
        """The (Bessel-corrected) std of `scores` over every rank: GRPO's `scale_rewards: batch`."""
        total, squares, count = global_sums(scores, self.engine.accelerator)
        return max((squares - total * total / count) / max(count - 1, 1.0), 0.0) ** 0.5

    def micro_loss(self, item: tuple[PPOBatch, Any], total_tokens: float, total_ptx: float, actor_on: bool) -> tuple[torch.Tensor, dict]:
        """This micro-batch's (PPO batch, PTX rows) share of the step loss, and its detached per-token statistics (no host sync)."""
        ppo = self.ppo
        ppo_batch, ptx_batch = item
        data = ppo_batch.to(self.engine.device)
        batch, weight = data.rows, data.weight
        loss = torch.zeros((), device=weight.device)
        stats = {"tokens": weight.sum()}
        if self.critic is not None:
            values = critic_values(self.model, batch, self.critic, role="critic")
            value_sum = (value_loss_tokens(values, data.values, data.returns, ppo.value_clip) * weight).sum()
            loss = loss + value_sum / total_tokens
            kept = weight > 0
            stats |= {"value_loss": value_sum.detach(), "values": values.detach()[kept], "returns": data.returns[kept]}
        if actor_on:
            logprobs, entropy = actor_logprobs(self.model, batch, with_entropy=True)
            old = logprobs.detach() if self.on_policy else data.logprobs
            if self.on_policy and data.sampler_logprobs is not None:  # before this step: the sampling policy's own forward
                self.drift.add(logprobs, data.sampler_logprobs)
            per_token, clipped = policy_loss_tokens(logprobs, old, data.advantages, ppo.clip, ppo.clip_high)
            stats |= {"policy_loss": (per_token.detach() * weight).sum(), "clip_fraction": (clipped * weight).sum(),
                      "entropy": (entropy * weight).sum()}  # fmt: skip
            if ppo.kl_in_loss and ppo.kl_coef > 0:  # GRPO: β·k3 KL per token, inside the normalisation as TRL adds it
                kl = k3_kl(logprobs, data.ref_logprobs)
                per_token = per_token + ppo.kl_coef * kl
                stats["kl_loss"] = (kl.detach() * weight).sum()
            loss = loss + (per_token * data.loss_weight).sum()
        if ptx_batch is not None:
            ptx_batch = ptx_batch.to(self.engine.device)
            logprobs, mask = target_logprobs(self.model, ptx_batch)
            nll = -(logprobs * ptx_batch.weights[mask]).sum()
            loss = loss + ppo.ptx_coef * nll / total_ptx
            stats |= {"ptx_nll": nll.detach(), "ptx_tokens": ptx_batch.weights[mask].sum()}
        return loss, stats

    def iteration_metrics(self, rollouts: list, raw: torch.Tensor, kl: torch.Tensor, trained: torch.Tensor, losses: dict,
                          timings: dict, actor_on: bool) -> dict[str, float]:  # fmt: skip
        """Reward per condition, verifier accuracy, KL, length, truncated share, losses and the time split, over all ranks."""
        records = [(r.condition or "default", float(raw[i]), r.correct, len(r.response_ids), r.truncated, float(kl[i])) for i, r in enumerate(rollouts)]
        records = gather_object(records) if self.engine.world_size > 1 else records
        by: dict[str, list[float]] = defaultdict(list)
        right: dict[str, list[bool]] = defaultdict(list)
        for condition, reward, correct, *_ in records:
            by[condition].append(reward)
            if correct is not None:
                right[condition].append(correct)
        judged = [c for _, _, c, *_ in records if c is not None]
        n = len(records)
        metrics = {
            "reward": sum(r[1] for r in records) / n,
            "verifier_accuracy": sum(judged) / len(judged) if judged else float("nan"),
            "kl": sum(r[5] for r in records) / n,
            "response_length": sum(r[3] for r in records) / n,
            "truncated_share": sum(r[4] for r in records) / n,
            "actor_trained": float(actor_on),
            "reward_mean_running": self.moments.mean,
            "reward_std_running": self.moments.std,
            **{f"reward/{c}": sum(v) / len(v) for c, v in sorted(by.items())},
            **{f"verifier_accuracy/{c}": sum(v) / len(v) for c, v in sorted(right.items())},
            **losses,
            **{f"time/{k}": v for k, v in timings.items()},
            **self.drift.metrics(self.engine.accelerator),
        }
        lrs = self.scheduler.get_last_lr()
        groups = self.stepper.optimizer.param_groups if hasattr(self.stepper.optimizer, "param_groups") else []
        for g, lr in zip(groups, lrs):
            metrics[f"lr/{g.get('role', 'model')}"] = lr
        return metrics

    # --- between rounds -----------------------------------------------------------------------
    def between_rounds(self, round_index: int) -> dict[str, Any]:
        """Fast path (detectors → early-vs-late comparisons) and slow path (new comparison files) → a short RM update."""
        ppo, engine = self.ppo, self.engine
        episodes = [r.episode_fields() for r in self.buffer.rollouts if r.round == round_index]
        episodes = gather_object(episodes) if engine.world_size > 1 else episodes
        from align.rollout.buffer import Rollout

        this_round = [Rollout(**e) for e in episodes]
        early, late = split_early_late(this_round)
        report = {"round": round_index, **detect_hacking(early, late, ppo.detectors)}
        fast_rows = RolloutBuffer().comparisons(early, late)
        policy = BadRowPolicy(self.recipe.data.on_bad_row)
        pairs = comparison_pairs(fast_rows, self.tokenizer, self.conditions, f"round-{round_index}/fast-path", policy, self.recipe.data.max_length,
                                 self.reward_token_id)
        slow = 0
        if ppo.comparisons_dir and Path(ppo.comparisons_dir).exists():
            for path, rows in read_comparison_files(ppo.comparisons_dir, set(self.state.ingested)):
                found = comparison_pairs(rows, self.tokenizer, self.conditions, path, policy, self.recipe.data.max_length, self.reward_token_id)
                pairs += found
                slow += len(found)
                self.state.ingested.append(path)
        report |= {"fast_path_pairs": len(fast_rows), "slow_path_pairs": slow, "quarantined": policy.count}
        if engine.is_main and policy.count:
            policy.write(engine.run_dir / f"quarantine-round-{round_index}.jsonl")
        if pairs and ppo.rm_update_steps > 0:
            report["rm_update"] = update_reward_model(self.reward_model, pairs, self.tokenizer.pad_token_id, self.recipe.reward,
                                                      ppo.rm_update_steps, ppo.rm_update_lr, ppo.rm_update_batch,
                                                      self.recipe.train.seed + round_index)  # fmt: skip
            self.state.rm_updated = True
            if self.router.stats:  # the per-condition normalisation follows the changed model: re-measured on this round's samples
                samples = [{"condition": r.condition or "default", "prompt": r.prompt, "response": r.response} for r in this_round]
                self.router.stats = self.state.reward_stats = self.router.condition_stats(samples)
                report["reward_stats"] = self.state.reward_stats
        return report

    # --- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Greedy answers to the held-out prompts: mean reward (the router), task accuracy, per condition; plus the texts."""
        engine = self.engine
        mine = self.eval_problems[engine.rank :: engine.world_size]
        params = SamplingParams(self.recipe.eval.max_new_tokens, 1, 0.0)
        rollouts = collect_rollouts(self.generator(self.recipe.eval.batch_size), self.router, mine, params)
        texts = [(engine.rank + engine.world_size * i, r.response) for i, r in enumerate(rollouts)]
        texts = gather_object(texts) if engine.world_size > 1 else texts
        return self.score_texts(sorted(texts))

    @torch.no_grad()
    def score_texts(self, texts: list[tuple[int, str]]) -> dict[str, Any]:
        """Router reward and task accuracy of (problem index, response) pairs, sharded over ranks and gathered."""
        engine = self.engine
        mine = texts[engine.rank :: engine.world_size]
        samples = [{**self.eval_problems[i], "prompt": self.eval_problems[i]["messages"], "response": t,
                    "condition": self.eval_problems[i].get("condition") or "default"} for i, t in mine]  # fmt: skip
        rewards = self.router.score(samples).scores.tolist() if samples else []
        records = [(s["condition"], reward, task_score(s, s["response"])) for s, reward in zip(samples, rewards)]
        records = gather_object(records) if engine.world_size > 1 else records
        by: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for condition, reward, score in records:
            by[condition].append((reward, score))
        n = max(1, len(records))
        return {
            "reward": sum(r for _, r, _ in records) / n,
            "accuracy": sum(s for _, _, s in records) / n,
            "reward_by_condition": {c: sum(r for r, _ in v) / len(v) for c, v in sorted(by.items())},
            "accuracy_by_condition": {c: sum(s for _, s in v) / len(v) for c, v in sorted(by.items())},
            "texts": texts,
        }

    # --- checkpoints --------------------------------------------------------------------------
    def save(self, iteration: int) -> None:
        engine = self.engine

        def extra(directory: Path) -> None:
            self.buffer.save(directory, f"rollouts-rank{engine.rank}")
            if engine.is_main and self.state.rm_updated:
                save_file({k: v.contiguous() for k, v in self.reward_model.state_dict().items()}, str(directory / RM_FILE))

        self.state.reward_moments = self.moments.state_dict()
        self.checkpointer.save(iteration, {"rlhf": dataclasses.asdict(self.state)}, extra)

    def resume(self) -> bool:
        self.checkpointer.for_recipe(self.recipe).clean_partial()
        latest = self.checkpointer.resume_point(self.recipe.train.resume)  # newest verified checkpoint of this recipe
        if latest is None:
            return False
        saved = self.checkpointer.load(latest)
        self.state = RLHFState(**saved["rlhf"])
        self.stepper.skipped_steps = self.state.skipped_steps
        if self.state.reward_moments:
            self.moments.load_state_dict(self.state.reward_moments)
        self.buffer = RolloutBuffer.load(latest, f"rollouts-rank{self.engine.rank}")
        if self.state.rm_updated:
            self.reward_model.load_state_dict(load_file(str(latest / RM_FILE)))
        if self.state.reward_stats:
            self.router.stats = self.state.reward_stats
        if self.engine.is_main:
            print(f"resumed from {latest} at iteration {self.state.iteration}", flush=True)
        return True

    # --- the run ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        recipe, ppo, engine = self.recipe, self.ppo, self.engine
        finished = check_run_dir(recipe, is_main=engine.is_main)  # a finished run of this recipe is not trained again
        if finished is not None:
            engine.accelerator.end_training()
            return finished
        prepare_run_dir(recipe, engine.accelerator)
        self.setup()
        self.resume()
        if recipe.eval.enabled and not self.state.before:
            self.state.before = self.evaluate()
        logger = RunLogger(recipe.logging, engine.run_dir, flat_dict(recipe), self.total_iterations, engine.is_main, self.name)
        logger.set_progress(self.state.iteration)
        save_every = recipe.train.save_every
        while self.state.iteration < self.total_iterations:
            t = self.state.iteration
            metrics = self.run_iteration(t)
            for key in ("generate", "score", "experience", "train"):
                self.state.seconds[key] = self.state.seconds.get(key, 0.0) + metrics[f"time/{key}"]
            self.state.last = metrics
            self.state.iteration = t + 1
            round_end = self.state.iteration % ppo.iterations_per_round == 0 and self.state.iteration < self.total_iterations
            if round_end:
                report = self.between_rounds(t // ppo.iterations_per_round)
                self.state.rounds.append(report)
                metrics |= {"round/flags": len(report["flags"]), "round/comparisons": report["fast_path_pairs"] + report["slow_path_pairs"]}
            logger.log(self.state.iteration, metrics, advance=1)
            if save_every and self.state.iteration % save_every == 0 and self.state.iteration < self.total_iterations:
                self.save(self.state.iteration)
        return self.finish(logger, started)

    def finish(self, logger: RunLogger, started: float) -> dict[str, Any]:
        recipe, engine = self.recipe, self.engine
        paths = export_actor_critic(engine.accelerator, self.model, self.tokenizer, engine.run_dir)
        if self.state.rm_updated and engine.is_main:
            self.reward_model.save_pretrained(engine.run_dir / "reward_model", safe_serialization=True)
            self.tokenizer.save_pretrained(engine.run_dir / "reward_model")
            RewardModelInfo(self.conditions, self.router.stats, self.reward_token).write(engine.run_dir / "reward_model")
        self.buffer.save(engine.run_dir, f"rollouts-rank{engine.rank}")
        last = self.state.last
        metrics: dict[str, Any] = {"kl": last.get("kl", float("nan")), **({"kl_loss": last["kl_loss"]} if "kl_loss" in last else {}),
                                   "train_reward_last": last.get("reward"),
                                   "train_verifier_accuracy_last": last.get("verifier_accuracy")}  # fmt: skip
        samples = None
        if recipe.eval.enabled:
            after = self.evaluate()
            before = self.score_texts(self.state.before["texts"])  # re-scored by the final router: one scale for both
            metrics |= {
                "reward_before": before["reward"], "reward_after": after["reward"],
                "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"], "accuracy": after["accuracy"],
                "reward_by_condition_before": before["reward_by_condition"], "reward_by_condition_after": after["reward_by_condition"],
                "accuracy_by_condition_before": before["accuracy_by_condition"], "accuracy_by_condition": after["accuracy_by_condition"],
            }  # fmt: skip
            samples = [{"problem": self.eval_problems[i]["messages"][-1]["content"], "response": t} for i, t in after["texts"][:6]]
        summary = {
            "job": self.name,
            "metrics": metrics,
            "iterations": self.state.iteration,
            "optimizer_steps": self.state.optimizer_steps,
            "rounds": self.state.rounds,
            "time_split_s": {k: round(v, 2) for k, v in self.state.seconds.items()},
            "wall_s": round(time.perf_counter() - started, 2),
            "world_size": engine.world_size,
            "deepspeed": engine.deepspeed,
            "model_path": str(paths["actor"].resolve()),
            "critic_path": str(paths["critic"].resolve()) if "critic" in paths else None,
            "advantage_estimator": self.ppo.advantage_estimator,
            "data": {"prompts": len(self.prompts), "ptx_rows": len(self.ptx_rows), "eval_prompts": len(self.eval_problems)},
            "steps": self.state.optimizer_steps,
            "tokens": self.state.tokens,
            "skipped_steps": self.state.skipped_steps,
            "recipe_fingerprint": recipe_fingerprint(recipe),
            "rollout": rollout_summary(self.generator()),
        }
        if samples is not None:
            summary["eval_samples"] = samples
        logger.summary({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        logger.close()
        if engine.is_main:
            tmp = engine.run_dir / "summary.tmp"
            tmp.write_text(json.dumps(summary, indent=2, default=str))
            tmp.replace(engine.run_dir / "summary.json")
        engine.accelerator.wait_for_everyone()
        engine.accelerator.end_training()
        return summary


class _Replay:
    """A generator that hands back generations already made (so generation and scoring are timed apart)."""

    def __init__(self, generations: list):
        self.generations = generations

    def generate(self, prompts: list, params: SamplingParams, prefixes: list[str] | None = None) -> list:
        return self.generations


def run_rlhf(recipe: RLHFRecipe) -> dict[str, Any]:
    return RLHFTrainer(recipe).run()

