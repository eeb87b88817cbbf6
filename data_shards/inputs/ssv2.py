"""Something-Something v2: `labels.json` ({template: "index"}), `train.json` / `validation.json` /
`test.json` (lists of {"id", "label", "template", "placeholders"}), videos `{id}.webm`.

The class of a row is its template with the `[something]` brackets removed (what labels.json lists), and
the class order is labels.json's indices, so labels match the official ones. Rows without a template (the
unlabelled test.json) are left out, with a note. Videos are looked up by id under `--videos` (default: the
folder given, or labels.json's folder, recursively). Rejects name the JSON file and the line the entry starts on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_shards.format import FormatError
from data_shards.inputs import InputItem, Inputs, Reject, SourceOptions
from data_shards.inputs.detect import find_file
from data_shards.inputs.folders import by_stem

SPLIT_FILES = (("train.json", "train"), ("validation.json", "val"), ("test.json", "test"))


def class_name(template: str) -> str:
    """ "Putting [something] on a surface" -> "Putting something on a surface" (labels.json's key)."""
    return template.replace("[", "").replace("]", "").strip()


def entries_with_lines(path: Path) -> list[tuple[int, Any]]:
    """The elements of a JSON array file with the line each starts on (for file:line in rejects)."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.find("[")
    if pos < 0:
        raise FormatError(f"{path}: expected a JSON array")
    out, pos = [], pos + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return out
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        out.append((text.count("\n", 0, pos) + 1, value))
        pos = end


def _classes(labels_json: Path) -> list[str]:
    mapping = json.loads(labels_json.read_text(encoding="utf-8"))
    try:
        order = sorted((int(i), name) for name, i in mapping.items())
    except (AttributeError, TypeError, ValueError):
        raise FormatError(f"{labels_json}: expected {{template: index}}") from None
    if [i for i, _ in order] != list(range(len(order))):
        raise FormatError(f"{labels_json}: indices must be 0..{len(order) - 1} without gaps")
    return [name for _, name in order]


def _entry(
    obj: Any, where: str, split: str, videos: dict[str, Path], root: Path
) -> InputItem | Reject | None:
    vid = str(obj.get("id", "")) if isinstance(obj, dict) else ""
    if not vid:
        return Reject(where, "", "entry without an id", None, "bad-row", split)
    template = obj.get("template") or obj.get("label")
    if not template:
        return None  # unlabelled (test.json)
    if vid not in videos:
        return Reject(where, "", f"missing file: no {vid}.* under {root}", vid, "missing-file", split)
    return InputItem(vid, str(videos[vid]), class_name(str(template)), split, where)


def read_ssv2(source: Path, options: SourceOptions) -> Inputs:
    """SSv2 from `source` (the folder with labels.json, or labels.json itself)."""
    labels_json = (
        source
        if source.name == "labels.json"
        else find_file(source if source.is_dir() else source.parent, "labels.json")
    )
    if labels_json is None:
        raise FormatError(f"{source}: no labels.json (Something-Something v2 layout)")
    folder = labels_json.parent
    root = Path(options.videos) if options.videos else (source if source.is_dir() else folder)
    videos = by_stem(root)
    classes = _classes(labels_json)
    out = Inputs(items=[], labelled=True, classes=classes)
    known = set(classes)
    for name, split in SPLIT_FILES:
        if not (folder / name).is_file():
            continue
        unlabelled = 0
        for line, obj in entries_with_lines(folder / name):
            got = _entry(obj, f"{name}:{line}", split, videos, root)
            if got is None:
                unlabelled += 1
            elif isinstance(got, Reject):
                out.rejects.append(got)
            elif got.label not in known:
                out.rejects.append(
                    Reject(
                        got.where,
                        got.path,
                        f"unknown class {got.label!r} (not in labels.json)",
                        got.id,
                        "unknown-label",
                        split,
                    )
                )
            else:
                out.items.append(got)
        if unlabelled:
            out.notes.append(f"{name}: {unlabelled} entries without a label left out")
    return out
