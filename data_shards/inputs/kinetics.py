"""Kinetics (400/600/700) annotation CSVs: `label,youtube_id,time_start,time_end,split`.

A sample is a time range of a YouTube video. Its id is the official clip name `{youtube_id}_{start:06d}_
{end:06d}` either way: when a file of that name exists (the usual pre-cut download) it is used whole; else
`{youtube_id}.*` (a full video) is cut at build time, frame-exactly. The source is one CSV or a folder of
them (train.csv, validate.csv, test.csv); videos are looked up by file name under `--videos` (default: the
CSV's folder, recursively). Clips of one YouTube video share a hash-split group.
"""

from __future__ import annotations

import csv
from pathlib import Path

from data_shards.format import FormatError, canonical_split
from data_shards.inputs import InputItem, Inputs, Reject, SourceOptions, parse_range
from data_shards.inputs.detect import is_kinetics_csv
from data_shards.inputs.folders import by_stem


def _split_of_file(csv_path: Path) -> str | None:
    """No split column: train.csv, validate.csv, test.csv name it; another file name leaves it to the hash."""
    try:
        return canonical_split(csv_path.stem)
    except FormatError:
        return None


def _row(
    row: dict[str, str], where: str, csv_path: Path, videos: dict[str, Path], root: Path
) -> InputItem | Reject:
    yid, value = row.get("youtube_id", ""), row.get("split", "")
    try:
        split = canonical_split(value) if value else _split_of_file(csv_path)
    except FormatError as e:
        return Reject(where, "", str(e), yid, "bad-split")
    if not yid:
        return Reject(where, "", "missing youtube_id", None, "bad-row", split)
    try:
        start, end = parse_range(row.get("time_start"), row.get("time_end"))
        if start is None or end is None:
            raise ValueError("missing time_start/time_end")
    except ValueError as e:
        return Reject(where, "", str(e), yid, "bad-time-range", split)
    name = f"{yid}_{int(start):06d}_{int(end):06d}"
    label = row.get("label") or None
    if name in videos:  # already cut: the whole file is the clip
        return InputItem(name, str(videos[name]), label, split, where, group=yid)
    if yid in videos:
        return InputItem(name, str(videos[yid]), label, split, where, start, end, group=yid)
    return Reject(
        where, "", f"missing file: no {name}.* or {yid}.* under {root}", name, "missing-file", split
    )


def read_kinetics(source: Path, options: SourceOptions) -> Inputs:
    """Every Kinetics CSV of `source` (a file or a folder), its rows matched to video files by name."""
    csvs = [source] if source.is_file() else [p for p in sorted(source.glob("*.csv")) if is_kinetics_csv(p)]
    if not csvs:
        raise FormatError(f"{source}: no Kinetics CSV (header label,youtube_id,time_start,time_end,split)")
    root = Path(options.videos) if options.videos else csvs[0].parent
    videos = by_stem(root)
    out = Inputs(items=[])
    for csv_path in csvs:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            out.labelled |= "label" in [c.strip() for c in reader.fieldnames or []]
            for n, raw in enumerate(reader, start=2):
                row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
                got = _row(row, f"{csv_path.name}:{n}", csv_path, videos, root)
                if isinstance(got, Reject):
                    out.rejects.append(got)
                else:
                    out.items.append(got)
    return out
