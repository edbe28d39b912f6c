"""Local model paths, checked before anything loads: a missing checkpoint gets the command that makes it, not a hub 404."""

from __future__ import annotations

from pathlib import Path

MAKE_SFT = "`align sft --config configs/sft/quickstart.yaml`"
MAKE_RM = "`align rm --config configs/rm/quickstart.yaml` (after `align sft --config configs/sft/quickstart.yaml`)"


def looks_local(name: str) -> bool:
    """A path rather than a hub name: relative or absolute, under runs/, or with more than one slash."""
    return name.startswith((".", "/", "runs/")) or name.count("/") > 1


def check_model_path(name: str, field: str = "model.name_or_path", make: str | None = None) -> None:
    """Raise FileNotFoundError naming the field, the path and (when known) the command that makes it."""
    if not looks_local(name) or Path(name).exists():
        return
    make = make or (MAKE_SFT if "sft" in name else None)
    hint = f" Make it with {make}." if make else ""
    raise FileNotFoundError(f"{field} {name!r} does not exist.{hint} Or point {field} at a hub name or local model.")
