"""Conditional reward-model training (InternLM2): pairs packed into rows, one forward for all scores.

Each (chosen, rejected) pair is one shared-prefix unit `[prefix | chosen | rejected]`
(`data_builders.pair_rows`), packed best fit into rows; units never attend to each other, the two
suffixes never see each other, and each side is scored at its last token. The loss is the
configured ranking loss plus the log barrier, averaged over the pairs of the optimizer step.

On a vision-language model (a VLM with a `score` head, `align.engine.models.load_reward_model`) prompts may carry images:
the tiles travel with their pairs, once per shared prompt, and reach the forward as `pixel_values`.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from accelerate.utils import gather_object

from align.config import RMRecipe
from align.engine.models import load_reward_model, load_tokenizer, resolve_attention
from align.engine.plan import eval_micro_batches
from align.engine.vision import image_text_for
from align.model_paths import check_model_path
from align.reward_model_info import RewardModelInfo, reward_token_id
from align.trainers.base import Trainer
from data_builders.bad_rows import BadRowPolicy
from data_builders.pair_rows import PairRows, collate_pair_rows, pack_pairs, resolve_share_prefix
from rewards.data import Pair, build_pairs
from rewards.losses import pair_losses
from rewards.model import pair_scores


@dataclass
class PairBatch:
    rows: PairRows
    margins: torch.Tensor
    conditions: list[str | None]
    tags: list[str | None]

    @property
    def num_tokens(self) -> int:
        return self.rows.num_tokens

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(self.rows.to(device), self.margins.to(device), self.conditions, self.tags)


def collate_pairs(rows: Sequence[Sequence[Pair]], pad_id: int, share_prefix: bool = True) -> PairBatch:
    """Each row's pairs as shared-prefix units (or, without sharing, as two packed documents each), with their prompts' tiles."""
    with_images = any(p.images for row in rows for p in row)
    pair_rows = collate_pair_rows([[(p.chosen, p.rejected) for p in row] for row in rows], pad_id, share_prefix,
                                  images=rows if with_images else None)  # fmt: skip
    pairs = [p for row in rows for p in row]
    return PairBatch(pair_rows, torch.tensor([p.margin for p in pairs], device="cpu"), [p.condition for p in pairs], [p.tag for p in pairs])


class RMTrainer(Trainer):
    name = "rm"
    recipe_type = RMRecipe

    def setup(self) -> None:
        recipe, engine, data, reward = self.recipe, self.engine, self.recipe.data, self.recipe.reward
        check_model_path(recipe.model.name_or_path)
        self.tokenizer = load_tokenizer(recipe.model)
        token_id = reward_token_id(self.tokenizer, reward.reward_token)
        model_cfg = replace(recipe.model, attn_implementation=resolve_attention(recipe.model.attn_implementation,
                                                                                needs_4d_mask=data.share_prefix is True))
        self.model = load_reward_model(model_cfg, self.tokenizer, torch.float32, seed=recipe.train.seed)
        self.images = image_text_for(self.model, self.tokenizer, data.images)  # a VLM: prompt images become tiles and tokens
        self.bad_rows = BadRowPolicy.for_run(data.on_bad_row, engine.run_dir, engine.is_main)

        def build(sources: list, split: str) -> list[Pair]:
            return build_pairs(sources, data, reward.conditions, self.tokenizer, self.bad_rows, token_id, split, self.images)

        self.pairs = build(data.train, "train")
        eval_sources = data.eval_sources()
        self.eval_pairs = build(eval_sources, "eval") if eval_sources else []
        self.bad_rows.write()  # the main rank writes the skipped rows and says how many went where
        self.share_prefix = resolve_share_prefix(data.share_prefix, self.model)
        # a row holds 2·max_length tokens by default (the longest possible pair); InternLM2: 8192 → 16,384-token batches
        capacity = data.pair_row_tokens or 2 * data.max_length
        self.train_rows, saved = pack_pairs(self.pairs, capacity, data.packing, self.share_prefix)
        self.eval_rows = pack_pairs(self.eval_pairs, capacity, data.packing, self.share_prefix)[0] if self.eval_pairs else []
        self.data_stats = {"train_pairs": len(self.pairs), "eval_pairs": len(self.eval_pairs), "quarantined": self.bad_rows.count,
                           "train_rows_packed": len(self.train_rows), "share_prefix": self.share_prefix,
                           "tokens_saved_by_sharing": saved}

    def _split(self, split: str) -> tuple[list[list[int]], list[Pair]]:
        return (self.train_rows, self.pairs) if split == "train" else (self.eval_rows, self.eval_pairs)

    def collate(self, row_ids: Sequence[int], split: str = "train") -> PairBatch:
        rows, pairs = self._split(split)
        return collate_pairs([[pairs[i] for i in rows[r]] for r in row_ids], self.tokenizer.pad_token_id, self.share_prefix)

    def units(self, row_ids: Sequence[int], split: str = "train") -> dict[str, float]:
        rows, _ = self._split(split)
        return {"pairs": float(sum(len(rows[r]) for r in row_ids))}

    def scores(self, model: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_scores(model, batch.rows)

    def loss(self, model: torch.nn.Module, batch: PairBatch, totals: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.recipe.reward
        chosen, rejected = self.scores(model, batch)
        margin = batch.margins if bool(batch.margins.any()) else None
        per_pair = pair_losses(cfg.loss, chosen, rejected, margin, cfg.gamma, cfg.barrier_weight, cfg.bound)
        metrics = {
            "accuracy": (chosen > rejected).float().mean().detach(),
            "margin": (chosen - rejected).mean().detach(),
            "score_mean": torch.cat([chosen, rejected]).mean().detach(),
        }
        return per_pair.sum() / totals["pairs"], metrics

    @torch.no_grad()
    def final_metrics(self) -> dict[str, Any]:
        """Pairwise accuracy overall, per condition and per tag; score mean/std per condition; share near the barrier."""
        if not self.eval_rows:
            return {}
        engine, cfg = self.engine, self.recipe.reward
        model = self.model
        model.eval()
        records = []
        for row_ids, real in eval_micro_batches(len(self.eval_rows), engine.rank, engine.world_size, engine.shape.micro_batch_size):
            batch = self.collate(row_ids, "eval")
            chosen, rejected = self.scores(model, batch.to(engine.device))
            if real:
                records += zip([c or "default" for c in batch.conditions], batch.tags, chosen.tolist(), rejected.tolist(), strict=True)
        records = gather_object(records) if engine.world_size > 1 else records
        by: dict[str, list[tuple[float, float]]] = defaultdict(list)
        by_tag: dict[str, list[bool]] = defaultdict(list)
        for condition, tag, a, b in records:
            by[condition].append((a, b))
            if tag is not None:
                by_tag[tag].append(a > b)
        all_scores = [s for *_, a, b in records for s in (a, b)]
        stats = {c: {"mean": statistics.fmean(s for p in v for s in p), "std": statistics.pstdev(s for p in v for s in p)} for c, v in by.items()}
        metrics = {
            "accuracy": sum(a > b for *_, a, b in records) / len(records),
            "accuracy_by_condition": {c: sum(a > b for a, b in v) / len(v) for c, v in sorted(by.items())},
            "reward_stats": stats,
            "near_barrier_share": sum(abs(s) >= cfg.near_barrier * cfg.bound for s in all_scores) / len(all_scores),
            "eval_pairs": len(records),
        }
        if by_tag:  # which kinds of comparison the model gets wrong (reward-bench reports per subset)
            metrics["accuracy_by_tag"] = {t: sum(v) / len(v) for t, v in sorted(by_tag.items())}
            metrics["eval_pairs_by_tag"] = {t: len(v) for t, v in sorted(by_tag.items())}
        if engine.is_main:  # normalisation constants (and a VLM's tiling) travel with the model (used at RLHF and best-of-N time)
            images = asdict(self.recipe.data.images) if self.images is not None else None
            RewardModelInfo(cfg.conditions, stats, cfg.reward_token, images).write(engine.run_dir / "model")
        return metrics
