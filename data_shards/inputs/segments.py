"""Sources whose labels are time segments, or several labels per video.

- `segments` CSV: `path,segment_start,segment_end,label[,split]`, one row per segment (seconds); a row with
  an empty segment lists a video with no action (all background). Rows of one path are one video.
- ActivityNet / THUMOS JSON: `{"database": {id: {"subset": "training|validation|testing", "annotations":
  [{"segment": [start, end], "label": name}, ...]}}}`; the video is `{id}.*` or `v_{id}.*` under `--videos`
  (default: the JSON's folder). Videos of a subset without annotations (ActivityNet's testing) are left out
  with a note.
- Charades: `Charades_v1_train.csv` / `Charades_v1_test.csv` (`id, ..., actions="c092 11.90 21.20;..."`),
  `Charades_v1_classes.txt` (`c000 Holding some clothes`), videos `{id}.mp4` under `--videos` (default
  `Charades_v1_480/` beside them). Each video's label set is the classes of its actions (PySlowFast's
  multi-label Charades); `--labels segments` keeps the actions as segments instead.

Segments are checked in `plan.py` (end after start, a known label) and against the video's duration after
validation (`build.py`), so every reader gets the same rejects.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from data_shards.format import FormatError
from data_shards.inputs import VIDEO_SUFFIXES, InputItem, Inputs, Reject, Segment, SourceOptions
from data_shards.inputs.detect import find_file

CHARADES_CLASSES = "Charades_v1_classes.txt"
CHARADES_SPLITS = {"Charades_v1_train.csv": "train", "Charades_v1_test.csv": "test"}
ACTIVITYNET_SUBSETS = {"training": "train", "validation": "val", "testing": "test"}


def read_segments(source: Path, options: SourceOptions | None = None) -> Inputs:
    """A segments CSV or an ActivityNet/THUMOS JSON file."""
    if source.suffix.lower() == ".json":
        return read_activitynet(source, options)
    return read_segments_csv(source)


def _seconds(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number of seconds") from None


def read_segments_csv(source: Path) -> Inputs:
    """One row per segment; an unreadable row rejects its video (naming the line), nothing else."""
    with open(source, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = {c.strip() for c in reader.fieldnames or []}
        need = {"path", "segment_start", "segment_end", "label"}
        if not need <= columns:
            raise FormatError(
                f"{source}: a segments CSV needs columns {sorted(need)} (got {sorted(columns)})"
            )
        videos: dict[str, dict[str, Any]] = {}
        for n, row in enumerate(reader, start=2):
            clean = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            where = f"{source.name}:{n}"
            rel = clean["path"]
            if not rel:
                continue
            v = videos.setdefault(rel, {"where": where, "split": clean.get("split") or None, "segs": []})
            if not (clean["segment_start"] or clean["segment_end"] or clean["label"]):
                continue  # a video with no action
            try:
                start = _seconds(clean["segment_start"], "segment_start")
                end = _seconds(clean["segment_end"], "segment_end")
            except ValueError as e:
                v["bad"] = Reject(where, rel, str(e), rel, "bad-segment")
                continue
            v["segs"].append(Segment(start, end, clean["label"], where))
    out = Inputs(items=[], labelled=True, kind="segments")
    for rel, v in videos.items():
        if "bad" in v:
            out.rejects.append(v["bad"])
            continue
        p = Path(rel)
        path = str(p if p.is_absolute() else source.parent / p)
        out.items.append(_item(p.as_posix(), path, v["where"], v["split"], tuple(v["segs"])))
    return out


def _item(vid: str, path: str, where: str, split: str | None, segs: tuple[Segment, ...]) -> InputItem:
    return InputItem(id=vid, path=path, label=None, split=split, where=where, segments=segs)


def _find_video(folder: Path, stems: tuple[str, ...], files: dict[str, Path]) -> Path | None:
    for stem in stems:
        if stem in files:
            return files[stem]
    return None


def _video_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such videos folder (pass --videos)")
    return {p.stem: p for p in sorted(folder.rglob("*")) if p.suffix.lower() in VIDEO_SUFFIXES}


def read_activitynet(source: Path, options: SourceOptions | None = None) -> Inputs:
    """ActivityNet / THUMOS-style JSON; each annotation's `where` is `file:database.ID.annotations[i]`."""
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
        database = data["database"]
        if not isinstance(database, dict):
            raise TypeError("database is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{source}: not an ActivityNet-style JSON with a 'database' object ({e})") from None
    folder = Path(options.videos) if options and options.videos else source.parent
    files = _video_files(folder)
    out = Inputs(items=[], labelled=True, kind="segments")
    unannotated = 0
    for vid, entry in database.items():
        where = f"{source.name}:database.{vid}"
        split = ACTIVITYNET_SUBSETS.get(str(entry.get("subset", "")).lower(), entry.get("subset"))
        annotations = entry.get("annotations")
        if not annotations and split == "test":
            unannotated += 1
            continue
        video = _find_video(folder, (vid, f"v_{vid}"), files)
        if video is None:
            out.rejects.append(
                Reject(where, str(folder / vid), "video not found", vid, "missing-file", split)
            )
            continue
        try:
            segs = tuple(
                Segment(
                    float(a["segment"][0]),
                    float(a["segment"][1]),
                    str(a["label"]),
                    f"{where}.annotations[{i}]",
                )
                for i, a in enumerate(annotations or [])
            )
        except (KeyError, IndexError, TypeError, ValueError) as e:
            out.rejects.append(
                Reject(where, str(video), f"unreadable annotation ({e!r})", vid, "bad-segment", split)
            )
            continue
        out.items.append(_item(vid, str(video), where, split, segs))
    if unannotated:
        out.notes.append(f"{unannotated} videos of the testing subset have no annotations: left out")
    return out


