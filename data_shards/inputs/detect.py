"""`--format auto`: what a source is, from its name, its CSV header or the files a data set ships with."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from data_shards.format import FormatError

KINETICS_COLUMNS = frozenset({"youtube_id", "time_start", "time_end"})
SEGMENT_COLUMNS = frozenset({"segment_start", "segment_end"})


def csv_header(path: Path) -> list[str]:
    """The first row of a CSV, stripped (what decides csv vs kinetics)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [c.strip() for c in next(csv.reader(f), [])]


def is_kinetics_csv(path: Path) -> bool:
    """A CSV with youtube_id, time_start and time_end columns."""
    return path.suffix.lower() == ".csv" and set(csv_header(path)) >= KINETICS_COLUMNS


def _find(root: Path, name: str, want_dir: bool, depth: int = 2) -> Path | None:
    """`name` at most `depth` levels below `root` (data sets unpack one level deep), shallowest first."""
    level = [root]
    for _ in range(depth + 1):
        for d in level:
            p = d / name
            if p.is_dir() if want_dir else p.is_file():
                return p
        level = [c for d in level for c in sorted(d.iterdir()) if c.is_dir() and not c.name.startswith(".")]
    return None


def find_dir(root: Path, name: str) -> Path | None:
    """The shallowest folder `name` under `root` (two levels at most)."""
    return _find(root, name, want_dir=True)


def find_file(root: Path, name: str) -> Path | None:
    """The shallowest file `name` under `root` (two levels at most)."""
    return _find(root, name, want_dir=False)


def _has_database(path: Path) -> bool:
    """An ActivityNet/THUMOS-style JSON (a top-level "database" object), not an SSv2 annotation list."""
    with open(path, encoding="utf-8") as f:
        if f.read(1) != "{":  # SSv2's split files are lists
            return False
    try:
        return "database" in json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return False


def _folder_formats(root: Path) -> list[str]:
    found = []
    if find_dir(root, "ucfTrainTestlist"):
        found.append("ucf101")
    if find_dir(root, "testTrainMulti_7030_splits"):
        found.append("hmdb51")
    labels = find_file(root, "labels.json")
    if labels and any((labels.parent / f).is_file() for f in ("train.json", "validation.json")):
        found.append("ssv2")
    if any(is_kinetics_csv(p) for p in sorted(root.glob("*.csv"))):
        found.append("kinetics")
    if find_file(root, "Charades_v1_classes.txt"):
        found.append("charades")
    return found


def detect_format(source: Path) -> str:
    """The format of `source`; an error names the candidates when more than one fits."""
    if source.is_file():
        suffix = source.suffix.lower()
        if suffix == ".csv":
            header = set(csv_header(source))
            return (
                "kinetics"
                if header >= KINETICS_COLUMNS
                else "segments"
                if header >= SEGMENT_COLUMNS
                else "csv"
            )
        if suffix in (".jsonl", ".ndjson"):
            return "jsonl"
        if suffix == ".json":
            return "segments" if _has_database(source) else "ssv2"
        raise FormatError(f"{source}: cannot tell its format from the name; pass --format (csv, jsonl, ...)")
    found = _folder_formats(source)
    if len(found) > 1:
        raise FormatError(f"{source}: looks like {' and '.join(found)}; pass --format to choose")
    return found[0] if found else "folder"
