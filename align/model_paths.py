"""Model, tokenizer and data paths, checked before anything loads: a missing checkpoint gets the command that makes it, not a hub 404.

Which names are local paths and which are hub names is `data_builders.paths.looks_local` (one rule for every path).
"""

from __future__ import annotations

from typing import Any

from align import builtin
from data_builders.paths import MissingPathError, local_path, looks_local
from data_builders.readers import check_data_path

MAKE_SFT = "`align sft --config configs/sft/quickstart.yaml`"
MAKE_RM = "`align rm --config configs/rm/quickstart.yaml` (after `align sft --config configs/sft/quickstart.yaml`)"
MAKE_PRM = "`align prm --config configs/prm/quickstart.yaml` (after `align sft --config configs/sft/quickstart.yaml`)"
# any one of these makes a directory loadable by AutoTokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")

__all__ = ["MAKE_RM", "MAKE_SFT", "MissingPathError", "check_model_path", "check_recipe_paths", "check_tokenizer_path", "looks_local"]


def check_model_path(name: str, field: str = "model.name_or_path", make: str | None = None) -> None:
    """Raise naming the field, the path and (when known) the command that makes it; an unknown `builtin:` name lists the known ones."""
    if builtin.is_builtin(name):
        builtin.builtin_shape(name)  # raises naming the built-in shapes
        return
    path = local_path(name)
    if path.is_dir() and not (path / "config.json").exists():  # a run directory instead of the model it exported
        inner = " (the run's export is its model/ directory: point the field there)" if (path / "model" / "config.json").exists() else ""
        raise MissingPathError(f"{field} {name!r} is a directory without a config.json, not a saved model{inner}")
    if not looks_local(name) or path.exists():
        return
    make = make or (MAKE_SFT if "sft" in name else None)
    hint = f" Make it with {make}." if make else ""
    raise MissingPathError(f"{field} {name!r} does not exist.{hint} Or point {field} at a hub name or local model.")


def check_tokenizer_path(model: Any) -> None:
    """The tokenizer `load_tokenizer` will read (`model.tokenizer`, else a non-built-in model's own) exists when it is local,
    and a local directory holds tokenizer files."""
    field, name = ("model.tokenizer", model.tokenizer) if model.tokenizer else ("model.name_or_path", model.name_or_path)
    if builtin.is_builtin(name) and field == "model.name_or_path":
        return  # the built-in tokenizer ships with align
    if not looks_local(name) and not local_path(name).exists():
        return  # a hub name
    path = local_path(name)
    if not path.exists():
        raise MissingPathError(f"{field} {name!r} does not exist; point it at a tokenizer directory or a hub name")
    if path.is_dir() and not any((path / f).exists() for f in TOKENIZER_FILES):
        hint = "set model.tokenizer to the tokenizer's directory or hub name" if field == "model.name_or_path" else "point it at a tokenizer directory"
        raise MissingPathError(f"{field} {name!r} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); {hint}")


def check_recipe_paths(recipe: Any) -> None:
    """The model, its tokenizer and every data source of a recipe, before torch loads (so such mistakes take a fraction of a second)."""
    check_model_path(recipe.model.name_or_path)
    check_tokenizer_path(recipe.model)
    for split in ("train", "eval"):
        for i, source in enumerate(getattr(recipe.data, split)):
            check_data_path(source.path, f"data.{split}[{i}].path")
