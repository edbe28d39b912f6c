"""The process reward model (VisualPRM / Math-Shepherd): a score per reasoning step, read where each step closes.

A response is split into steps by a separator (a regex: a newline or a tag for real data, the column steps'
`", "` / `". "` for the synthetic suite's worked solutions); step-labelled data-file rows give their steps as a
list, joined by a literal string. The model is the reward model's architecture (backbone + scalar head, started
from the SFT checkpoint); its logit at the token that closes a step, that is the token holding the first character
after the step (the separator's first character, or the end-of-turn token after the last step), is the step's
score, P(good) = σ(logit). At that token the model has read the whole step and knows it ended, whatever the
tokenizer merges. Scores are read from packed rows (restarting positions, `forward_hidden`) at positions computed
per document, so they cannot depend on padding or on what else shares the row.

A response's score for ranking (best-of-N, the router's `prm` component) aggregates its step probabilities:
`mean` (VisualPRM), `min` (the weakest step) or `last`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from data_builders.attention_layout import forward_hidden
from data_builders.errors import UserError
from data_builders.packing import collate_rows, pack_best_fit
from data_builders.render import assistant_char_spans, through_end_of_turn
from data_builders.samples import Sample
from rewards.conditions import condition_messages
from rewards.model import scores_at

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

AGGREGATIONS = ("mean", "min", "last")
PRM_INFO = "prm_info.json"
SYNTHETIC_SEPARATOR = r", |\. "  # the worked solutions' column steps: "47+85: 7+5=12, 4+8+1=13. Final Answer: 132"


# ----------------------------------------------------------------------------- steps
def step_spans(response: str, separator: str) -> list[tuple[int, int]]:
    """[start, end) character spans of the non-blank pieces of `response` between matches of `separator` (a regex)."""
    spans, start = [], 0
    for match in re.finditer(separator, response):
        if match.end() == match.start():
            continue  # an empty match separates nothing
        spans.append((start, match.start()))
        start = match.end()
    spans.append((start, len(response)))
    return [(s, e) for s, e in spans if response[s:e].strip()]


def join_steps(steps: Sequence[str], joiner: str) -> tuple[str, list[tuple[int, int]]]:
    """A data-file row's steps as one response, and each step's span in it."""
    spans, offset = [], 0
    for i, step in enumerate(steps):
        offset += len(joiner) if i else 0
        spans.append((offset, offset + len(step)))
        offset += len(step)
    return joiner.join(steps), spans


@dataclass
class StepDoc:
    """One response rendered for the PRM: token ids, the index of each step's scored token, its labels (if known)."""

    input_ids: list[int]
    positions: list[int]
    labels: list[float] | None = None
    condition: str | None = None
    origin: str = ""
    response_start: int = 0  # index of the response's first token in `input_ids`

    def __len__(self) -> int:
        return len(self.input_ids)


def render_steps(tokenizer: PreTrainedTokenizerBase, conditions: dict[str, str], condition: str | None, prompt: list[dict],
                 response: str, spans: Sequence[tuple[int, int]]) -> StepDoc:  # fmt: skip
    """[condition prompt] + prompt + response through its end-of-turn token, with each step's scored token.

    The rendering is `rewards.conditions.render_for_reward`'s (no reward token: steps are scored in place).
    """
    messages = [*condition_messages(conditions, condition, prompt), {"role": "assistant", "content": response}]
    text, assistant = assistant_char_spans(tokenizer, messages)
    start = assistant[-1][0]
    if text[start : start + len(response)] != response:
        raise UserError("the chat template changes the assistant text (e.g. strips it), so step positions cannot be placed; "
                        "use a template that renders the response verbatim")  # fmt: skip
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = through_end_of_turn(tokenizer, list(enc["input_ids"]))
    offsets = enc["offset_mapping"][: len(ids)]

    def token_at(char: int) -> int:  # the token holding `char`, or the first after it (a gap), or the last token
        return next((t for t, (_, end) in enumerate(offsets) if end > char), len(ids) - 1)

    positions = [token_at(start + end) for _, end in spans]
    return StepDoc(ids, positions, None, condition, "", token_at(start))


