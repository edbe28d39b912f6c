"""Process reward model training (VisualPRM, Math-Shepherd): a score per step, binary loss on step labels.

The model is the reward model's (`load_reward_model`: the SFT checkpoint's backbone and a zero-initialised scalar
head). Its data are step-labelled rows from files (`rewards/prm_data.py`) or the synthetic suite's worked solutions
with injected mistakes (`SyntheticTask.step_rows`), and/or the starting policy's own samples labelled by rule or by completion (`align/trainers/prm_samples.py`, saved and read back on resume). Each response is
one document `[condition prompt | prompt | response]`; documents are packed best fit into rows of `data.max_length`
with restarting positions, and one forward scores every step of a micro-batch at the token that closes it
(`rewards/prm.py`). The loss is the registered step loss (BCE) averaged over the steps of the optimizer step.

Held-out metrics (summary.json): step accuracy and F1 of finding the wrong steps (ProcessBench's positive class),
overall and per condition, and first-error-step accuracy: a response's predicted first wrong step (or "none")
equals its labelled one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from accelerate.utils import gather_object

import rewards.losses  # noqa: F401 - registers the step losses
from align.config import PRMRecipe, SourceConfig
from align.engine.models import load_causal_lm, load_reward_model, load_tokenizer, without_zero3_init
from align.engine.plan import eval_micro_batches
from align.model_paths import check_model_path
from align.trainers.base import Trainer
from align.trainers.policy_samples import rows_once
from align.trainers.prm_samples import draw_step_rows
from data_builders.bad_rows import BadRowPolicy
from data_builders.packing import build_rows
from data_builders.readers import read_rows
from data_builders.synthetic import SyntheticTask
from rewards.loss_registry import get_loss
from rewards.prm import PRMInfo, StepBatch, StepDoc, collate_steps, step_logits
from rewards.prm_data import build_step_docs


class PRMTrainer(Trainer):
    name = "prm"
    recipe_type = PRMRecipe

    def setup(self) -> None:
        recipe, engine, data, cfg = self.recipe, self.engine, self.recipe.data, self.recipe.prm
        check_model_path(recipe.model.name_or_path)
        self.loss_fn = get_loss(cfg.loss, "step")
        self.tokenizer = load_tokenizer(recipe.model)
        self.bad_rows = BadRowPolicy.for_run(data.on_bad_row, engine.run_dir, engine.is_main)
        self.sampled_stats: dict[str, Any] | None = None
        train, evals = [], []
        if cfg.samples.enabled:  # before the PRM loads: the policy samples, then is freed
            rows, self.sampled_stats = rows_once(engine, recipe, self._draw)
            train += [("policy-samples[train]", i, r) for i, r in enumerate((r for r in rows if r["split"] == "train"), start=1)]
            evals += [("policy-samples[eval]", i, r) for i, r in enumerate((r for r in rows if r["split"] == "eval"), start=1)]
        self.model = load_reward_model(recipe.model, self.tokenizer, torch.float32, seed=recipe.train.seed)
        build = lambda rows, what: build_step_docs(rows, self.tokenizer, cfg.conditions, cfg.step_separator, cfg.step_join,  # noqa: E731
                                                   data.max_length, self.bad_rows, what)  # fmt: skip
        self.docs = build(self._source_rows(data.train, "train") + train, "train")
        eval_rows = self._source_rows(data.eval, "eval") + evals
        self.eval_docs = build(eval_rows, "eval") if eval_rows else []
        self.bad_rows.write()
        self.train_rows = build_rows(self.docs, data.max_length, data.packing)
        self.eval_rows = build_rows(self.eval_docs, data.max_length, data.packing) if self.eval_docs else []
        self.data_stats = {"train_responses": len(self.docs), "train_steps": sum(len(d.positions) for d in self.docs),
                           "eval_responses": len(self.eval_docs), "eval_steps": sum(len(d.positions) for d in self.eval_docs),
                           "train_rows_packed": len(self.train_rows), "quarantined": self.bad_rows.count,
                           "sampled": self.sampled_stats}  # fmt: skip

    def _source_rows(self, sources: Sequence[SourceConfig], split: str) -> list[tuple[str, int, Any]]:
        """(origin, 1-based row, row) of step-label files, or of the synthetic suite's step rows (`SyntheticTask.step_rows`)."""
        out, syn = [], self.recipe.data.synthetic
        for source in sources:
            if source.path == "synthetic":
                task = SyntheticTask(syn.seed, syn.digits, syn.concise_share, syn.system_share)
                n = source.max_rows or (syn.train_rows if split == "train" else syn.eval_rows)
                rows = task.step_rows(n, "train" if split == "train" else "heldout")
                out += [(f"synthetic-steps[{split}]", i, row) for i, row in enumerate(rows, start=1)]
            else:
                out += list(read_rows(source.path, source.split, source.max_rows, self.bad_rows))
        return out

    def _draw(self) -> tuple[list[dict], dict[str, Any]]:
        """Sample the starting policy (the SFT model at `model.name_or_path`) and label its steps; the policy is freed after."""
        recipe, engine = self.recipe, self.engine
        with without_zero3_init():  # a whole replica per rank: ranks sample without waiting on each other
            policy = load_causal_lm(recipe.model, self.tokenizer, engine.dtype, seed=recipe.train.seed).to(engine.device).eval()
        try:
            return draw_step_rows(policy, self.tokenizer, engine, recipe)
        finally:
            del policy

    def _split(self, split: str) -> tuple[list[list[int]], list[StepDoc]]:
        return (self.train_rows, self.docs) if split == "train" else (self.eval_rows, self.eval_docs)

    def collate(self, row_ids: Sequence[int], split: str = "train") -> StepBatch:
        rows, docs = self._split(split)
        return collate_steps([[docs[i] for i in rows[r]] for r in row_ids], self.tokenizer.pad_token_id)

    def units(self, row_ids: Sequence[int], split: str = "train") -> dict[str, float]:
        rows, docs = self._split(split)
        return {"steps": float(sum(len(docs[i].positions) for r in row_ids for i in rows[r]))}

    def loss(self, model: torch.nn.Module, batch: StepBatch, totals: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = step_logits(model, batch)
        per_step = self.loss_fn(logits, batch.labels)
        good = batch.labels >= 0.5
        metrics = {"step_accuracy": ((torch.sigmoid(logits) >= self.recipe.prm.threshold) == good).float().mean().detach(),
                   "score_mean": torch.sigmoid(logits).mean().detach()}  # fmt: skip
        return per_step.sum() / totals["steps"], metrics

    @torch.no_grad()
    def final_metrics(self) -> dict[str, Any]:
        engine, cfg = self.engine, self.recipe.prm
        if engine.is_main:  # how to split steps and which condition prompts it saw travel with the model (`align bon` reads them)
            PRMInfo(cfg.step_separator, dict(cfg.conditions)).write(engine.run_dir / "model")
        if not self.eval_rows:
            return {}
        model = self.model
        model.eval()
        records = []  # (condition, labels, probabilities) per held-out response
        for row_ids, real in eval_micro_batches(len(self.eval_rows), engine.rank, engine.world_size, engine.shape.micro_batch_size):
            batch = self.collate(row_ids, "eval")
            probs = torch.sigmoid(step_logits(model, batch.to(engine.device))).float().cpu().tolist()
            if not real:
                continue
            per_doc: dict[int, list[tuple[float, float]]] = defaultdict(list)
            for doc, label, p in zip(batch.step_docs, batch.labels.tolist(), probs, strict=True):
                per_doc[doc].append((label, p))
            records += [(batch.conditions[d] or "default", [x for x, _ in v], [p for _, p in v]) for d, v in sorted(per_doc.items())]
        records = gather_object(records) if engine.world_size > 1 else records
        return step_metrics(records, cfg.threshold)


def step_metrics(records: Sequence[tuple[str, list[float], list[float]]], threshold: float = 0.5) -> dict[str, Any]:
    """Step accuracy, F1 of finding wrong steps, first-error-step accuracy: overall and per condition.

    `records`: (condition, labels, P(good) per step) per response. A label >= 0.5 is a good step; a step is predicted
    good when P(good) >= threshold. A response's first error is the index of its first bad step, or none. F1 is 1.0 for a
    condition with no wrong step labelled and none predicted.
    """
    by: dict[str, list[tuple[list[float], list[float]]]] = defaultdict(list)
    for condition, labels, probs in records:
        by[condition].append((labels, probs))
        by["__all__"].append((labels, probs))

    def first_bad(flags: list[bool]) -> int:
        return next((i for i, good in enumerate(flags) if not good), -1)

    def summarise(items: list[tuple[list[float], list[float]]]) -> dict[str, float]:
        pairs = [(y >= 0.5, p >= threshold) for labels, probs in items for y, p in zip(labels, probs, strict=True)]
        tp = sum(not y and not p for y, p in pairs)  # positives are the wrong steps
        fp = sum(y and not p for y, p in pairs)
        fn = sum(not y and p for y, p in pairs)
        first = [first_bad([y >= 0.5 for y in labels]) == first_bad([p >= threshold for p in probs]) for labels, probs in items]
        return {"accuracy": sum(y == p for y, p in pairs) / len(pairs), "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
                "first_error_accuracy": sum(first) / len(first), "steps": len(pairs), "bad_steps": sum(not y for y, _ in pairs),
                "responses": len(items)}  # fmt: skip

    overall = summarise(by.pop("__all__"))
    per = {c: summarise(v) for c, v in sorted(by.items())}
    return {
        "step_accuracy": overall["accuracy"],
        "step_f1": overall["f1"],
        "first_error_accuracy": overall["first_error_accuracy"],
        "step_accuracy_by_condition": {c: m["accuracy"] for c, m in per.items()},
        "step_f1_by_condition": {c: m["f1"] for c, m in per.items()},
        "first_error_accuracy_by_condition": {c: m["first_error_accuracy"] for c, m in per.items()},
        "eval_steps_by_condition": {c: m["steps"] for c, m in per.items()},
        "eval_bad_steps_by_condition": {c: m["bad_steps"] for c, m in per.items()},
        "eval_steps": overall["steps"],
        "eval_responses": overall["responses"],
    }
