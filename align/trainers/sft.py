"""SFT: chat and multimodal conversations, loss on assistant tokens only, packed without cross-attention.

Data: sources → normalised conversations → chat-template render with assistant masks →
packed rows. Loss: per-token NLL weighted by the configured reduction (token mean, sample
mean, or InternVL3's 1/sqrt(l)), normalised over the whole optimizer step.

Rejection sampling (`rejection_sampling.enabled`): before training, the starting model answers the
training prompts N times through the rollout buffer, the task verifier judges each answer, and each
prompt's best answer (`RolloutBuffer.best_of_n`) joins `data.train` as an SFT row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from align.config import SFTRecipe
from align.engine.models import load_causal_lm, load_tokenizer
from align.engine.vision import image_text_for
from align.evaluation import load_prompts, task_accuracy
from align.losses import register_loss
from align.losses.logprobs import target_logprobs
from align.trainers.base import Trainer
from align.trainers.policy_samples import buffer_counts, gather_rows, rows_once, sample_rollouts, sum_over_ranks
from data_builders.bad_rows import BadRowPolicy
from data_builders.packing import build_rows, collate_rows, token_weight
from data_builders.samples import Sample, TokenBatch
from data_builders.sft_data import build_samples


@register_loss("nll", "sft")
def weighted_nll(logprobs: torch.Tensor, weights: torch.Tensor, total_weight: float) -> torch.Tensor:
    """Σ w·(−log p) / W, where W is the summed weight of the whole optimizer step."""
    return -(logprobs * weights).sum() / total_weight


class SFTTrainer(Trainer):
    name = "sft"
    recipe_type = SFTRecipe

    def setup(self) -> None:
        recipe, engine = self.recipe, self.engine
        data = recipe.data
        self.tokenizer = load_tokenizer(recipe.model)
        self.model = load_causal_lm(recipe.model, self.tokenizer, torch.float32, seed=recipe.train.seed)
        self.bad_rows = BadRowPolicy.for_run(data.on_bad_row, engine.run_dir, engine.is_main)
        self.before: dict[str, Any] = {}
        self.rejection_stats: dict[str, Any] | None = None
        sampled = []
        self.images = image_text_for(self.model, self.tokenizer, data.images)  # a VLM: image rows become tiles and image tokens
        if recipe.rejection_sampling.enabled:
            self.model.to(engine.device)
            sampled = self._rejection_sampled_rows()
            self.before = self._task_accuracy() if recipe.eval.enabled else {}
        self.samples, stats = build_samples(data.train, data, self.tokenizer, self.bad_rows, "train", extra_rows=sampled, images=self.images)
        eval_sources = data.eval_sources()
        self.eval_samples, eval_stats = (
            build_samples(eval_sources, data, self.tokenizer, self.bad_rows, "eval", images=self.images) if eval_sources else ([], None)
        )
        self.bad_rows.write()  # the main rank writes the skipped rows and says how many went where
        self.train_rows = build_rows(self.samples, data.max_length, data.packing)
        self.eval_rows = build_rows(self.eval_samples, data.max_length, data.packing) if self.eval_samples else []
        self._row_weight = {"train": self._weights(self.train_rows, self.samples), "eval": self._weights(self.eval_rows, self.eval_samples)}
        self.data_stats = {
            "train": stats.as_dict(),
            "eval": eval_stats.as_dict() if eval_stats else None,
            "quarantined": self.bad_rows.count,
            "train_rows_packed": len(self.train_rows),
            "fill": sum(len(s) for s in self.samples) / max(1, len(self.train_rows) * data.max_length),
            "rejection_sampling": self.rejection_stats,
        }

    def _rejection_sampled_rows(self) -> list[tuple[str, int, dict]]:
        """Sample N answers per prompt into the rollout buffer; keep each prompt's best (correct and complete, if required).

        Prompts are sharded across ranks; the kept rows are gathered and sorted, so every rank trains on identical data.
        A later start of the same recipe reads the kept rows back (`rows_once`; `self.buffer` is then None).
        """
        cfg, engine = self.recipe.rejection_sampling, self.engine
        self.buffer = None

        def draw() -> tuple[list[dict], dict[str, Any]]:
            self.buffer, _ = sample_rollouts(self.model, self.tokenizer, engine, cfg, self.recipe.data.synthetic, self.recipe.train.seed,
                                             images=self.images)  # fmt: skip
            rows = self.buffer.best_of_n(cfg.require_correct)
            counts = sum_over_ranks(engine, [*buffer_counts(self.buffer), len(self.buffer.groups())])
            rows = gather_rows(engine, rows, key=lambda r: json.dumps(r, sort_keys=True))
            stats = {"distinct_prompts": counts[3], "samples": counts[0], "correct_share": round(counts[1] / max(1, counts[0]), 4),
                     "truncated_share": round(counts[2] / max(1, counts[0]), 4), "kept_rows": len(rows),
                     "require_correct": cfg.require_correct}  # fmt: skip
            return rows, stats

        self.sampled_rows, self.rejection_stats = rows_once(engine, self.recipe, draw)
        return [("rejection-sampling", i, row) for i, row in enumerate(self.sampled_rows, start=1)]  # 1-based, as every row number

    def _weights(self, rows: list[list[int]], samples: list[Sample]) -> list[float]:
        reduction = self.recipe.data.loss_reduction
        return [sum(s.num_targets * token_weight(s.num_targets, reduction) for s in (samples[i] for i in row)) for row in rows]

    def _rows(self, split: str) -> tuple[list[list[int]], list[Sample]]:
        return (self.train_rows, self.samples) if split == "train" else (self.eval_rows, self.eval_samples)

    def collate(self, row_ids: Sequence[int], split: str = "train") -> TokenBatch:
        rows, samples = self._rows(split)
        docs = [[samples[i] for i in rows[r]] for r in row_ids]
        return collate_rows(docs, self.tokenizer.pad_token_id, self.recipe.data.loss_reduction)

    def units(self, row_ids: Sequence[int], split: str = "train") -> dict[str, float]:
        weights = self._row_weight[split]
        return {"weight": sum(weights[r] for r in row_ids)}

    def loss(self, model: torch.nn.Module, batch: TokenBatch, totals: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logprobs, mask = target_logprobs(model, batch)
        loss = weighted_nll(logprobs, batch.weights[mask], totals["weight"])
        return loss, {"nll_per_token": -logprobs.detach().mean()}

    def final_metrics(self) -> dict[str, Any]:
        if not self.recipe.eval.enabled:
            return {}
        result = self._task_accuracy()
        out = {k: v for k, v in result.items() if k != "samples"} | {"eval_samples": result["samples"]}
        if self.before:  # rejection sampling starts from a trained model: report where it started
            out |= {"accuracy_before": self.before["accuracy"], "accuracy_by_condition_before": self.before["accuracy_by_condition"]}
        return out

    def _task_accuracy(self) -> dict[str, Any]:
        cfg = self.recipe.eval
        problems = load_prompts(cfg.prompts_path, self.recipe.data.synthetic, cfg.num_prompts)
        return task_accuracy(self.model, self.tokenizer, problems, self.engine.accelerator, cfg.max_new_tokens, cfg.batch_size, self.images,
                             engine=self.engine)  # fmt: skip