# ----------------------------------------------------------------------------- batches and scores
@dataclass
class StepBatch:
    """Packed rows of step documents: what a PRM forward takes, with every step's (row, position) and label."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor  # real tokens per row (padding trails)
    step_rows: torch.Tensor
    step_positions: torch.Tensor
    labels: torch.Tensor  # (steps,) float; NaN where unknown
    step_docs: list[int]  # document index (in batch order) of every step
    conditions: list[str | None]  # per document
    num_tokens: int

    def to(self, device: torch.device | str) -> StepBatch:
        move = {k: getattr(self, k).to(device) for k in ("input_ids", "position_ids", "lengths", "step_rows", "step_positions", "labels")}
        return StepBatch(**move, step_docs=self.step_docs, conditions=self.conditions, num_tokens=self.num_tokens)


def collate_steps(rows: Sequence[Sequence[StepDoc]], pad_id: int) -> StepBatch:
    """Rows of documents → one batch; positions restart per document, so documents never see each other."""
    batch = collate_rows([[Sample(d.input_ids, [0] * len(d)) for d in row] for row in rows], pad_id)
    step_rows, step_positions, labels, step_docs, conditions = [], [], [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for doc in row:
            for k, p in enumerate(doc.positions):
                step_rows.append(r)
                step_positions.append(offset + p)
                labels.append(float("nan") if doc.labels is None else float(doc.labels[k]))
                step_docs.append(len(conditions))
            conditions.append(doc.condition)
            offset += len(doc)
    tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device="cpu")  # noqa: E731
    return StepBatch(batch.input_ids, batch.position_ids, batch.lengths(), tensor(step_rows, torch.long), tensor(step_positions, torch.long),
                     tensor(labels, torch.float32), step_docs, conditions, batch.num_tokens)  # fmt: skip


def step_logits(model: torch.nn.Module, batch: StepBatch) -> torch.Tensor:
    """(steps,) fp32 logits of P(step good), one forward over the packed rows."""
    hidden = forward_hidden(model, batch.input_ids, batch.position_ids, batch.lengths)
    return scores_at(model, hidden, batch.step_rows, batch.step_positions)


def aggregate(probs: Sequence[float], how: str) -> float:
    """A response's score from its step probabilities; a response with no steps scores 0."""
    if how not in AGGREGATIONS:
        raise UserError(f"unknown step aggregation {how!r}; choose from {', '.join(AGGREGATIONS)}")
    if not probs:
        return 0.0
    if how == "mean":
        return sum(probs) / len(probs)
    if how == "min":
        return min(probs)
    return probs[-1]


# ----------------------------------------------------------------------------- the stored facts of a PRM
@dataclass
class PRMInfo:
    """What `align prm` stores beside its export (`prm_info.json`): how steps were split and the condition prompts seen."""

    step_separator: str = r"\n"
    conditions: dict[str, str] = field(default_factory=dict)

    def write(self, model_dir: str | Path) -> None:
        (Path(model_dir) / PRM_INFO).write_text(json.dumps({"step_separator": self.step_separator, "conditions": self.conditions}, indent=2))

    @classmethod
    def read(cls, model_dir: str | Path) -> PRMInfo:
        path = Path(model_dir) / PRM_INFO
        if not path.exists():
            raise UserError(f"{model_dir} has no {PRM_INFO}: it is not a process reward model from `align prm`")
        stored = json.loads(path.read_text())
        return cls(stored["step_separator"], stored.get("conditions") or {})


# ----------------------------------------------------------------------------- scoring samples
class ProcessRewardScorer:
    """Step scores of router samples ({"condition", "prompt": messages, "response"}), packed many to a row."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, info: PRMInfo, aggregation: str = "mean",
                 row_tokens: int = 2048, autocast_dtype: torch.dtype | None = None):  # fmt: skip
        aggregate([], aggregation)  # an unknown name fails here, not at the first score
        self.model, self.tokenizer, self.info, self.aggregation = model, tokenizer, info, aggregation
        self.row_tokens, self.autocast_dtype = row_tokens, autocast_dtype

    def documents(self, samples: Sequence[dict[str, Any]]) -> list[StepDoc]:
        sep, conditions = self.info.step_separator, self.info.conditions
        docs = []
        for s in samples:
            condition = s.get("condition") if s.get("condition") in conditions else None  # no prompt for a condition it never saw
            docs.append(render_steps(self.tokenizer, conditions, condition, s["prompt"], s["response"], step_spans(s["response"], sep)))
        return docs

    @torch.no_grad()
    def step_scores(self, samples: Sequence[dict[str, Any]]) -> list[list[float]]:
        """P(good) of every step of every sample."""
        docs = self.documents(samples)
        return self.doc_scores(docs)

    @torch.no_grad()
    def doc_scores(self, docs: Sequence[StepDoc]) -> list[list[float]]:
        out: list[list[float]] = [[] for _ in docs]
        if not docs:
            return out
        param = next(self.model.parameters())
        device = param.device
        cast = self.autocast_dtype is not None and self.autocast_dtype != param.dtype
        for row in pack_best_fit([len(d) for d in docs], max(self.row_tokens, max(map(len, docs)))):
            batch = collate_steps([[docs[i] for i in row]], self.tokenizer.pad_token_id)
            if not len(batch.step_docs):
                continue
            with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=cast):
                probs = torch.sigmoid(step_logits(self.model, batch.to(device)).float()).cpu().tolist()
            for doc, p in zip(batch.step_docs, probs, strict=True):
                out[row[doc]].append(p)
        return out

    def scores(self, samples: Sequence[dict[str, Any]]) -> torch.Tensor:
        """(n,) aggregated step probability per sample (the router's `prm` component)."""
        return torch.tensor([aggregate(p, self.aggregation) for p in self.step_scores(samples)], dtype=torch.float32, device="cpu")

    def step_token_rewards(self, samples: Sequence[dict[str, Any]]) -> list[list[tuple[int, float]]]:
        """For dense RL rewards: per sample, (index of the step's scored token within the response's tokens, P(good)) per step.

        Indices count from the response's first token as the chat template tokenises it (the policy's own `response_ids`
        when policy and PRM share the tokenizer); the last step's index is the end-of-turn token.
        """
        docs = self.documents(samples)
        return [[(p - d.response_start, s) for p, s in zip(d.positions, scores, strict=True)] for d, scores in zip(docs, self.doc_scores(docs), strict=True)]
