"""MPO (InternVL2.5-MPO / InternVL3): preference + quality + generation losses in one forward per batch.

Data: preference rows → chosen/rejected rendered with the chat template (`data_builders.preference_data`)
→ shared-prefix pair units packed into rows (`data_builders.pair_rows`): the prompt, and whatever the two
responses share, is computed once; neither response attends to the other. Log-probs are taken only at
response positions (the LM head never runs on the prompt; `losses/logprobs.py`). The reference's
log-probs come from a frozen copy, the policy with its LoRA adapters disabled, or a cache computed once.

Loss: Σ_i w_i · L_i over the registered losses named in `mpo.losses` (`losses/preference.py`), each an
exact step mean over pairs or chosen tokens. BCO's δ is the running mean of past rewards
mean(β·lr_c, β·lr_r), gathered across ranks, updated before use, and saved in checkpoints.
"""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import gather_object

from align.config import MPORecipe
from align.engine.models import load_causal_lm, load_tokenizer, prepare_frozen, resolve_attention
from align.engine.plan import eval_micro_batches
from align.engine.vision import has_vision, image_text_for, prepare_images
from align.evaluation import load_prompts, task_accuracy
from align.losses import get_loss
from align.losses.logprobs import hidden_states, logprobs_of
from align.losses.preference import PreferenceInputs, RunningMean
from align.model_paths import check_model_path
from align.rollout.generation import SamplingParams
from align.trainers.base import Trainer
from align.trainers.policy_samples import buffer_counts, gather_rows, rows_once, sample_rollouts, sum_over_ranks
from align.trainers.reference_cache import ReferenceCache
from data_builders.bad_rows import BadRowPolicy
from data_builders.errors import UserError
from data_builders.pair_builders import GeneratedSample, dropout_ntp_pairs
from data_builders.pair_rows import PairRows, collate_pair_rows, pack_pairs, resolve_share_prefix
from data_builders.preference_data import PreferencePair, build_preference_pairs


@dataclass
class PreferenceBatch:
    rows: PairRows
    positions: torch.Tensor  # (targets, 2): (row, index) of the hidden state predicting each response token
    targets: torch.Tensor  # (targets,) response token ids
    sequence: torch.Tensor  # (targets,) 2·pair + side (0 chosen, 1 rejected)
    chosen_tokens: torch.Tensor  # (pairs,)
    pair_ids: list[int]  # indices into the split's pairs
    conditions: list[str | None]
    reference: torch.Tensor | None = None  # (pairs, 2) precomputed reference sums

    @property
    def num_pairs(self) -> int:
        return len(self.pair_ids)

    @property
    def num_tokens(self) -> int:
        return self.rows.num_tokens

    def to(self, device: torch.device | str) -> PreferenceBatch:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[key] = value.to(device)
        moved["rows"] = self.rows.to(device)
        return PreferenceBatch(**moved)


def collate_preference(pairs: Sequence[Sequence[PreferencePair]], pair_ids: list[int], pad_id: int, share_prefix: bool) -> PreferenceBatch:
    """Rows of pairs → shared-prefix rows plus, per response token, where its prediction is read."""
    with_images = any(p.images for row in pairs for p in row)  # tiles travel with their pairs (once in a shared prompt)
    rows = collate_pair_rows([[(p.chosen, p.rejected) for p in row] for row in pairs], pad_id, share_prefix, images=pairs if with_images else None)
    flat = [p for row in pairs for p in row]
    positions, targets, sequence = [], [], []
    for k, (span, pair) in enumerate(zip(rows.spans, flat, strict=True)):
        for side, (index, ids) in enumerate(((span.chosen_index(), pair.chosen), (span.rejected_index(), pair.rejected))):
            start = pair.prompt_length
            positions += [(span.row, i) for i in index[start - 1 : len(ids) - 1]]
            targets += ids[start:]
            sequence += [2 * k + side] * (len(ids) - start)
    return PreferenceBatch(
        rows,
        torch.tensor(positions, dtype=torch.long, device="cpu"),
        torch.tensor(targets, dtype=torch.long, device="cpu"),
        torch.tensor(sequence, dtype=torch.long, device="cpu"),
        torch.tensor([p.chosen_tokens for p in flat], dtype=torch.float32, device="cpu"),
        pair_ids,
        [p.condition for p in flat],
    )


