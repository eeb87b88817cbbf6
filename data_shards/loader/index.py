"""Random access to the samples of a split, through the shards' DALI index files.

Every backend sees the split as one flat, stable list of `SampleRef` (folders in the order given, shards in
name order, samples in tar order). A global shuffle per (seed, epoch) and an exact resume need random
access, which the `.idx` files (`format.dali_index_lines`) give: byte offset and size of each member.

What the sampling plan needs is read once, here, when the split is listed: the label (`.lbl.i64`) and the
frame count and size the build stored in the `.json` metadata -- the one definition of a video's frame
count every backend plans from. The build writes them once more per shard, in its listing
(`format.listing_name`): a shard is listed by two reads (index and listing) and a check that its tar is
there, however many samples it holds; a set built before listings existed is listed from the members (JSON
and 8 bytes at their offsets: one ranged GET per sample at a URL). Nothing is decoded or unpickled; any other
member (`.pyd`, `.pth`, ...) is ignored, never read, so a hostile shard cannot execute anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from data_shards import format as fmt
from data_shards import storage
from data_shards.loader.cache import RemoteSamples, SampleCache

log = logging.getLogger("data_shards.loader")

REBUILD_HINT = "rebuild the shards with `python -m data_shards build`"


@dataclass(frozen=True)
class SampleRef:
    """One sample: where its video member lives, and what the plan needs (stored frame count, size,
    label). `index` is its position in the loader's flat list; `ref` ("shard:key") names it uniquely."""

    index: int
    shard: str  # tar path
    key: str
    video_ext: str
    video_offset: int
    video_size: int
    frames: int
    height: int
    width: int
    label: int
    labels: tuple[int, ...] = ()  # the label set (multi-label), else (label,); () unlabelled
    segments: tuple[tuple[float, float, int], ...] = ()  # (start s, end s, class) in clip time
    fps: float = 0.0  # of the stored video (segments' frames); 0 when unknown
    audio_offset: int = 0  # the `.flac` member's byte range (size 0: the sample has no sound)
    audio_size: int = 0

    @property
    def ref(self) -> str:
        return f"{self.shard}:{self.key}"


@dataclass
class SplitListing:
    """A split over one or more shard folders: its samples, the (agreed) classes and the codecs seen."""

    refs: list[SampleRef]
    classes: list[str] | None
    codecs: set[str]
    folders: list[Path]
    kind: str = "single"  # the manifests' label kind (format.LABEL_KINDS)
    audio: dict[str, str] = field(default_factory=dict)  # folder -> how its build treated sound


def _members(tar_path: Path, line: str) -> tuple[str, dict[str, tuple[int, int]]]:
    parts = line.split()
    if len(parts) % 4:
        raise fmt.FormatError(f"{tar_path}: malformed index line {line!r}")
    members: dict[str, tuple[int, int]] = {}
    key = ""
    for i in range(0, len(parts), 4):
        ext, offset, size, name = parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3]
        key = name.rsplit("/", 1)[-1].split(".", 1)[0]
        members[ext] = (offset, size)
    return key, members


def _checked(data: bytes, size: int, tar_path: str, key: str) -> bytes:
    if len(data) != size:
        raise fmt.FormatError(f"{tar_path}: sample {key} runs past the end of the tar (truncated?)")
    return data


