"""Folders: class sub-folders (Kinetics/ImageFolder layout, labelled) or a flat folder (unlabelled)."""

from __future__ import annotations

from pathlib import Path

from data_shards.inputs import VIDEO_SUFFIXES, WORK_DIR, InputItem, Inputs, Reject


def video_files(root: Path) -> list[Path]:
    """Every video file under `root` (by suffix), sorted, the build's own cache left out."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES and WORK_DIR not in p.parts
    )


def read_folder(root: Path) -> Inputs:
    """Class sub-folders when any video sits in one (then a loose video is a reject), else a flat folder."""
    files = video_files(root)
    class_layout = any(p.relative_to(root).parts[:-1] for p in files)
    out = Inputs(items=[], labelled=class_layout)
    for p in files:
        parts = p.relative_to(root).parts
        rel = "/".join(parts)
        if class_layout and len(parts) == 1:
            out.rejects.append(Reject(rel, str(p), "missing label: file is not inside a class folder", rel))
            continue
        label = parts[0] if class_layout else None
        out.items.append(InputItem(id=rel, path=str(p), label=label, split=None, where=rel))
    return out


def by_stem(root: Path) -> dict[str, Path]:
    """Video files under `root` by file stem (a data set's ids), the first in sorted order winning."""
    found: dict[str, Path] = {}
    for p in video_files(root):
        found.setdefault(p.stem, p)
    return found


def by_class_and_name(root: Path) -> dict[tuple[str, str], Path]:
    """Video files under `root` by (their folder's name, lower-cased; file name): `Class/file.avi` lists."""
    found: dict[tuple[str, str], Path] = {}
    for p in video_files(root):
        found.setdefault((p.parent.name.lower(), p.name), p)
    return found
