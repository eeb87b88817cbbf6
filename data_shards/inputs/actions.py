"""UCF101 and HMDB51: class folders of .avi files plus the official split lists.

UCF101: `UCF-101/{Class}/v_{Class}_gNN_cNN.avi`, `ucfTrainTestlist/classInd.txt` ("1 ApplyEyeMakeup"),
`trainlist0N.txt` ("Class/v_....avi 1") and `testlist0N.txt` ("Class/v_....avi") for split N. Class order:
classInd. A hash val split (`--val-fraction`) hashes the actor group (`Class/gNN`), so one actor's clips
never straddle train and val (VideoMAE-style UCF101 leakage).
HMDB51: `{class}/*.avi`, `testTrainMulti_7030_splits/{class}_test_split{N}.txt` with "name.avi 0|1|2"
(0 = not used in this split, 1 = train, 2 = test). Class order: sorted names.
Videos are looked up as (class folder, file name) under `--videos` (default: the data set's root).
"""

from __future__ import annotations

import re
from pathlib import Path

from data_shards.format import FormatError
from data_shards.inputs import InputItem, Inputs, Reject, SourceOptions
from data_shards.inputs.detect import find_dir
from data_shards.inputs.folders import by_class_and_name

_GROUP = re.compile(r"_g(\d+)_c\d+", re.IGNORECASE)


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if line.strip():
            out.append((n, line.split()))
    return out


def _root(source: Path, marker: str, name: str) -> Path:
    found = find_dir(source, marker) if source.is_dir() else None
    if found is None:
        raise FormatError(f"{source}: no {marker}/ folder ({name} layout); pass the folder that holds it")
    return found


def _ucf_item(
    rel: str, where: str, split: str, classes: dict[str, str], videos: dict, root: Path
) -> InputItem | Reject:
    parts = rel.replace("\\", "/").split("/")
    if len(parts) != 2:
        return Reject(where, "", f"expected Class/file.avi, got {rel!r}", rel, "bad-row", split)
    cls = classes.get(parts[0].lower())
    if cls is None:
        return Reject(
            where, "", f"unknown class {parts[0]!r} (not in classInd.txt)", rel, "unknown-label", split
        )
    path = videos.get((parts[0].lower(), parts[1]))
    if path is None:
        return Reject(where, "", f"missing file: no {rel} under {root}", rel, "missing-file", split)
    g = _GROUP.search(parts[1])
    return InputItem(rel, str(path), cls, split, where, group=f"{cls}/g{g[1]}" if g else rel)


def read_ucf101(source: Path, options: SourceOptions) -> Inputs:
    """UCF101 split `options.split_id` from its own lists; classes in classInd order."""
    lists = _root(source, "ucfTrainTestlist", "UCF101")
    root = Path(options.videos) if options.videos else lists.parent
    ind = sorted((int(n), c) for _, (n, c, *_) in _lines(lists / "classInd.txt"))
    classes = [c for _, c in ind]
    by_lower = {c.lower(): c for c in classes}
    videos = by_class_and_name(root)
    out = Inputs(items=[], labelled=True, classes=classes)
    for name, split in (
        (f"trainlist0{options.split_id}.txt", "train"),
        (f"testlist0{options.split_id}.txt", "test"),
    ):
        if not (lists / name).is_file():
            raise FormatError(f"{lists / name}: missing (UCF101 split {options.split_id})")
        for n, fields in _lines(lists / name):
            got = _ucf_item(fields[0], f"{name}:{n}", split, by_lower, videos, root)
            if isinstance(got, Reject):
                out.rejects.append(got)
            else:
                out.items.append(got)
    return out


def _hmdb_file(path: Path, cls: str, videos: dict, root: Path, out: Inputs) -> int:
    """Items of one `{class}_test_splitN.txt`; returns how many its split leaves unused (0)."""
    unused = 0
    for n, fields in _lines(path):
        where = f"{path.name}:{n}"
        name, use = fields[0], fields[1] if len(fields) > 1 else ""
        split = {"1": "train", "2": "test"}.get(use)
        if use == "0":
            unused += 1
            continue
        if split is None:
            out.rejects.append(
                Reject(where, "", f"expected 'name.avi 0|1|2', got {' '.join(fields)!r}", name, "bad-row")
            )
            continue
        vid = f"{cls}/{name}"
        found = videos.get((cls.lower(), name))
        if found is None:
            out.rejects.append(
                Reject(where, "", f"missing file: no {vid} under {root}", vid, "missing-file", split)
            )
            continue
        out.items.append(InputItem(vid, str(found), cls, split, where))
    return unused


def read_hmdb51(source: Path, options: SourceOptions) -> Inputs:
    """HMDB51 split `options.split_id` from the per-class split files; classes sorted."""
    lists = _root(source, "testTrainMulti_7030_splits", "HMDB51")
    root = Path(options.videos) if options.videos else lists.parent
    suffix = f"_test_split{options.split_id}.txt"
    files = sorted(p for p in lists.iterdir() if p.name.endswith(suffix))
    if not files:
        raise FormatError(f"{lists}: no *{suffix} files (HMDB51 split {options.split_id})")
    classes = sorted(p.name[: -len(suffix)] for p in files)
    videos = by_class_and_name(root)
    out = Inputs(items=[], labelled=True, classes=classes)
    unused = sum(_hmdb_file(p, p.name[: -len(suffix)], videos, root, out) for p in files)
    if unused:
        out.notes.append(f"HMDB51 split {options.split_id}: {unused} videos marked 0 (not used) left out")
    return out