def sequence_logprobs(model: torch.nn.Module, batch: PreferenceBatch) -> torch.Tensor:
    """(pairs, 2) summed response-token log-probs of chosen and rejected, from one forward."""
    rows = batch.rows
    hidden = hidden_states(model, rows.input_ids, rows.position_ids, rows.lengths(), rows.attention_mask, pixel_values=rows.pixel_values)
    logprobs = logprobs_of(model, hidden[batch.positions[:, 0], batch.positions[:, 1]], batch.targets)
    sums = torch.zeros(2 * batch.num_pairs, dtype=logprobs.dtype, device=logprobs.device)
    return sums.index_add(0, batch.sequence, logprobs).view(-1, 2)


class MPOTrainer(Trainer):
    name = "mpo"
    recipe_type = MPORecipe

    def setup(self) -> None:
        recipe, engine, data, cfg = self.recipe, self.engine, self.recipe.data, self.recipe.mpo
        check_model_path(recipe.model.name_or_path)
        for name in cfg.losses:
            get_loss(name, "preference")  # unknown names fail before any model loads
        if cfg.sampled_pairs.rounds > 1:
            raise UserError("mpo.sampled_pairs.rounds > 1 is online MPO: run it with `align mpo` (align.trainers.online_mpo), not as one job")
        if cfg.reference == "adapters" and not recipe.model.lora.enabled:
            raise UserError("mpo.reference=adapters needs model.lora.enabled=true (the reference is the policy without adapters)")
        self.tokenizer = load_tokenizer(recipe.model)
        model_cfg = dataclasses.replace(recipe.model, attn_implementation=resolve_attention(recipe.model.attn_implementation,
                                                                                           needs_4d_mask=data.share_prefix is True))
        self.model = load_causal_lm(model_cfg, self.tokenizer, torch.float32, seed=recipe.train.seed)
        self.share_prefix = resolve_share_prefix(data.share_prefix, self.model)
        self.bad_rows = BadRowPolicy.for_run(data.on_bad_row, engine.run_dir, engine.is_main)
        self.model.to(engine.device)
        self.sampled_stats: dict[str, Any] = {}
        self.images = image_text_for(self.model, self.tokenizer, data.images)  # a VLM: prompt images become tiles and tokens
        sampled = self._sampled_pairs() if cfg.sampled_pairs.enabled else []
        self.pairs = build_preference_pairs(data.train, data, self.tokenizer, self.bad_rows, "train", extra_rows=sampled, conditions=cfg.conditions,
                                            images=self.images)  # fmt: skip
        eval_sources = data.eval_sources()
        self.eval_pairs = (build_preference_pairs(eval_sources, data, self.tokenizer, self.bad_rows, "eval", conditions=cfg.conditions,
                                                  images=self.images) if eval_sources else [])  # fmt: skip
        self.bad_rows.write()  # the main rank writes the skipped rows and says how many went where
        capacity = data.pair_row_tokens or 2 * data.max_length
        self.train_rows, saved = pack_pairs(self.pairs, capacity, data.packing, self.share_prefix)
        self.eval_rows = pack_pairs(self.eval_pairs, capacity, data.packing, self.share_prefix)[0] if self.eval_pairs else []
        self.delta = RunningMean()
        self.reference = None
        self.cached: dict[str, torch.Tensor] = {}
        self.cache_hit: bool | None = None
        if cfg.reference == "model":
            self.reference = prepare_frozen(self._load_reference(), engine.accelerator)
        elif cfg.reference == "precomputed":
            cache = ReferenceCache(cfg.cache_dir, self._reference_config(), recipe.train.seed)
            self.cached, self.cache_hit = cache.load_or_compute(
                {"train": self.pairs, "eval": self.eval_pairs}, self._load_reference, self._reference_sums, engine
            )
        self.before = self._task_accuracy(self.model) if recipe.eval.enabled else {}
        self.data_stats = {"train_pairs": len(self.pairs), "eval_pairs": len(self.eval_pairs), "quarantined": self.bad_rows.count,
                           "train_rows_packed": len(self.train_rows), "share_prefix": self.share_prefix,
                           "tokens_saved_by_sharing": saved,
                           "reference": cfg.reference, "reference_cache_hit": self.cache_hit, "sampled_pairs": self.sampled_stats}  # fmt: skip

    # --- MMPR-style pairs from the policy's own samples ----------------------------------------
    def _sampled_pairs(self) -> list[tuple[str, int, dict]]:
        """Sample N responses per training prompt into the rollout buffer, then build correctness (+ Dropout-NTP) pairs.

        Correctness pairs are `buffer.preference_pairs()` (verifier-correct beats wrong within a prompt's group).
        Prompts are sharded across ranks; each rank builds pairs from its own buffer, then all ranks gather the
        same rows (sorted by prompt) so every rank trains on identical data. `self.sampled_rows` keeps them; a
        later start of the same recipe reads them back (`rows_once`; `self.buffer` is then None).
        """
        cfg, engine, seed = self.recipe.mpo.sampled_pairs, self.engine, self.recipe.train.seed
        self.buffer = None

        def draw() -> tuple[list[dict], dict[str, Any]]:
            self.buffer, generator = sample_rollouts(self.model, self.tokenizer, engine, cfg, self.recipe.data.synthetic, seed, cfg.round_index,
                                                     images=self.images)  # fmt: skip
            rows = self.buffer.preference_pairs(cfg.max_pairs_per_prompt, seed=seed)
            if cfg.dropout_ntp_share > 0:
                rng = random.Random(seed)
                samples = [GeneratedSample(f"{r.prompt_id}#{r.group}", r.prompt, r.response, bool(r.correct), r.condition) for r in self.buffer]
                picked = [s for s in samples if rng.random() < cfg.dropout_ntp_share]
                params = SamplingParams(cfg.max_new_tokens, 1, cfg.temperature, cfg.top_p)

                def continue_without_evidence(prompts: list[list[dict]], prefixes: list[str]) -> list[str]:
                    return [group[0].text for group in generator.generate(prompts, params, prefixes)]

                rows += dropout_ntp_pairs(picked, continue_without_evidence)
            counts = sum_over_ranks(engine, [*buffer_counts(self.buffer), len(rows)])
            rows = gather_rows(engine, rows, key=lambda r: (r["prompt_id"], r["builder"], r["chosen"], r["rejected"]))
            stats = {"round": cfg.round_index, "samples": counts[0], "correct_share": round(counts[1] / max(1, counts[0]), 4),
                     "truncated_share": round(counts[2] / max(1, counts[0]), 4), "pairs": len(rows),
                     "by_builder": {b: sum(r["builder"] == b for r in rows) for b in ("correctness", "dropout_ntp")}}  # fmt: skip
            return rows, stats

        self.sampled_rows, self.sampled_stats = rows_once(engine, self.recipe, draw)
        return [("sampled-pairs", i, row) for i, row in enumerate(self.sampled_rows, start=1)]  # 1-based, as every row number

    # --- reference --------------------------------------------------------------------------
    def _reference_config(self):
        model = self.recipe.model
        return dataclasses.replace(model, name_or_path=self.recipe.mpo.reference_path or model.name_or_path, gradient_checkpointing=False,
                                   lora=dataclasses.replace(model.lora, enabled=False),
                                   attn_implementation=self.model.config._attn_implementation)  # the policy's: same pair layout  # fmt: skip

    def _load_reference(self) -> torch.nn.Module:
        """Frozen, so in the compute dtype (bf16 on GPU by default), as RLHF's reference; the policy keeps fp32 master weights."""
        reference = load_causal_lm(self._reference_config(), self.tokenizer, self.engine.dtype, seed=self.recipe.train.seed)
        if has_vision(reference):  # the policy's image tokens (added to the tokenizer) are in its vocabulary too
            prepare_images(reference, self.tokenizer, self.recipe.data.images)
        return reference

    @torch.no_grad()
    def _reference_sums(self, reference: torch.nn.Module, pairs: list[PreferencePair], ids: list[int]) -> torch.Tensor:
        """(pairs, 2) reference sums for a list of pairs, one row per pair (used by the cache pass)."""
        batch = collate_preference([[p] for p in pairs], ids, self.tokenizer.pad_token_id, self.share_prefix)
        return sequence_logprobs(reference, batch.to(self.engine.device)).float().cpu()

    @torch.no_grad()
    def reference_logprobs(self, model: torch.nn.Module, batch: PreferenceBatch, split: str) -> torch.Tensor:
        cfg = self.recipe.mpo
        if cfg.reference == "precomputed":
            return self.cached[split][batch.pair_ids].to(batch.targets.device)
        if cfg.reference == "adapters":
            inner = getattr(model, "module", model)
            with inner.disable_adapter():
                return sequence_logprobs(model, batch)
        return sequence_logprobs(self.reference, batch)

    # --- batches --------------------------------------------------------------------------
    def _split(self, split: str) -> tuple[list[list[int]], list[PreferencePair]]:
        return (self.train_rows, self.pairs) if split == "train" else (self.eval_rows, self.eval_pairs)

    def collate(self, row_ids: Sequence[int], split: str = "train") -> PreferenceBatch:
        rows, pairs = self._split(split)
        ids = [i for r in row_ids for i in rows[r]]
        return collate_preference([[pairs[i] for i in rows[r]] for r in row_ids], ids, self.tokenizer.pad_token_id, self.share_prefix)

    def units(self, row_ids: Sequence[int], split: str = "train") -> dict[str, float]:
        rows, pairs = self._split(split)
        ids = [i for r in row_ids for i in rows[r]]
        return {"pairs": float(len(ids)), "chosen_tokens": float(sum(pairs[i].chosen_tokens for i in ids))}

    # --- loss -----------------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: PreferenceBatch, totals: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.recipe.mpo
        policy = sequence_logprobs(model, batch)
        reference = self.reference_logprobs(model, batch, "train" if model.training else "eval")
        ratios = policy.float() - reference.float()
        lr_c, lr_r = ratios[:, 0], ratios[:, 1]
        delta = self.update_delta(cfg.beta * ratios.detach(), model.training) if cfg.running_delta else 0.0
        inputs = PreferenceInputs(lr_c, lr_r, -policy[:, 0].float(), batch.chosen_tokens, cfg.beta, delta)
        total = torch.zeros((), device=policy.device)
        metrics: dict[str, torch.Tensor] = {}
        for name, weight in cfg.losses.items():
            values, unit = get_loss(name, "preference")(inputs)
            total = total + weight * values.sum() / totals[unit]
            denominator = batch.chosen_tokens.sum() if unit == "chosen_tokens" else torch.tensor(float(batch.num_pairs), device=policy.device)
            metrics[f"loss/{name}"] = (values.sum() / denominator.clamp(min=1)).detach()
        margin = cfg.beta * (lr_c - lr_r).detach()
        metrics |= {
            "delta": torch.tensor(delta, device=policy.device),
            "rewards/chosen": cfg.beta * lr_c.detach().mean(),
            "rewards/rejected": cfg.beta * lr_r.detach().mean(),
            "rewards/margin": margin.mean(),
            "rewards/accuracy": (margin > 0).float().mean(),
        }
        return total, metrics

    def update_delta(self, rewards: torch.Tensor, training: bool) -> float:
        """Training: gather each rank's mean(β·lr_c, β·lr_r), fold it into the running mean, and use it. Eval: read only."""
        if not training:
            return self.delta.mean
        mine = rewards.mean().reshape(1)
        gathered = self.engine.accelerator.gather(mine) if self.engine.world_size > 1 else mine
        return self.delta.update(gathered)

    def state_dict(self) -> dict[str, Any]:
        return {"delta": self.delta.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "delta" in state:
            self.delta.load_state_dict(state["delta"])

    # --- end of run -----------------------------------------------------------------------
    @torch.no_grad()
    def final_metrics(self) -> dict[str, Any]:
        """Held-out preference accuracy (implicit reward) per condition, and task accuracy by generation."""
        engine, model = self.engine, self.model
        out: dict[str, Any] = {"delta": self.delta.mean}
        if self.eval_rows:
            model.eval()
            records = []
            for row_ids, real in eval_micro_batches(len(self.eval_rows), engine.rank, engine.world_size, engine.shape.micro_batch_size):
                batch = self.collate(row_ids, "eval").to(engine.device)
                ratios = sequence_logprobs(model, batch).float() - self.reference_logprobs(model, batch, "eval").float()
                if real:
                    records += [(c or "default", float(m)) for c, m in zip(batch.conditions, (ratios[:, 0] - ratios[:, 1]).tolist())]
            records = gather_object(records) if engine.world_size > 1 else records
            by: dict[str, list[float]] = defaultdict(list)
            for condition, margin in records:
                by[condition].append(margin)
            out["preference_accuracy"] = sum(m > 0 for _, m in records) / len(records)
            out["reward_margin"] = self.recipe.mpo.beta * sum(m for _, m in records) / len(records)  # β·(lr_c − lr_r), held out
            out["preference_accuracy_by_condition"] = {c: sum(m > 0 for m in v) / len(v) for c, v in sorted(by.items())}
        if self.recipe.eval.enabled:
            after = self._task_accuracy(model)
            out |= {k: v for k, v in after.items() if k != "samples"} | {"eval_samples": after["samples"]}
            out |= {"accuracy_before": self.before["accuracy"], "accuracy_after": after["accuracy"],
                    "accuracy_by_condition_before": self.before["accuracy_by_condition"]}  # fmt: skip
        return out

    def _task_accuracy(self, model: torch.nn.Module) -> dict[str, Any]:
        """Held-out task accuracy by greedy generation (what `align eval` measures), before and after training."""
        cfg = self.recipe.eval
        problems = load_prompts(cfg.prompts_path, self.recipe.data.synthetic, cfg.num_prompts)
        return task_accuracy(model, self.tokenizer, problems, self.engine.accelerator, cfg.max_new_tokens, cfg.batch_size, self.images,
                             engine=self.engine)  # fmt: skip