def _charades_classes(root: Path) -> dict[str, str]:
    path = find_file(root, CHARADES_CLASSES)
    if path is None:
        raise FormatError(f"{root}: no {CHARADES_CLASSES} (is this the Charades annotation folder?)")
    codes: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            code, _, name = line.strip().partition(" ")
            if not name:
                raise FormatError(f"{path}:{n}: expected 'cNNN Class name', got {line!r}")
            codes[code] = name.strip()
    return codes


def _charades_actions(text: str, codes: dict[str, str], where: str) -> tuple[Segment, ...]:
    segs = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        fields = part.split()
        if len(fields) != 3:
            raise ValueError(f"action {part!r} is not 'cNNN start end'")
        code, start, end = fields
        segs.append(Segment(_seconds(start, "start"), _seconds(end, "end"), codes.get(code, code), where))
    return tuple(segs)


def read_charades(root: Path, options: SourceOptions) -> Inputs:
    """The Charades annotation folder: multi-label by default, segments with `--labels segments`."""
    codes = _charades_classes(root)
    videos = Path(options.videos) if options.videos else (find_file(root, CHARADES_CLASSES) or root).parent
    if not options.videos and (videos / "Charades_v1_480").is_dir():
        videos = videos / "Charades_v1_480"
    files = _video_files(videos)
    kind = "segments" if options.labels == "segments" else "multi"
    out = Inputs(items=[], labelled=True, kind=kind, classes=list(codes.values()))
    per_split: dict[str, int] = defaultdict(int)
    for name, split in CHARADES_SPLITS.items():
        table = find_file(root, name)
        if table is None:
            continue
        with open(table, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.DictReader(f), start=2):
                where = f"{table.name}:{n}"
                vid = (row.get("id") or "").strip()
                video = _find_video(videos, (vid,), files)
                if video is None:
                    out.rejects.append(
                        Reject(where, str(videos / vid), "video not found", vid, "missing-file", split)
                    )
                    continue
                try:
                    segs = _charades_actions(row.get("actions") or "", codes, where)
                except ValueError as e:
                    out.rejects.append(Reject(where, str(video), str(e), vid, "bad-segment", split))
                    continue
                labels = tuple(dict.fromkeys(s.label for s in segs))
                item = InputItem(vid, str(video), labels[0] if labels else None, split, where, labels=labels)
                out.items.append(item if kind == "multi" else _item(vid, str(video), where, split, segs))
                per_split[split] += 1
    if not per_split:
        raise FormatError(f"{root}: no {' or '.join(CHARADES_SPLITS)} found")
    return out