def _span(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """One [start, end) byte range covering two members (offset, size)."""
    return min(a[0], b[0]), max(a[0] + a[1], b[0] + b[1])


def _member_of(data: bytes, span: tuple[int, int], member: tuple[int, int], tar_path: str, key: str) -> bytes:
    """A member's bytes out of the read of `span`."""
    lo = member[0] - span[0]
    return _checked(data[lo : lo + member[1]], member[1], tar_path, key)


def _decoded(tar_path: str, key: str, meta_bytes: bytes) -> dict[str, Any]:
    try:
        return fmt.decode_meta(meta_bytes)
    except (ValueError, fmt.FormatError) as e:
        raise fmt.FormatError(f"{tar_path}: sample {key}: unreadable .json metadata ({e})") from None


def _stored(tar_path: str, key: str, meta: dict[str, Any]) -> dict[str, Any]:
    """A sample's metadata, checked for what the plan needs (frames, height, width); errors name shard, key
    and the fix."""
    missing = [k for k in ("frames", "height", "width") if not isinstance(meta.get(k), int) or meta[k] <= 0]
    if missing:
        raise fmt.FormatError(
            f"{tar_path}: sample {key}: metadata has no positive integer {', '.join(missing)} "
            f"(made by an older build?); {REBUILD_HINT}"
        )
    return meta


Stored = list[tuple[int, dict[str, Any]]]  # per sample of a shard, in tar order: (label, metadata)


def _from_members(tar_path: str, parsed: list[tuple[str, dict[str, tuple[int, int]], str]]) -> Stored:
    """Label and metadata of every sample in one batch of reads (concurrent ranged GETs for a URL): one range
    per sample, over both members (the writer puts them next to each other)."""
    spans = [_span(members[fmt.LABEL_EXT], members[fmt.META_EXT]) for _, members, _ in parsed]
    try:
        small = storage.read_ranges(tar_path, spans)
    except FileNotFoundError:
        raise fmt.FormatError(f"{tar_path}: listed in the manifest but missing") from None
    out = []
    for (key, members, _), data, span in zip(parsed, small, spans):
        label = fmt.decode_label(_member_of(data, span, members[fmt.LABEL_EXT], tar_path, key))
        meta = _decoded(tar_path, key, _member_of(data, span, members[fmt.META_EXT], tar_path, key))
        out.append((label, meta))
    return out


def _from_listing(
    tar_path: str, listing: str, rows: list[tuple[str, int, dict[str, Any]]], keys: list[str]
) -> Stored:
    """Label and metadata of every sample from the shard's listing, which must name the index's samples in
    its order (anything else is a listing from another build of the shard)."""
    if [key for key, _, _ in rows] != keys:
        raise fmt.FormatError(
            f"{listing}: does not list the samples of {tar_path} ({len(rows)} entries, the index has "
            f"{len(keys)}); {fmt.LISTING_FIX}"
        )
    return [(label, meta) for _, label, meta in rows]


def _parse_index(
    tar_path: str, lines: list[str], first: int, listing: tuple[str, bytes] | None = None
) -> list[SampleRef]:
    """The shard's index lines -> its samples; label and metadata from `listing` (path, bytes) if given, else
    read from the tar's members."""
    header = lines[0].split()
    if not header or header[0] != "v1.2":
        raise fmt.FormatError(f"{tar_path}: index is not DALI wds2idx v1.2 (header {lines[0]!r})")
    parsed: list[tuple[str, dict[str, tuple[int, int]], str]] = []
    ignored: set[str] = set()
    for line in lines[1:]:
        if not line.split():
            continue
        key, members = _members(tar_path, line)
        videos = [e for e in fmt.VIDEO_EXTS if e in members]
        if len(videos) != 1:
            raise fmt.FormatError(
                f"{tar_path}: sample {key!r} has {len(videos)} video members "
                f"({'/'.join(fmt.VIDEO_EXTS)}), members {sorted(members)}"
            )
        if fmt.LABEL_EXT not in members or members[fmt.LABEL_EXT][1] != 8:
            raise fmt.FormatError(f"{tar_path}: sample {key!r} has no 8-byte .{fmt.LABEL_EXT} member")
        if fmt.META_EXT not in members:
            raise fmt.FormatError(f"{tar_path}: sample {key!r} has no .{fmt.META_EXT} member; {REBUILD_HINT}")
        ignored |= set(members) - set(fmt.MEMBER_EXTS)
        parsed.append((key, members, videos[0]))
    if listing is None:
        stored = _from_members(tar_path, parsed)
    else:
        rows = fmt.parse_listing(listing[1], listing[0])
        stored = _from_listing(tar_path, listing[0], rows, [key for key, _, _ in parsed])
    refs: list[SampleRef] = []
    for i, (key, members, video) in enumerate(parsed):
        label, meta = stored[i][0], _stored(tar_path, key, stored[i][1])
        try:
            labels, segments = fmt.labels_of(label, meta), fmt.segments_of(meta)
        except fmt.FormatError as e:
            raise fmt.FormatError(f"{tar_path}: sample {key}: {e}") from None
        v_off, v_size = members[video]
        a_off, a_size = members.get(fmt.AUDIO_EXT, (0, 0))
        refs.append(
            SampleRef(
                first + i,
                tar_path,
                key,
                video,
                v_off,
                v_size,
                meta["frames"],
                meta["height"],
                meta["width"],
                label,
                labels,
                segments,
                float(meta.get("fps") or 0.0),
                a_off,
                a_size,
            )
        )
    if ignored:
        log.warning("%s: ignoring unknown members %s (never read)", tar_path, sorted(ignored))
    return refs


def list_samples(
    shards: str | os.PathLike, split: str, cache: SampleCache | None = None
) -> tuple[list[SampleRef], fmt.Manifest]:
    """All samples of `split` in one shard folder, in a stable order; errors name the shard. `cache`: shards
    at a URL are listed once per cache (their listing kept beside the sample bytes)."""
    folder = storage.join(shards)
    manifest = fmt.load_manifest(folder)
    infos = sorted(manifest.shards_for(fmt.check_split(split)), key=lambda s: s.path)
    if not infos:
        have = sorted(manifest.splits)
        raise fmt.FormatError(f"{folder}: no shards for split {split!r} (manifest has {have})")
    if storage.is_url(folder) and len(infos) > 1:  # the shards' reads overlap (each is a few round trips)
        with ThreadPoolExecutor(min(8, len(infos)), thread_name_prefix="tubelet-list") as pool:
            parts = list(pool.map(lambda info: _listed(folder, info, cache), infos))
    else:
        parts = [_listed(folder, info, cache) for info in infos]
    refs: list[SampleRef] = []
    for info, part in zip(infos, parts):
        if info.samples and len(part) != info.samples:
            tar = storage.join(folder, info.path)
            raise fmt.FormatError(f"{tar}: index lists {len(part)} samples, manifest says {info.samples}")
        base = len(refs)
        refs.extend(replace(r, index=base + j) for j, r in enumerate(part))
    return refs, manifest


def _listed(folder: storage.Location, info: fmt.ShardInfo, cache: SampleCache | None) -> list[SampleRef]:
    """One shard's samples (numbered from 0): from its `.idx` and listing file (member reads for a set without
    one), or, for a shard at a URL with a local cache, from the cache's copy of an earlier listing of the same
    shard (same sha256)."""
    tar = storage.join(folder, info.path)
    key = f"listing:{tar}:{info.sha256}"
    cache = cache if info.sha256 and storage.is_url(tar) else None  # a listing is kept only for a known shard
    if cache is not None and (got := cache.get(key)) is not None:
        return [_ref_from_json(r) for r in json.loads(got)]
    idx = storage.join(folder, info.index or fmt.index_name(info.path))
    try:
        lines = storage.read_text(idx).splitlines()
    except FileNotFoundError:  # no index beside the tar: computed from the tar's member headers
        if not storage.isfile(tar):
            raise fmt.FormatError(f"{tar}: listed in the manifest but missing") from None
        lines = fmt.dali_index_lines(tar)
    part = _parse_index(os.fspath(tar), lines, 0, _listing(folder, info))
    if cache is not None:
        cache.put(key, json.dumps([asdict(r) for r in part]).encode())
    return part


def _listing(folder: storage.Location, info: fmt.ShardInfo) -> tuple[str, bytes] | None:
    """(path, bytes) of the shard's listing; None for a set built before listings (or one whose listing is
    gone: the members say the same, one read per sample)."""
    if not info.listing:
        return None
    tar = storage.join(folder, info.path)
    if not storage.isfile(tar):  # nothing else reads the tar before the first batch: say it now
        raise fmt.FormatError(f"{tar}: listed in the manifest but missing")
    path = storage.join(folder, info.listing)
    try:
        return os.fspath(path), storage.read_bytes(path)
    except FileNotFoundError:
        log.warning("%s: missing (the manifest names it); reading each sample's members instead", path)
        return None


def _ref_from_json(data: dict[str, Any]) -> SampleRef:
    return SampleRef(
        **{
            **data,
            "labels": tuple(data["labels"]),
            "segments": tuple((float(a), float(b), int(c)) for a, b, c in data["segments"]),
        }
    )


def as_folders(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[storage.Location]:
    """One folder or several (a list/tuple): local paths as `Path`, URLs as strings."""
    if isinstance(shards, (str, os.PathLike)):
        return [storage.join(shards)]
    folders = [storage.join(s) for s in shards]
    if not folders:
        raise ValueError("shards: give at least one shard folder")
    return folders


def list_split(
    shards: str | os.PathLike | Sequence[str | os.PathLike], split: str, cache: SampleCache | None = None
) -> SplitListing:
    """`split` over one or several shard folders, concatenated in the order given. Their manifests must
    agree on `classes` (the same label must mean the same class everywhere)."""
    folders = as_folders(shards)
    refs: list[SampleRef] = []
    classes: list[str] | None = None
    kind = "single"
    codecs: set[str] = set()
    audio: dict[str, str] = {}
    for n, folder in enumerate(folders):
        part, manifest = list_samples(folder, split, cache)
        if n and manifest.classes != classes:
            raise fmt.FormatError(
                f"shard folders disagree on classes: {folders[0]} has {classes}, {folder} has "
                f"{manifest.classes}; build them with the same --classes"
            )
        if n and manifest.labels != kind:
            raise fmt.FormatError(
                f"shard folders disagree on their labels: {folders[0]} has {kind}, {folder} {manifest.labels}"
            )
        classes, kind = manifest.classes, manifest.labels
        audio[str(folder)] = manifest.audio
        codecs |= manifest.codecs_for(split)
        base = len(refs)
        refs.extend(replace(r, index=base + r.index) for r in part)
    return SplitListing(refs, classes, codecs, folders, kind, audio)


def select_samples(
    refs: list[SampleRef], keys: Collection[str] | None = None, labels: Collection[int] | None = None
) -> list[SampleRef]:
    """The subset with these keys (plain `key`, or `shard:key` where a key occurs in several folders)
    and/or these labels, in the split's stable order, renumbered 0..n-1. Unknown keys are an error."""
    chosen = refs
    if keys is not None:
        wanted = set(keys)
        by_key: dict[str, int] = {}
        for r in refs:
            by_key[r.key] = by_key.get(r.key, 0) + 1
        ambiguous = sorted(k for k in wanted if by_key.get(k, 0) > 1)
        if ambiguous:
            raise ValueError(
                f"keys {ambiguous[:5]} occur in several shard folders: select them as 'shard:key'"
            )
        known = set(by_key) | {r.ref for r in refs}
        unknown = sorted(wanted - known)
        if unknown:
            raise ValueError(f"{len(unknown)} selected keys are not in this split, e.g. {unknown[:5]}")
        chosen = [r for r in chosen if r.key in wanted or r.ref in wanted]
    if labels is not None:
        wanted_labels = {int(x) for x in labels}
        chosen = [r for r in chosen if r.label in wanted_labels]
    if not chosen:
        raise ValueError(f"no sample matches the selection (keys={keys is not None}, labels={labels})")
    return [replace(r, index=i) for i, r in enumerate(chosen)]


def samples_digest(refs: list[SampleRef]) -> str:
    """Fingerprint of the sample sequence (keys in order): a resume over other samples is refused."""
    h = hashlib.sha256()
    for r in refs:
        h.update(r.key.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


class ShardReader:
    """Reads of video members by their `.idx` byte range: an mmap of a local tar (reopened per process: safe
    after fork); for a shard at a URL a ranged GET (retried on transient errors), prefetched per batch and
    optionally cached on local disk (`RemoteSamples`)."""

    def __init__(self, cache: SampleCache | None = None) -> None:
        self._pid = os.getpid()
        self._maps: dict[str, mmap.mmap] = {}
        self.remote = RemoteSamples(cache)

    def _map(self, shard: str) -> mmap.mmap:
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        m = self._maps.get(shard)
        if m is None:
            with open(shard, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[shard] = m
        return m

    def prefetch(self, refs: Sequence[SampleRef], audio: bool = False) -> None:
        """Start reading these samples' bytes (those at URLs; local ones are mapped, nothing to start);
        `audio`: their sound members too."""
        remote = [r for r in refs if storage.is_url(r.shard)]
        items = [(r.shard, r.video_offset, r.video_size) for r in remote]
        items += [(r.shard, r.audio_offset, r.audio_size) for r in remote if audio and r.audio_size]
        if items:
            self.remote.prefetch(items)

    def video_bytes(self, ref: SampleRef) -> bytes:
        return self._member(ref, ref.video_offset, ref.video_size)

    def audio_bytes(self, ref: SampleRef) -> bytes:
        """The sample's `.flac` member; ValueError when the build stored no sound for it."""
        if not ref.audio_size:
            raise ValueError("the sample has no sound (.flac member): it was stored without audio")
        return self._member(ref, ref.audio_offset, ref.audio_size)

    def _member(self, ref: SampleRef, offset: int, size: int) -> bytes:
        if storage.is_url(ref.shard):
            return _checked(self.remote.read(ref.shard, offset, size), size, ref.shard, ref.key)
        m = self._map(ref.shard)
        if offset + size > len(m):
            raise fmt.FormatError(f"{ref.shard}: sample {ref.key} runs past the end of the tar (truncated?)")
        return m[offset : offset + size]

    def __getstate__(self) -> dict:
        return {"_pid": -1, "_maps": {}, "remote": self.remote}
