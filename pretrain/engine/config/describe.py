"""The resolved config as YAML with each key's meaning: `--print-config` of both training commands.

The meanings are the comments beside (or right above) each field in the section dataclasses, read from their
source, so the listing cannot drift from the schema: a key added without a comment shows up bare."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
from typing import Any

import yaml

_FIELD = re.compile(r"^    (\w+)\s*:")  # a field at class-body level (after dedent)
_PRAGMAS = ("type:", "noqa", "fmt:", "pyright:")  # tool directives, not meanings


def describe(cfg: Any) -> str:
    """`cfg` (a config dataclass) as YAML: every key with its value, and its meaning as a comment."""
    lines: list[str] = []
    _section(cfg, 0, lines)
    return "\n".join(lines) + "\n"


def _section(obj: Any, depth: int, lines: list[str]) -> None:
    notes = field_comments(type(obj))
    pad = "  " * depth
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        note = f"  # {notes[f.name]}" if notes.get(f.name) else ""
        if dataclasses.is_dataclass(value):
            if depth == 0 and lines:
                lines.append("")
            lines.append(f"{pad}{f.name}:{note}")
            _section(value, depth + 1, lines)
        else:
            lines.append(f"{pad}{f.name}: {_scalar(value)}{note}")


def _scalar(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """{field: meaning} for a dataclass and its bases: the comment at the end of the field's lines, after the
    comment lines right above it."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            try:
                source = textwrap.dedent(inspect.getsource(klass))
            except (OSError, TypeError):  # no source (a frozen app): keys without meanings
                continue
            out.update(_comments(source))
    return out


def _comments(source: str) -> dict[str, str]:
    at_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if not text.startswith(_PRAGMAS):
                at_line[tok.start[0]] = text
    out: dict[str, str] = {}
    above: list[str] = []
    current: str | None = None
    for n, line in enumerate(source.splitlines(), start=1):
        body = line.strip()
        field = _FIELD.match(line)
        continued = line.startswith("     ") or body.startswith((")", "]", "}"))  # inside a field's value
        if body.startswith("#") and line.startswith("    #"):  # a comment line at field level
            above.append(at_line.get(n, ""))
            current = None
        elif field and not body.startswith(("def ", "return ", "@")):
            current = field.group(1)
            out[current] = " ".join([*above, at_line.get(n, "")]).strip()
            above = []
        elif current and continued:
            if n in at_line:  # a multi-line field's comment
                out[current] = f"{out[current]} {at_line[n]}".strip()
        else:
            above, current = [], None
    return out
