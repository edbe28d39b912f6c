"""Step-labelled rows → tokenised `StepDoc`s for `align prm`.

A row is `{"prompt": str | messages, "steps": [str, ...], "labels": [...], "condition"?}` (the PRM800K /
Math-Shepherd shape: the steps are joined by `prm.step_join`), or `{"prompt", "response", "labels"}` with the steps
found by `prm.step_separator` (how the policy's own labelled samples are stored). A label is 0/1, a boolean, or a
probability in [0, 1] (Math-Shepherd's soft estimate). A row that cannot be used follows the bad-row policy, named
by file, 1-based row and field. A row with both `steps` and `response` has its steps found in the response, in
order, so the response keeps its own separators (the synthetic suite's step rows are written so).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from data_builders.bad_rows import BadRowError, BadRowPolicy, no_usable_rows
from data_builders.preference_data import _messages, check_condition
from rewards.prm import StepDoc, join_steps, render_steps, step_spans

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _response_text(raw: dict, origin: str, row: int) -> str:
    response = raw["response"]
    if not isinstance(response, str) or not response.strip():
        raise BadRowError(origin, row, "response", "expected a non-empty string")
    return response


def parse_step_row(raw: Any, origin: str, row: int, separator: str, joiner: str) -> tuple[list[dict], str, list[tuple[int, int]], list[float], str | None]:
    """(prompt messages, response, step spans, labels, condition) of one row, or a BadRowError naming the field."""
    if not isinstance(raw, dict):
        raise BadRowError(origin, row, "<row>", "expected a JSON object")
    if "prompt" not in raw:
        raise BadRowError(origin, row, "prompt", "missing")
    prompt = _messages(raw["prompt"], origin, row, "prompt")
    if not prompt or prompt[-1]["role"] == "assistant":
        raise BadRowError(origin, row, "prompt", "must end with a user (or system) message")
    if "steps" in raw:
        steps = raw["steps"]
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
            raise BadRowError(origin, row, "steps", "expected a non-empty list of non-empty strings")
        if "response" in raw:  # both: the steps are found in the response, in order (its own separators kept)
            response, spans = _response_text(raw, origin, row), []
            for step in steps:
                start = response.find(step, spans[-1][1] if spans else 0)
                if start < 0:
                    raise BadRowError(origin, row, "steps", f"step {len(spans) + 1} ({step[:40]!r}) is not in the response after step {len(spans)}")
                spans.append((start, start + len(step)))
        else:
            response, spans = join_steps(steps, joiner)
    elif "response" in raw:
        response = _response_text(raw, origin, row)
        spans = step_spans(response, separator)
    else:
        raise BadRowError(origin, row, "steps", "missing (give 'steps', or a 'response' split by prm.step_separator)")
    labels = raw.get("labels")
    if not isinstance(labels, list):
        raise BadRowError(origin, row, "labels", "missing or not a list")
    if len(labels) != len(spans):
        raise BadRowError(origin, row, "labels", f"{len(labels)} labels for {len(spans)} steps")
    for value in labels:
        if not isinstance(value, (bool, int, float)) or not 0.0 <= float(value) <= 1.0:
            raise BadRowError(origin, row, "labels", f"{value!r} is not 0/1, a boolean or a probability in [0, 1]")
    return prompt, response, spans, [float(v) for v in labels], raw.get("condition")


def build_step_docs(rows: Iterable[tuple[str, int, Any]], tokenizer: PreTrainedTokenizerBase, conditions: dict[str, str], separator: str,
                    joiner: str, max_length: int, policy: BadRowPolicy, what: str = "train") -> list[StepDoc]:  # fmt: skip
    """Every usable row as a `StepDoc`; a row longer than `max_length` tokens is a bad row (never cut: a cut drops steps)."""
    docs, skipped_before = [], policy.count
    for origin, row, raw in rows:
        try:
            prompt, response, spans, labels, condition = parse_step_row(raw, origin, row, separator, joiner)
            check_condition(condition, conditions, origin, row)
            doc = render_steps(tokenizer, conditions, condition, prompt, response, spans)
            if len(doc) > max_length:
                raise BadRowError(origin, row, "steps", f"{len(doc)} tokens exceed data.max_length {max_length}")
        except BadRowError as err:
            policy.handle(err, raw)
            continue
        doc.labels, doc.origin = labels, f"{origin}:{row}"
        docs.append(doc)
    if not docs:
        raise no_usable_rows("step-labelled rows", what, policy, policy.count - skipped_before)
    return docs
