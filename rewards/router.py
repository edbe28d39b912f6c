"""The single scoring entry point: each sample is scored by what its condition maps to.

A route is a weighted mix of components: `rm` (the conditional reward model, with that condition's
prompt, optionally normalised by the per-condition stats stored beside the model), `prm` (a process reward
model's step probabilities aggregated per response by mean / min / last, `rewards/prm.py`) and rule-based
verifiers (`rewards/verifiers.py`). RLHF rewards and preference-pair building both call
`RewardRouter.score`, so they agree on what "better" means.

A sample's prompt may carry images (OpenAI image parts): with a vision-language reward model's `ImageText` they become
its image tokens and tiles exactly as `align rm` made them from a row (`rewards.conditions.reward_tokens`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from data_builders.conversations import text_messages
from data_builders.errors import UserError, UserKeyError
from data_builders.image_tokens import ImageText
from data_builders.images import ImageRef
from data_builders.packing import pack_best_fit
from rewards.conditions import render_for_reward, reward_tokens
from rewards.model import pack_documents, packed_scores
from rewards.prm import ProcessRewardScorer
from rewards.verifiers import is_refusal, length_penalty, math_correct, regex_format, task_score

Sample = dict[str, Any]  # {"condition", "prompt": messages (text or OpenAI image parts), "response", "answer"?, "unsafe"?}

VERIFIERS: dict[str, Callable[..., float]] = {
    "task": lambda s, **_: task_score(s, s["response"]),
    "math": lambda s, **_: math_correct(s["response"], s["answer"]) if s.get("answer") is not None else 0.0,
    "refusal": lambda s, **_: float(is_refusal(s["response"]) == bool(s.get("unsafe"))),
    "length": lambda s, budget=16, per_token=0.05, **_: length_penalty(len(s["response"].split()), budget, per_token),
    "format": lambda s, pattern=r"Final Answer:", **_: regex_format(s["response"], pattern),
}


@dataclass
class RouterResult:
    scores: torch.Tensor  # (n,) weighted sum per sample
    components: dict[str, torch.Tensor]  # name → (n,), NaN where a sample's route lacks it
    by_condition: dict[str, dict[str, float]]  # condition → {"reward": mean, "<component>": mean, "count": n}


class RewardRouter:
    def __init__(
        self,
        routes: dict[str, dict[str, float]],
        reward_model: torch.nn.Module | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        conditions: dict[str, str] | None = None,
        stats: dict[str, dict[str, float]] | None = None,
        reward_token_id: int | None = None,
        verifier_args: dict[str, dict[str, Any]] | None = None,
        row_tokens: int = 2048,
        autocast_dtype: torch.dtype | None = None,
        process_scorer: ProcessRewardScorer | None = None,
        images: ImageText | None = None,
    ):
        for condition, route in routes.items():
            unknown = set(route) - set(VERIFIERS) - {"rm", "prm"}
            if unknown:
                raise UserError(f"route {condition!r}: unknown components {sorted(unknown)}; choose from rm, prm, {', '.join(VERIFIERS)}")
            if "rm" in route and reward_model is None:
                raise UserError(f"route {condition!r} uses 'rm' but no reward model was given")
            if "prm" in route and process_scorer is None:
                raise UserError(f"route {condition!r} uses 'prm' but no process reward model was given")
        self.process_scorer = process_scorer
        self.routes, self.model, self.tokenizer = routes, reward_model, tokenizer
        self.conditions, self.stats = conditions or {}, stats or {}
        self.reward_token_id, self.verifier_args, self.row_tokens = reward_token_id, verifier_args or {}, row_tokens
        self.autocast_dtype = autocast_dtype  # an fp32 (trainable) reward model still scores in the compute dtype on GPUs
        self.images = images  # a vision-language reward model's image side; None: prompts with images are an error

    def route(self, condition: str) -> dict[str, float]:
        if condition in self.routes:
            return self.routes[condition]
        if "default" in self.routes:
            return self.routes["default"]
        raise UserKeyError(f"no route for condition {condition!r} (routes: {sorted(self.routes)}); add one, or a 'default' route")

    def rm_document(self, sample: Sample, index: int) -> tuple[list[int], list[ImageRef]]:
        """A sample's reward-model tokens and its prompt's checked images (sample `index` + 1 is named in errors).

        A text prompt renders as it always did; image parts are expanded with the reward model's `ImageText`.
        """
        condition, response = sample["condition"], sample["response"]
        prompt, values = text_messages(sample["prompt"], "samples", index + 1, "prompt")
        if not values:
            return render_for_reward(self.tokenizer, self.conditions, condition, sample["prompt"], response, self.reward_token_id), []
        if self.images is None:
            raise UserError(f"sample {index + 1} has {len(values)} image(s) in its prompt but the reward model takes no images "
                            "(a text-only model)")  # fmt: skip
        refs = self.images.resolve(values, prompt, "samples", index + 1)
        ids, _ = reward_tokens(self.tokenizer, self.conditions, condition, prompt, response, self.reward_token_id, self.images, refs,
                               "samples", index + 1)  # fmt: skip
        return ids, refs

    @torch.no_grad()
    def rm_scores(self, samples: Sequence[Sample], normalize: bool = True) -> torch.Tensor:
        """Reward-model scores, packed many samples to a row; normalised per condition when stats are known (and asked for)."""
        docs, refs = zip(*(self.rm_document(s, i) for i, s in enumerate(samples)), strict=True)
        param = next(self.model.parameters())
        device = param.device
        cast = self.autocast_dtype is not None and self.autocast_dtype != param.dtype
        out = torch.empty(len(docs), device="cpu")
        for row in pack_best_fit([len(d) for d in docs], max(self.row_tokens, max(map(len, docs)))):
            input_ids, position_ids, ends, _ = pack_documents([[docs[i] for i in row]], self.tokenizer.pad_token_id)
            tiles = [ref.pixels() for i in row for ref in refs[i]]  # in the order of the row's image tokens
            pixels = torch.cat(tiles).to(device) if tiles else None
            with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=cast):
                out[row] = packed_scores(self.model, input_ids.to(device), position_ids.to(device), ends.to(device),
                                         pixel_values=pixels).float().cpu()  # fmt: skip
        if not normalize:
            return out
        for i, s in enumerate(samples):
            stat = self.stats.get(s["condition"])
            if stat:
                out[i] = (out[i] - stat["mean"]) / max(stat["std"], 1e-6)
        return out

    def condition_stats(self, samples: Sequence[Sample]) -> dict[str, dict[str, float]]:
        """Per-condition mean/std of the raw reward-model scores of `samples` (to renormalise after the model changed)."""
        raw = self.rm_scores(samples, normalize=False)
        groups: dict[str, list[float]] = defaultdict(list)
        for s, value in zip(samples, raw.tolist(), strict=True):
            groups[s["condition"]].append(value)
        return {c: {"mean": float(torch.tensor(v, device="cpu").mean()), "std": float(torch.tensor(v, device="cpu").std(correction=0))} for c, v in sorted(groups.items())}

    def score(self, samples: Sequence[Sample]) -> RouterResult:
        routes = [self.route(s["condition"]) for s in samples]
        names = sorted({name for r in routes for name in r})
        components = {name: torch.full((len(samples),), float("nan"), device="cpu") for name in names}
        rm_idx = [i for i, r in enumerate(routes) if "rm" in r]
        if rm_idx:
            components["rm"][rm_idx] = self.rm_scores([samples[i] for i in rm_idx])
        prm_idx = [i for i, r in enumerate(routes) if "prm" in r]
        if prm_idx:
            components["prm"][prm_idx] = self.process_scorer.scores([samples[i] for i in prm_idx])
        for name in names:
            if name in ("rm", "prm"):
                continue
            fn, kwargs = VERIFIERS[name], self.verifier_args.get(name, {})
            for i, route in enumerate(routes):
                if name in route:
                    components[name][i] = fn(samples[i], **kwargs)
        total = torch.zeros(len(samples), device="cpu")
        for i, route in enumerate(routes):
            total[i] = sum(weight * components[name][i] for name, weight in route.items())
        return RouterResult(total, components, self._breakdown(samples, total, components))

    @staticmethod
    def _breakdown(samples: Sequence[Sample], total: torch.Tensor, components: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(samples):
            groups[s["condition"]].append(i)
        out = {}
        for condition, idx in sorted(groups.items()):
            entry = {"reward": float(total[idx].mean()), "count": len(idx)}
            for name, values in components.items():
                vals = values[idx]
                vals = vals[~vals.isnan()]
                if len(vals):
                    entry[name] = float(vals.mean())
            out[condition] = entry
        return out
