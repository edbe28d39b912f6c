"""Loss registry: each method family's losses register under a name, and recipes select them by name.

A registry instead of an if/elif chain lets a recipe mix losses (MPO) and lets users add one
without touching a trainer. Each family has one call signature, so a recipe that names a loss
of another family (an RM ranking loss in `mpo.losses`, say) fails in the recipe check, not mid-run:
- `preference` (MPO): fn(PreferenceInputs) -> (per-pair or per-chosen-token values, unit);
- `ranking` (reward models): fn(chosen, rejected, margin=None, gamma=...) -> per-pair losses;
- `sft`: fn(logprobs, weights, total_weight) -> scalar;
- `step` (process reward models): fn(logits, labels) -> per-step losses (labels in [0, 1]).
It lives in `rewards/`, the lowest package that holds losses, so `rewards/` never imports `align/`.
"""

from __future__ import annotations

from collections.abc import Callable

from data_builders.errors import UserKeyError

LOSS_FAMILIES = ("preference", "ranking", "sft", "step")
LOSSES: dict[str, tuple[str, Callable]] = {}  # name → (family, fn)


def register_loss(name: str, family: str) -> Callable[[Callable], Callable]:
    if family not in LOSS_FAMILIES:
        raise ValueError(f"loss family {family!r} is not one of {LOSS_FAMILIES}")

    def wrap(fn: Callable) -> Callable:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = (family, fn)
        return fn

    return wrap


def losses_of(family: str) -> list[str]:
    return sorted(n for n, (f, _) in LOSSES.items() if f == family)


def get_loss(name: str, family: str | None = None) -> Callable:
    """The loss `name`; with `family`, a loss of another family is an error naming the ones that fit."""
    if name not in LOSSES:
        scope = losses_of(family) if family else sorted(LOSSES)
        raise UserKeyError(f"unknown loss {name!r}; registered{f' {family}' if family else ''} losses: {scope}")
    found, fn = LOSSES[name]
    if family is not None and found != family:
        raise UserKeyError(f"loss {name!r} is a {found} loss, not a {family} loss; {family} losses: {losses_of(family)}")
    return fn
