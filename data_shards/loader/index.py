"""Random access to the samples of one split, through the shards' DALI index files.

Every backend sees the split as one flat, stable list of `SampleRef` (shards in name order, samples in
tar order). A global shuffle per (seed, epoch) and an exact resume need random access, which the `.idx`
files (`format.dali_index_lines`) give: byte offset and size of each member. Only the video member and
the 8-byte label are ever read; any other member (`.pyd`, `.pth`, ...) is ignored, never decoded, so a
hostile shard cannot execute anything.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_shards import format as fmt

log = logging.getLogger("data_shards.loader")


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's members live; `index` is its position in the split's flat list."""

    index: int
    shard: str  # tar path
    key: str
    video_ext: str
    video_offset: int
    video_size: int
    label_offset: int


def _parse_index(tar_path: Path, lines: list[str], first: int) -> list[SampleRef]:
    header = lines[0].split()
    if not header or header[0] != "v1.2":
        raise fmt.FormatError(f"{tar_path}: index is not DALI wds2idx v1.2 (header {lines[0]!r})")
    refs: list[SampleRef] = []
    ignored: set[str] = set()
    for line in lines[1:]:
        parts = line.split()
        if not parts:
            continue
        if len(parts) % 4:
            raise fmt.FormatError(f"{tar_path}: malformed index line {line!r}")
        members: dict[str, tuple[int, int]] = {}
        key = ""
        for i in range(0, len(parts), 4):
            ext, offset, size, name = parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3]
            key = name.rsplit("/", 1)[-1].split(".", 1)[0]
            members[ext] = (offset, size)
        videos = [e for e in fmt.VIDEO_EXTS if e in members]
        if len(videos) != 1:
            raise fmt.FormatError(
                f"{tar_path}: sample {key!r} has {len(videos)} video members "
                f"({'/'.join(fmt.VIDEO_EXTS)}), members {sorted(members)}"
            )
        if fmt.LABEL_EXT not in members or members[fmt.LABEL_EXT][1] != 8:
            raise fmt.FormatError(f"{tar_path}: sample {key!r} has no 8-byte .{fmt.LABEL_EXT} member")
        ignored |= set(members) - set(fmt.MEMBER_EXTS)
        v_off, v_size = members[videos[0]]
        refs.append(
            SampleRef(
                first + len(refs), str(tar_path), key, videos[0], v_off, v_size, members[fmt.LABEL_EXT][0]
            )
        )
    if ignored:
        log.warning("%s: ignoring unknown members %s (never decoded)", tar_path, sorted(ignored))
    return refs


def list_samples(shards: str | os.PathLike, split: str) -> tuple[list[SampleRef], fmt.Manifest]:
    """All samples of `split`, in a stable order; errors name the shard."""
    folder = Path(shards)
    manifest = fmt.load_manifest(folder)
    infos = sorted(manifest.shards_for(fmt.check_split(split)), key=lambda s: s.path)
    if not infos:
        have = sorted(manifest.splits)
        raise fmt.FormatError(f"{folder}: no shards for split {split!r} (manifest has {have})")
    refs: list[SampleRef] = []
    for info in infos:
        tar = folder / info.path
        if not tar.is_file():
            raise fmt.FormatError(f"{tar}: listed in the manifest but missing")
        idx = folder / (info.index or fmt.index_name(info.path))
        lines = idx.read_text().splitlines() if idx.is_file() else fmt.dali_index_lines(tar)
        part = _parse_index(tar, lines, len(refs))
        if info.samples and len(part) != info.samples:
            raise fmt.FormatError(f"{tar}: index lists {len(part)} samples, manifest says {info.samples}")
        refs.extend(part)
    return refs, manifest


class ShardReader:
    """mmap-backed member reads; safe to use after fork (maps are reopened per process)."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._maps: dict[str, mmap.mmap] = {}

    def _map(self, shard: str) -> mmap.mmap:
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        m = self._maps.get(shard)
        if m is None:
            with open(shard, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[shard] = m
        return m

    def video_bytes(self, ref: SampleRef) -> bytes:
        m = self._map(ref.shard)
        if ref.video_offset + ref.video_size > len(m):
            raise fmt.FormatError(f"{ref.shard}: sample {ref.key} runs past the end of the tar (truncated?)")
        return m[ref.video_offset : ref.video_offset + ref.video_size]

    def video_array(self, ref: SampleRef) -> np.ndarray:
        return np.frombuffer(self.video_bytes(ref), dtype=np.uint8)

    def label(self, ref: SampleRef) -> int:
        m = self._map(ref.shard)
        return fmt.decode_label(m[ref.label_offset : ref.label_offset + 8])

    def __getstate__(self) -> dict:
        return {"_pid": -1, "_maps": {}}
