"""How a recipe is read: strict YAML into typed dataclasses, dotted overrides, declared value ranges.

A typo in a recipe must fail before a job starts, naming the key and the closest valid one, so every key is checked
against the dataclass fields and every value against its type hint. A value out of range fails the same way: a field
declares its range next to it (`bounded(default, gt=0)`, kept in the field's metadata) and a section may add checks
across its fields (`problems()`); `build` checks both, in well under a second and before torch is imported. The
sections themselves are in `align/config.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from data_builders.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A recipe that cannot be loaded; the message names the file and the key path."""


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The range a numeric setting must lie in (`allow`: extra values with a meaning, e.g. -1 = no limit).

    On a list or mapping field the bounds hold for every element or value.
    """

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    allow: tuple[float, ...] = ()

    def holds(self, value: float) -> bool:
        if value in self.allow:
            return True
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))  # fmt: skip

    def describe(self) -> str:
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = (self.le, "]") if self.le is not None else (self.lt, ")") if self.lt is not None else None
        if low and high:
            text = f"in {low[0]}{format_number(low[1])}, {format_number(high[0])}{high[1]}"
        elif low:
            text = f"{'>=' if low[0] == '[' else '>'} {format_number(low[1])}"
        else:
            text = f"{'<=' if high and high[1] == ']' else '<'} {format_number(high[0]) if high else ''}"
        return text + "".join(f" or {format_number(a)}" for a in self.allow)


def format_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def bounded(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, gt: float | None = None, ge: float | None = None,
            lt: float | None = None, le: float | None = None, allow: tuple[float, ...] = ()) -> Any:  # fmt: skip
    """A dataclass field whose value `build` checks against the bounds (the message names the key, the range and the value)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"bounds": Bounds(gt, ge, lt, le, allow)})


SHARE = {"ge": 0.0, "le": 1.0}  # a probability or fraction


# ----------------------------------------------------------------------------- loading
def read_yaml_mapping(path: str | Path, what: str = "config file", error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (safe_load); a missing file, bad YAML or a list is an error naming the file."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except yaml.YAMLError as err:
        raise error(f"{path}: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def load_recipe(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read `path` (YAML), apply `key.sub=value` overrides, and build a checked `cls`."""
    source = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path:
        raw = read_yaml_mapping(path, "config file")
    for item in overrides:
        apply_override(raw, item, source)
    return build(cls, raw, source=source)


def apply_override(raw: dict, item: str, source: str = "--set") -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 1e-5, true, [1,2] work)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-5")
    key, _, text = item.partition("=")
    value = yaml.safe_load(text) if text.strip() else None
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = value


def build(cls: type[T], data: Any, source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and mistyped values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {_join(prefix, close[0])!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown key {_join(prefix, key)!r}{hint}")
    kwargs = {name: _coerce(hints[name], data[name], source, _join(prefix, name)) for name in names if name in data}
    built = cls(**kwargs)
    _check_settings(built, data, source, prefix)
    return built


def _check_settings(obj: Any, data: dict, source: str, prefix: str) -> None:
    """Each field's declared bounds (`bounded`), then the section's own cross-field checks (`problems()`)."""
    for f in dataclasses.fields(obj):
        bounds = f.metadata.get("bounds")
        if bounds is not None:
            _check_bounds(bounds, getattr(obj, f.name), data.get(f.name, getattr(obj, f.name)), source, _join(prefix, f.name))
    for key, problem in getattr(obj, "problems", lambda: [])():
        raise ConfigError(f"{source}: {_join(prefix, key)}: {problem}")


def _check_bounds(bounds: Bounds, value: Any, raw: Any, source: str, path: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _check_bounds(bounds, v, raw.get(k, v) if isinstance(raw, dict) else v, source, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_bounds(bounds, v, raw[i] if isinstance(raw, list) and i < len(raw) else v, source, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and not bounds.holds(value):
        raise ConfigError(f"{source}: {path}: must be {bounds.describe()}, got {raw}")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _coerce(hint: Any, value: Any, source: str, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, source, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, source, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {path}: {value!r} does not fit {hint}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_text = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: {path}: {value!r} is not one of {list(args)}{hint_text}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, source, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {path}: expected a mapping, got {type(value).__name__}")
        return {k: _coerce(args[1], v, source, f"{path}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-5` as a string; accept it as the number it is
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{source}: {path}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def to_dict(recipe: Any) -> dict:
    return dataclasses.asdict(recipe)


def flat_dict(recipe: Any) -> dict[str, Any]:
    """{"optim.lr": 1e-4, ...}: the dotted form sweeps and trackers use."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(_join(prefix, key), value)
        else:
            out[prefix] = node

    walk("", to_dict(recipe))
    return out


def save_resolved(recipe: Any, path: Path) -> None:
    """Write the recipe as run, so a run directory says exactly what produced it."""
    path.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
