"""Recipes: nested dataclasses read from YAML, with dotted overrides from the command line.

    recipe = load_recipe(Recipe, "recipes/demo.yaml", ["sft.optim.lr=1e-4"])

A key that the dataclass does not declare is an error, never ignored. The help text of a field
is the string literal written under it in the dataclass (an attribute docstring), so the CLI
help and the code cannot drift apart. A number's allowed range is part of its annotation,

    lr: Positive = 1e-4          # Annotated[float, Range(gt=0)]

checked as the recipe is read (`sft.optim.lr: must be > 0, got -0.001`) and shown by `--help`.
Checks that need more than one field or the machine (batch sizes that must divide, a model
path that must exist) belong to each stage's `validate`, run before it loads anything.
"""

from __future__ import annotations

import ast
import re
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the config dataclasses."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The bounds of a number field, given in its annotation: `Annotated[float, Range(gt=0)]`."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def __str__(self) -> str:
        low = f"({self.gt:g}" if self.gt is not None else f"[{self.ge:g}" if self.ge is not None else ""
        high = f"{self.lt:g})" if self.lt is not None else f"{self.le:g}]" if self.le is not None else ""
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"> {self.gt:g}" if self.gt is not None else f">= {self.ge:g}"
        return f"< {self.lt:g}" if self.lt is not None else f"<= {self.le:g}"

    def violation(self, value: float) -> str | None:
        """What is wrong with `value` ("must be > 0, got -1"), or None when it is in range."""
        inside = (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt)
            and (self.le is None or value <= self.le)
        )
        return None if inside else f"must be {self}, got {value!r}"


Positive = Annotated[float, Range(gt=0)]
NonNegative = Annotated[float, Range(ge=0)]
PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
Fraction = Annotated[float, Range(gt=0, lt=1)]
Probability = Annotated[float, Range(gt=0, le=1)]
UnitInterval = Annotated[float, Range(ge=0, le=1)]


def bounds(tp: Any) -> Range | None:
    """The Range in an annotation (`Positive`, `Positive | None`), or None."""
    if get_origin(tp) is Annotated:
        return next((extra for extra in tp.__metadata__ if isinstance(extra, Range)), None)
    if get_origin(tp) in (Union, types.UnionType):
        return next(filter(None, map(bounds, get_args(tp))), None)
    return None


def check_ranges(config: Any, prefix: str = "") -> None:
    """Refuse the first field of `config`, nested sections included, that is outside its Range.

    `from_dict` checks as it builds; this checks a config built in Python, at a stage's start."""
    hints = typing.get_type_hints(type(config), include_extras=True)
    for f in dataclasses.fields(config):
        key, value = f"{prefix}.{f.name}" if prefix else f.name, getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, key)
        elif isinstance(value, (int, float)) and (limits := bounds(hints[f.name])) and (problem := limits.violation(value)):
            raise ConfigError(f"{key}: {problem}")


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: {field name: the string literal under it}."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, default: Any = None) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (int -> float).

    A mapping for a nested dataclass is applied on top of `default`, the value the field has
    without it, so that the keys it does not name keep that value."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        value = _coerce(value, tp.__origin__, where, default)
        limits = bounds(tp)
        if limits and (problem := limits.violation(value)):
            raise ConfigError(f"{where}: {problem}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where, default if isinstance(default, tp) else None)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where, default)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(c) for c in get_args(tp))
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def from_dict(cls: type, data: dict, where: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are errors.

    Fields the mapping does not name keep their value in `base`, or without one their default.
    A nested section starts from its parent's default for it, not from its own class's
    defaults: `SFTConfig.optim` defaults to `OptimConfig(lr=3e-4, epochs=2)`, and setting
    `optim.lr` leaves `epochs` at 2."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown key '{name}' (known keys{' of ' + where if where else ''}: {', '.join(fields)})")
    kwargs = {name: getattr(base, name) for name in fields} if base is not None else {}
    for name, value in data.items():
        default = getattr(base, name) if base is not None else _field_default(fields[name])
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name, default)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without a value
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def to_dict(config: Any) -> dict:
    """The plain mapping of a config dataclass, as it would be written back to YAML."""
    return dataclasses.asdict(config)


def _float_constructor(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    text = loader.construct_scalar(node)
    try:
        return float(text)
    except ValueError:
        return text


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` (no dot) as a float, as Python does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
_Loader.add_constructor("tag:yaml.org,2002:float", _float_constructor)


def apply_override(data: dict, override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is read as YAML (`1e-4`, `true`, `[a, b]`)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: '{part}' is not a section")
        node = child
    value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    node[leaf] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    try:
        data = yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    return data


def load_recipe(cls: type, path: str | Path | None, overrides: list[str] = ()) -> Any:
    """Read a recipe YAML (or start empty) into `cls`, then apply `a.b=c` overrides one by one
    on top of it; an error in the file names the file."""
    try:
        recipe = from_dict(cls, read_yaml(path) if path else {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    for override in overrides:
        data: dict = {}
        apply_override(data, override)
        recipe = from_dict(cls, data, base=recipe)
    return recipe


def describe(config: Any, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, default, allowed range or "", help) for every leaf field of a config, for `--help`.

    Nested sections are read from the instance, so a stage's own defaults for them (a default
    instance's) are the ones shown."""
    docs = field_docs(type(config))
    hints = typing.get_type_hints(type(config), include_extras=True)
    rows = []
    for f in dataclasses.fields(config):
        key, value = f"{prefix}{f.name}", getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(value, key + "."))
        else:
            limits = bounds(hints[f.name])
            rows.append((key, repr(value), str(limits) if limits else "", docs.get(f.name, "")))
    return rows
