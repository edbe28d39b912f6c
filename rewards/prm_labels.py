"""Step labels for a process reward model from the policy's own samples: by rule where the task can check a step,
by Math-Shepherd completion where only the final answer can be checked.

- Rule (`rule_labels`): the synthetic suite's column steps are checked by arithmetic
  (`data_builders.synthetic.column_step_labels`); a refusal, or any answer to an unsafe request, has nothing to check
  step by step, so each of its steps carries the outcome (`task_score`).
- Completion (`shepherd_labels`, Math-Shepherd's hard estimate): a step is good iff some continuation of the prefix
  that ends with it reaches the right final answer. The continuations are sampled by the trainer
  (`align/trainers/prm_samples.py`); this module only turns their outcomes into labels. The prefix ending with the
  last step is the whole response, so the last step's label is the response's own outcome, and a correct response is
  itself a continuation of every one of its prefixes (all its steps are good, nothing to sample).
"""

from __future__ import annotations

from collections.abc import Sequence

from data_builders.synthetic import column_step_labels, operands_of
from rewards.verifiers import is_refusal, task_score


def rule_labels(problem: dict, response: str, steps: Sequence[str]) -> list[float] | None:
    """Labels by rule for a synthetic-suite problem ({messages, answer, unsafe}); None when the prompt is not one."""
    outcome = task_score(problem, response)
    if problem.get("unsafe") or is_refusal(response):
        return [outcome] * len(steps)
    operands = operands_of(problem["messages"])
    if operands is None:
        return None
    return [float(x) for x in column_step_labels(*operands, list(steps))]


def shepherd_labels(outcomes: Sequence[Sequence[float]], final_outcome: float, soft: bool = False) -> list[float]:
    """Math-Shepherd labels of a response's steps.

    `outcomes[k]`: the verifier's score (1 right, 0 wrong) of each continuation sampled from the prefix ending with step k,
    for every step but the last; `final_outcome`: the response's own score (the last step's label). Hard estimate: 1 if any
    continuation is right; soft: the share that are. An empty list of continuations counts as none right.
    """
    labels = []
    for values in outcomes:
        right = [float(v >= 1.0) for v in values]
        labels.append(sum(right) / len(right) if soft and right else float(any(right)))
    return [*labels, float(final_outcome >= 1.0)]
