"""The shard format: the one place that knows member names, the manifest schema and the index files.

A shard set is a folder::

    manifest.json               classes, options, per-shard and per-split counts, checksums
    rejects.jsonl               one line per input that did not make it into a shard
    {split}-{NNNNNN}.tar        WebDataset tar: members {key}.{mp4|webm|mkv}, {key}.lbl.i64, {key}.json
                                and, built with --audio keep|optional, {key}.flac (`data_shards/audio.py`)
    {split}-{NNNNNN}.idx        DALI `wds2idx` index of that tar (v1.2)
    {split}-{NNNNNN}.listing.jsonl  per sample, in tar order: key, label and `.json` metadata (what a loader
                                plans from: one read per shard instead of one per sample; sets built before
                                it have none, and loaders read the members instead)

What a sample's labels are is the manifest's `labels` (format version 2; version 1 sets read as `single`):
  single    one class per clip: `.lbl.i64`
  multi     a set of classes per clip: `.json` "labels" (class indices, sorted; `.lbl.i64` holds the first)
  segments  labelled time segments: `.json` "segments" [[start_s, end_s, class], ...] in clip time; class 0 is
            `background` (no segment), `.lbl.i64` the class covering most of the clip

Keys are derived from the video id (its path relative to the input root), never the path itself,
so member names carry no user paths and contain exactly one dot-free stem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tarfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from data_shards import storage

FORMAT_NAME = "tubelet-shards"
FORMAT_VERSION = 3
# version 1: no `labels` kind in the manifest, no label sets or segments; version 2: no audio members
READABLE_VERSIONS = (1, 2, 3)
LABEL_KINDS = ("single", "multi", "segments")
BACKGROUND = "background"  # class 0 of a segments set: the time no segment covers
SEGMENT_SLACK_S = 1.0  # a segment may end this far past the video's last frame (annotation rounding)

MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
LISTING_SUFFIX = ".listing.jsonl"

# Container extension of the video member. DALI's webdataset reader takes them as one ';' set.
VIDEO_EXTS: tuple[str, ...] = ("mp4", "webm", "mkv")
LABEL_EXT = "lbl.i64"  # 8 bytes, little-endian int64: DALI batches it without ragged-string trouble
META_EXT = "json"
AUDIO_EXT = "flac"  # mono FLAC whose first sample is at the video's first frame (data_shards/audio.py)
MEMBER_EXTS: tuple[str, ...] = (*VIDEO_EXTS, LABEL_EXT, META_EXT, AUDIO_EXT)

UNLABELED = -1
_SPLIT_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SHARD_RE = re.compile(r"^(?P<split>[a-z][a-z0-9_]*)-(?P<num>\d{6})\.tar$")

# Codecs DALI decodes with device="cpu" (everything else needs NVDEC or the PyAV backend).
DALI_CPU_CODECS: frozenset[str] = frozenset({"vp9", "mjpeg"})
# Codecs NVDEC decodes with device="mixed".
DALI_GPU_CODECS: frozenset[str] = frozenset({"h264", "hevc", "vp9", "av1", "mjpeg", "vp8", "mpeg4"})


class FormatError(ValueError):
    """A shard set, shard, member or manifest field is not what the format says."""


# ---------------------------------------------------------------------------------------------- names


SPLITS: tuple[str, ...] = ("train", "val", "test")  # what the stages read (data.train_split, val_split, ...)
SPLIT_ALIASES: dict[str, str] = {
    "training": "train",
    "validation": "val",
    "valid": "val",
    "validate": "val",
    "dev": "val",
    "testing": "test",
}


def canonical_split(name: str) -> str:
    """A source's split name as train / val / test: any case, common aliases (`validation`, `dev`, ...).
    Anything else raises, naming the accepted names: it would become a split no stage reads."""
    key = name.strip().lower()
    if key in SPLITS or key in SPLIT_ALIASES:
        return SPLIT_ALIASES.get(key, key)
    aliases = ", ".join(f"{a}→{c}" for a, c in SPLIT_ALIASES.items())
    raise FormatError(f"unknown split {name!r}: accepted {', '.join(SPLITS)} (any case) or {aliases}")


def check_split(split: str) -> str:
    if not _SPLIT_RE.match(split):
        raise FormatError(f"split name {split!r} must match {_SPLIT_RE.pattern} (e.g. train, val, test)")
    return split


def shard_name(split: str, number: int) -> str:
    return f"{check_split(split)}-{number:06d}.tar"


def index_name(tar_name: str) -> str:
    """`train-000003.tar` -> `train-000003.idx` (what DALI's `index_paths` expects beside the tar)."""
    if not tar_name.endswith(".tar"):
        raise FormatError(f"shard {tar_name!r} does not end in .tar")
    return tar_name[: -len(".tar")] + ".idx"


def listing_name(tar_name: str) -> str:
    """`train-000003.tar` -> `train-000003.listing.jsonl`."""
    return index_name(tar_name)[: -len(".idx")] + LISTING_SUFFIX


def shard_of(file_name: str) -> str | None:
    """The shard a file of a shard folder belongs to (its tar, index or listing) -> the tar's name; None for
    anything else (manifest, rejects, ...)."""
    for suffix in (".idx", LISTING_SUFFIX):
        if file_name.endswith(suffix):
            file_name = file_name[: -len(suffix)] + ".tar"
    return file_name if _SHARD_RE.match(file_name) else None


def parse_shard_name(name: str) -> tuple[str, int]:
    m = _SHARD_RE.match(os.path.basename(name))
    if not m:
        raise FormatError(f"{name!r} is not a shard name of the form split-NNNNNN.tar")
    return m["split"], int(m["num"])


def sample_key(video_id: str) -> str:
    """Stable, path-free member stem for a video id (hex of its sha256; no dots, no separators)."""
    return "v" + hashlib.sha256(video_id.encode("utf-8")).hexdigest()[:24]


def video_ext_for(container: str) -> str:
    """Member extension for an FFmpeg container name (`mov,mp4,m4a,...`, `matroska,webm`)."""
    names = container.lower().split(",")
    if "mp4" in names or "mov" in names:
        return "mp4"
    if "webm" in names:
        return "webm"
    if "matroska" in names:
        return "mkv"
    raise FormatError(f"container {container!r} cannot be stored as-is")


# --------------------------------------------------------------------------------------------- members


def encode_label(label: int) -> bytes:
    return struct.pack("<q", int(label))


def decode_label(data: bytes) -> int:
    if len(data) != 8:
        raise FormatError(f"label member must be 8 bytes (little-endian int64), got {len(data)}")
    return struct.unpack("<q", data)[0]


def labels_of(label: int, meta: dict[str, Any]) -> tuple[int, ...]:
    """A sample's label set: the `.json` "labels" of a multi-label sample, else its one label (none when
    unlabelled); version 1 samples have no "labels"."""
    got = meta.get("labels")
    if got is None:
        return () if label == UNLABELED else (int(label),)
    if not isinstance(got, list) or not all(isinstance(x, int) and x >= 0 for x in got):
        raise FormatError(f"metadata field labels must be a list of class indices, got {got!r}")
    return tuple(got)


def segments_of(meta: dict[str, Any]) -> tuple[tuple[float, float, int], ...]:
    """A sample's labelled segments (start, end in clip seconds, class), or () when it has none."""
    got = meta.get("segments") or []
    try:
        out = tuple((float(s), float(e), int(c)) for s, e, c in got)
    except (TypeError, ValueError):
        raise FormatError(
            f"metadata field segments must be [[start, end, class], ...], got {got!r}"
        ) from None
    return out


def encode_meta(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_meta(data: bytes) -> dict[str, Any]:
    meta = json.loads(data.decode("utf-8"))
    if not isinstance(meta, dict):
        raise FormatError("metadata member is not a JSON object")
    return meta


@dataclass(frozen=True)
class Sample:
    """One decoded-from-tar sample (bytes untouched)."""

    key: str
    video: bytes
    video_ext: str
    label: int
    meta: dict[str, Any]
    audio: bytes | None = None  # the `.flac` member, when the build kept the sound


def sample_members(sample: Sample) -> dict[str, bytes]:
    """Member extension -> bytes, as written into the tar (webdataset's TarWriter sorts them)."""
    if sample.video_ext not in VIDEO_EXTS:
        raise FormatError(f"{sample.key}: video extension {sample.video_ext!r} not in {VIDEO_EXTS}")
    members = {
        sample.video_ext: sample.video,
        LABEL_EXT: encode_label(sample.label),
        META_EXT: encode_meta(sample.meta),
    }
    if sample.audio is not None:
        members[AUDIO_EXT] = sample.audio
    return members


def sample_from_members(key: str, members: dict[str, bytes], where: str = "") -> Sample:
    """Inverse of `sample_members`; `where` (shard path) goes into the error message."""
    prefix = f"{where}: {key}" if where else key
    exts = [e for e in VIDEO_EXTS if e in members]
    if len(exts) != 1:
        raise FormatError(
            f"{prefix}: expected exactly one video member ({'/'.join(VIDEO_EXTS)}), got {sorted(members)}"
        )
    for needed in (LABEL_EXT, META_EXT):
        if needed not in members:
            raise FormatError(f"{prefix}: missing member .{needed}")
    unknown = set(members) - set(MEMBER_EXTS)
    if unknown:
        raise FormatError(f"{prefix}: unknown members {sorted(unknown)}")
    return Sample(
        key=key,
        video=members[exts[0]],
        video_ext=exts[0],
        label=decode_label(members[LABEL_EXT]),
        meta=decode_meta(members[META_EXT]),
        audio=members.get(AUDIO_EXT),
    )


# ---------------------------------------------------------------------------------------------- tars


def iter_tar_samples(tar_path: str | os.PathLike) -> Any:
    """Yield `Sample`s from a shard with the standard library only (never unpickles anything).

    Members must be regular files grouped by key, as our writer makes them.
    """
    tar_path = os.fspath(tar_path)
    with storage.open_read(tar_path) as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
        key: str | None = None
        members: dict[str, bytes] = {}
        for info in tf:
            if not info.isfile():
                raise FormatError(f"{tar_path}: member {info.name!r} is not a regular file")
            stem, _, ext = info.name.partition(".")
            if "/" in info.name or not ext:
                raise FormatError(f"{tar_path}: member name {info.name!r} is not key.ext")
            if stem != key:
                if key is not None:
                    yield sample_from_members(key, members, tar_path)
                key, members = stem, {}
            if ext in members:
                raise FormatError(f"{tar_path}: duplicate member {info.name!r}")
            f = tf.extractfile(info)
            assert f is not None
            members[ext] = f.read()
        if key is not None:
            yield sample_from_members(key, members, tar_path)


def dali_index_lines(tar_path: str | os.PathLike) -> list[str]:
    """The lines of DALI's `wds2idx` index (format v1.2) for a tar, computed from member offsets.

    Identical to what `wds2idx TAR IDX` writes: `v1.2 N`, then per sample `ext offset size name ...`.
    """
    samples: list[list[str]] = []
    last_stem: str | None = None
    with storage.open_read(tar_path) as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
        for info in tf:
            if not info.isfile():
                continue
            base = info.name[info.name.rfind("/") + 1 :]
            dot = base.find(".")
            stem = info.name[: info.name.rfind("/") + 1 + dot] if dot >= 0 else info.name
            ext = base[dot + 1 :] if dot >= 0 else ""
            if not stem or stem.endswith("/"):
                continue
            component = f"{ext} {info.offset_data} {info.size} {info.name}"
            if stem != last_stem:
                samples.append([component])
                last_stem = stem
            else:
                samples[-1].append(component)
    if not samples:
        raise FormatError(f"{tar_path}: empty shard")
    return [f"v1.2 {len(samples)}", *(" ".join(s) for s in samples)]


def write_dali_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike) -> int:
    """Write the DALI index for `tar_path` atomically; returns the sample count."""
    lines = dali_index_lines(tar_path)
    atomic_write_bytes(idx_path, ("\n".join(lines) + "\n").encode("utf-8"))
    return len(lines) - 1


# a listing that disagrees with its tar: the build keeps a shard whose listing exists, so remove it first
LISTING_FIX = "delete it and re-run the build command: it writes the listing again from the tar"


def listing_line(key: str, label: int, meta: dict[str, Any]) -> str:
    """One sample's line of a shard's listing: what its `.lbl.i64` and `.json` members hold. ASCII (JSON
    escapes), so no character of an id or class name (U+2028, ...) is a line break to any reader."""
    row = {"key": key, "label": int(label), "meta": meta}
    return json.dumps(row, sort_keys=True, ensure_ascii=True, separators=(",", ":"))


def encode_listing(samples: Iterable[tuple[str, int, dict[str, Any]]]) -> bytes:
    """A shard's listing file: one `listing_line` per (key, label, metadata), in tar order."""
    return "".join(listing_line(*s) + "\n" for s in samples).encode("utf-8")


def parse_listing(data: bytes, where: str) -> list[tuple[str, int, dict[str, Any]]]:
    """A listing's bytes -> (key, label, metadata) per sample, in tar order (lines split at newlines only);
    errors name `where` and the line."""
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise FormatError(f"{where}: not a listing (not UTF-8 text: {e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, label, meta = row["key"], row["label"], row["meta"]
            if not (isinstance(key, str) and isinstance(label, int) and isinstance(meta, dict)):
                raise TypeError("key must be a string, label an integer, meta an object")
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{where}: line {n} is not a listing entry ({e})") from None
        out.append((key, label, meta))
    return out


# ------------------------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    path: str  # relative to the shard folder
    index: str
    split: str
    samples: int
    bytes: int
    sha256: str
    codecs: list[str] = field(default_factory=list)
    listing: str = ""  # the shard's listing file; "" for sets built before listings existed


@dataclass
class SplitInfo:
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    ingest: dict[str, int] = field(default_factory=dict)  # kept / remuxed / transcoded / trimmed counts
    audio: int = 0  # samples with a sound member


@dataclass
class Manifest:
    classes: list[str] | None
    shards: list[ShardInfo]
    splits: dict[str, SplitInfo]
    options: dict[str, Any] = field(default_factory=dict)
    rejects: int = 0
    labels: str = "single"  # LABEL_KINDS
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else 0

    def shards_for(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    @property
    def audio(self) -> str:
        """How the build treated sound: drop (no audio members), keep (every sample has one), optional."""
        return str(self.options.get("ingest", {}).get("audio", "drop"))

    def codecs_for(self, split: str) -> set[str]:
        return {c for s in self.shards_for(split) for c in s.codecs}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, folder: str | os.PathLike) -> str | os.PathLike:
        path = storage.join(folder, MANIFEST_NAME)
        atomic_write_bytes(path, (json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n").encode())
        return path

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = MANIFEST_NAME) -> Manifest:
        def need(obj: dict[str, Any], key: str, typ: type | tuple[type, ...], ctx: str) -> Any:
            if key not in obj:
                raise FormatError(f"{where}: missing field {ctx}{key}")
            if not isinstance(obj[key], typ):
                raise FormatError(f"{where}: field {ctx}{key} must be {typ}, got {type(obj[key]).__name__}")
            return obj[key]

        if data.get("format") != FORMAT_NAME:
            raise FormatError(f"{where}: field format must be {FORMAT_NAME!r}, got {data.get('format')!r}")
        if data.get("version") not in READABLE_VERSIONS:
            raise FormatError(
                f"{where}: field version {data.get('version')!r} is not supported (this tubelet reads "
                f"{', '.join(map(str, READABLE_VERSIONS))})"
            )
        kind = data.get("labels", "single")
        if kind not in LABEL_KINDS:
            raise FormatError(f"{where}: field labels must be one of {LABEL_KINDS}, got {kind!r}")
        classes = data.get("classes")
        if classes is not None and not (
            isinstance(classes, list) and all(isinstance(c, str) for c in classes)
        ):
            raise FormatError(f"{where}: field classes must be a list of strings or null")
        shards = []
        for i, s in enumerate(need(data, "shards", list, "")):
            ctx = f"shards[{i}]."
            shards.append(
                ShardInfo(
                    path=need(s, "path", str, ctx),
                    index=need(s, "index", str, ctx),
                    split=check_split(need(s, "split", str, ctx)),
                    samples=need(s, "samples", int, ctx),
                    bytes=need(s, "bytes", int, ctx),
                    sha256=need(s, "sha256", str, ctx),
                    codecs=list(s.get("codecs", [])),
                    listing=s.get("listing") or "",
                )
            )
        splits = {
            name: SplitInfo(
                samples=need(v, "samples", int, f"splits.{name}."),
                shards=need(v, "shards", int, f"splits.{name}."),
                bytes=need(v, "bytes", int, f"splits.{name}."),
                per_class=dict(v.get("per_class", {})),
                ingest=dict(v.get("ingest", {})),
                audio=int(v.get("audio", 0)),
            )
            for name, v in need(data, "splits", dict, "").items()
        }
        return cls(
            classes=classes,
            shards=shards,
            splits=splits,
            options=dict(data.get("options", {})),
            rejects=int(data.get("rejects", 0)),
            labels=kind,
        )


def load_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and validate `folder/manifest.json`; errors name the file and the field."""
    path = storage.join(folder, MANIFEST_NAME)
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except (FileNotFoundError, NotADirectoryError):
        what = "is a file, not" if storage.isfile(folder) else "is not"
        raise FormatError(
            f"{path}: no manifest ({folder} {what} a shard folder made by `python -m data_shards build`: "
            "give the folder holding manifest.json)"
        ) from None
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise FormatError(f"{path}: must hold a JSON object, got a {type(data).__name__}")
    return Manifest.from_json(data, where=str(path))


# -------------------------------------------------------------------------------------------- helpers


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with storage.open_read(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Readers never see half a file: temp name + fsync + rename locally, one PUT to an object store."""
    storage.write_bytes(path, data)
