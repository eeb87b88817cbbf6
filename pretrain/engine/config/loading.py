"""Config loading: defaults ← YAML file ← `key.sub=value` overrides, strict keys and types throughout.

Works on ANY dataclass tree. Every error names the key and what would be valid ("did you mean ...").
OmegaConf structured configs were considered: they do not take `Literal`, `str | int` or
`tuple[float, ...]` fields and their errors do not suggest the intended key, so the ~100 lines below stay.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .schema import ConfigError, _flat

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _expect(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {what}, got {type(value).__name__} {value!r}")


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    # str last: it takes an int as a name, so in `str | int` an int stays an int
    for arg in sorted(args, key=lambda a: a is str):
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except ConfigError:
            continue
    raise ConfigError(f"{key}: {value!r} is not {' or '.join(_type_name(a) for a in args)}")


def _coerce_literal(value: Any, tp: Any, key: str) -> Any:
    choices = typing.get_args(tp)
    if value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}{extra}")
    return value


def _coerce_sequence(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    _expect(isinstance(value, (list, tuple)), key, "a list", value)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    item = args[0] if args else Any
    out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(out) if origin is tuple else out


_SCALARS: dict[type, tuple[str, Any]] = {
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert: int→float, int→str, list→tuple) `value` against type hint `tp`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is Literal:
        return _coerce_literal(value, tp, key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {type(value).__name__} {value!r}")
        return build_dataclass(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        return _coerce_sequence(value, tp, key)
    if origin is dict:
        _expect(isinstance(value, dict), key, "a mapping", value)
        return dict(value)
    if tp is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a name YAML reads as a number: model.preset=18 is the preset "18"
    if tp in _SCALARS:
        what, ok = _SCALARS[tp]
        _expect(ok(value), key, what, value)
        return float(value) if tp is float else value
    if isinstance(tp, type):
        _expect(isinstance(value, tp), key, tp.__name__, value)
    return value


def _unknown(key: str, valid: list[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return ConfigError(f"unknown key {prefix}{key} (did you mean {prefix}{close[0]}?)")
    return ConfigError(f"unknown key {prefix}{key}; valid keys under {prefix or 'the top level'}: {valid}")


def build_dataclass(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """`cls(**data)` recursively, with every key checked against the tree and every value typed."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(key, sorted(fields), prefix)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from e


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["a.b=1e-3", "c=[1,2]"]` → nested dict; values parsed as YAML (so 1e-3, true, null, [1,2] work)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=50)")
        key, raw = item.split("=", 1)
        value = _fix_yaml_numbers(parse_yaml(raw, f"override {item!r}")) if raw.strip() else ""
        node = out
        parts = key.strip().lstrip("-").split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is set to a value and used as a section")
        node[parts[-1]] = value
    return out


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _fix_yaml_numbers(node: Any) -> Any:
    """YAML 1.1 loads `1e-3` (no dot, no exponent sign) as a string: turn such strings into floats."""
    if isinstance(node, dict):
        return {k: _fix_yaml_numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_numbers(v) for v in node]
    if isinstance(node, str) and "e" in node.lower() and _FLOAT_RE.match(node):
        return float(node)
    return node


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _alternative_groups(cls: Any, prefix: str = "") -> list[tuple[str, ...]]:
    """Dotted keys of every `ALTERNATIVES` group declared in the dataclass tree of `cls`.

    A section declares `ALTERNATIVES: ClassVar = (("a", "b"),)` when at most one of `a`, `b` may be set
    (e.g. the continual modes): see `_drop_file_alternatives`.
    """
    groups = [tuple(prefix + k for k in g) for g in getattr(cls, "ALTERNATIVES", ())]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints.get(f.name)):
            groups += _alternative_groups(hints[f.name], f"{prefix}{f.name}.")
    return groups


def _get(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _drop_file_alternatives(cls: Any, file: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """The command line's choice among alternatives wins over the file's: a key set (not null, not empty)
    by an override drops the file's other keys of its group, so `continual.domains=[S1]` works with a file
    that sets `continual.classes_per_experience`. Both set on the command line stay an error (validate)."""
    for group in _alternative_groups(cls):
        chosen = [k for k in group if _get(over, k) not in (None, [], {}, "")]
        if not chosen:
            continue
        for key in group:
            parent = _get(file, key.rpartition(".")[0]) if "." in key else file
            if key not in chosen and isinstance(parent, dict):
                parent.pop(key.rpartition(".")[2], None)
    return file


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last silently, so a
    second `train:` section pasted at the end of a config would replace the first without a word."""


def _no_duplicate_keys(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"key {key!r} is given twice in one mapping (lines {seen[key] + 1} and {key_node.start_mark.line + 1})"
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> data, every problem a ConfigError naming `where` (a file, an override): bad syntax with
    its line, a key given twice."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.MarkedYAMLError as e:
        at = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {e.problem} ({e.context})" if e.context else
                          f"{where}: not valid YAML{at}: {e.problem}") from None  # fmt: skip
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None


def read_yaml(path: str | os.PathLike, what: str = "--config") -> Any:
    """A YAML file the user gave (`what` names the option): a missing, unreadable, non-UTF-8, empty or
    malformed file is a ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {path}: no such file" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ConfigError(f"{what} {path}: the file is empty")
    return parse_yaml(text, str(path))


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls` ← YAML file ← dotlist overrides; strict keys and types throughout."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        data = _fix_yaml_numbers(loaded)
    over = parse_overrides(overrides or [])
    return build_dataclass(cls, deep_merge(_drop_file_alternatives(cls, data, over), over))


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON/YAML-able dict (tuples as lists)."""

    def conv(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        return x

    return conv(dataclasses.asdict(cfg))


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(d: dict[str, Any]) -> dict[str, Any]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}` (MLflow params)."""
    return _flat(d)
