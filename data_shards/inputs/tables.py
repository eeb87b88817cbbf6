"""CSV (`path,label[,split][,start,end]`, header required) and JSONL (`{"path", "label", "split", "start",
"end"}`) manifests. A time range (`start`/`end` or `time_start`/`time_end`, seconds) makes the row a clip of
its video, id `path#start-end`; several clips of one video are several samples. Several labels per row
(`a;b` in the CSV cell, a JSON list in JSONL) make the manifest multi-label."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path, PurePosixPath

from data_shards import storage
from data_shards.format import FormatError
from data_shards.inputs import LABEL_SEPARATOR, InputItem, Inputs, Reject, clip_id, parse_range, split_labels

CSV_COLUMNS = ("path", "label", "split", "start", "end", "time_start", "time_end")


def _range_of(row: dict[str, str]) -> tuple[float | None, float | None]:
    if row.get("time_start") or row.get("time_end"):
        return parse_range(row.get("time_start"), row.get("time_end"))
    return parse_range(row.get("start"), row.get("end"))


def _item(source: Path, where: str, row: dict[str, str], rejects: list[Reject]) -> InputItem | None:
    rel = row.get("path", "")
    if not rel:
        rejects.append(Reject(where, "", "empty path"))
        return None
    if storage.is_url(rel):  # a video in a bucket, listed by its URL: the URL is its stable id too
        p, path = PurePosixPath(rel.split("://", 1)[1]), rel
    else:
        p = Path(rel)
        path = str(p if p.is_absolute() else source.parent / p)
    try:
        start, end = _range_of(row)
    except ValueError as e:
        rejects.append(Reject(where, path, str(e), p.as_posix(), "bad-time-range", row.get("split") or None))
        return None
    labels = split_labels(row.get("label", ""))
    return InputItem(
        id=clip_id(p.as_posix(), start, end),
        path=path,
        label=labels[0] if labels else None,
        labels=labels if LABEL_SEPARATOR in row.get("label", "") else None,
        split=row.get("split") or None,
        where=where,
        start=start,
        end=end,
        group=p.as_posix(),
    )


def read_csv(source: Path) -> Inputs:
    """A CSV manifest; a row without a path or with a bad time range is rejected with its line."""
    with open(source, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns:
            raise FormatError(f"{source}: the CSV header must have a 'path' column (got {columns})")
        out = Inputs(items=[], labelled="label" in columns)
        unread = [c for c in columns if c and c not in CSV_COLUMNS]
        if unread:  # a misnamed label column would otherwise make an unlabelled set without a word
            out.notes.append(
                f"{source.name}: column(s) {unread} not read (the columns are {', '.join(CSV_COLUMNS)})"
                + ("; no 'label' column: the set is unlabelled (pretraining only)" if not out.labelled else "")
            )
        for n, row in enumerate(reader, start=2):
            clean = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            item = _item(source, f"{source.name}:{n}", clean, out.rejects)
            if item:
                out.items.append(item)
    return _kind(out)


def _kind(inputs: Inputs) -> Inputs:
    """Multi-label as soon as one row lists several labels; every row then carries its set."""
    if any(it.labels is not None for it in inputs.items):
        inputs.kind = "multi"
        inputs.items = [
            it if it.labels is not None else dataclasses.replace(it, labels=(it.label,) if it.label else ())
            for it in inputs.items
        ]
    return inputs


def read_jsonl(source: Path) -> Inputs:
    """A JSONL manifest; an invalid line is rejected with its number, the rest read on."""
    out = Inputs(items=[])
    with open(source, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{source.name}:{n}"
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("path"), str):
                    raise ValueError("expected an object with a string 'path'")
            except ValueError as e:
                out.rejects.append(Reject(where, "", f"invalid JSONL line: {e}"))
                continue
            out.labelled |= obj.get("label") is not None
            label = obj.get("label")
            if isinstance(label, list):  # a label set: the CSV cell form, so one parser reads both
                obj = {**obj, "label": LABEL_SEPARATOR.join(map(str, label)) + LABEL_SEPARATOR}
            row = {k: "" if v is None else str(v) for k, v in obj.items()}
            item = _item(source, where, row, out.rejects)
            if item:
                out.items.append(item)
    return _kind(out)
