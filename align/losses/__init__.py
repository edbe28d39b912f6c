"""Loss registry: each method's losses register under a name, and recipes select them by name.

A registry instead of an if/elif chain lets a recipe mix losses (MPO) and lets users add one
without touching a trainer.
"""

from __future__ import annotations

from collections.abc import Callable

LOSSES: dict[str, Callable] = {}


def register_loss(name: str) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable) -> Callable:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        return fn

    return wrap


def get_loss(name: str) -> Callable:
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; registered: {sorted(LOSSES)}")
    return LOSSES[name]
