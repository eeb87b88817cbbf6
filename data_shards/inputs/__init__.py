"""Stage 1 of a build: what to shard. Manifests and folders -> `InputItem`s, plus the rows rejected
before any video is opened (each with the file:line it came from, for `rejects.jsonl`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VIDEO_SUFFIXES = frozenset(
    {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts", ".3gp"}
)
WORK_DIR = ".work"  # the build's cache inside the output folder: never an input


@dataclass(frozen=True)
class InputItem:
    """One video to shard. `id` is stable across machines (a relative path, never absolute), so keys and
    hash splits do not move when the data set does; `where` (file:line) goes into rejects."""

    id: str
    path: str
    label: str | None
    split: str | None
    where: str


@dataclass(frozen=True)
class Reject:
    """One input that did not make it into a shard, and why (a line of `rejects.jsonl`)."""

    where: str
    path: str
    reason: str
    id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "id": self.id, "where": self.where, "reason": self.reason}


@dataclass
class Inputs:
    """What a source holds: items, early rejects, and whether it carries labels at all (unlabelled sets
    make label -1 shards for pretraining)."""

    items: list[InputItem]
    rejects: list[Reject] = field(default_factory=list)
    labelled: bool = False


def read_inputs(source: str | os.PathLike) -> Inputs:
    """Parse a CSV/JSONL manifest or a (class-)folder. Relative paths resolve against the manifest's
    folder; ids are those relative paths (posix)."""
    from data_shards.inputs.folders import read_folder
    from data_shards.inputs.tables import read_csv, read_jsonl

    source = Path(source)
    if source.is_dir():
        return read_folder(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such manifest or folder")
    suffix = source.suffix.lower()
    if suffix == ".csv":
        return read_csv(source)
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(source)
    from data_shards.format import FormatError

    raise FormatError(f"{source}: manifest must be .csv or .jsonl (or pass a folder)")
