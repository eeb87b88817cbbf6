"""`python -m data_shards verify`: check a shard set against its manifest before training on it.

Checksums, DALI indexes, member structure, labels, counts, and (with `--decode`) a full decode of
every video. Every problem names the shard and, where there is one, the sample key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from data_shards import storage
from data_shards.audio import audio_problem
from data_shards.format import (
    LISTING_FIX,
    SEGMENT_SLACK_S,
    UNLABELED,
    FormatError,
    Sample,
    ShardInfo,
    dali_index_lines,
    iter_tar_samples,
    labels_of,
    load_manifest,
    parse_listing,
    segments_of,
    sha256_file,
    shard_of,
)
from data_shards.probe import RejectError, inspect_stored

REQUIRED_META = ("id", "source", "codec", "frames", "fps", "width", "height", "duration")


@dataclass
class Report:
    """What `verify` found: problems, samples per split, and how many samples were decoded cleanly (so a
    report never says "decoded" of a set whose decode did not run, or did not pass, for every sample)."""

    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    listed: int = 0  # samples the manifest lists
    decoded: int = 0  # samples whose video decoded, to the frame count its metadata says

    @property
    def fully_decoded(self) -> bool:
        return self.listed > 0 and self.decoded == self.listed


def _check_sample(
    sample: Sample,
    shard: ShardInfo,
    n_classes: int,
    seen_keys: dict[str, str],
    report: Report | None,
    audio: str = "drop",
) -> list[str]:
    """Problems of one sample: key, label, metadata, codec, its sound (`audio`: the build's mode) and
    (`report` given: decode) the stored frame count, which is what the loaders plan from, and the sound's
    samples; a clean decode is counted in `report.decoded`."""
    decode = report is not None
    where = f"{shard.path}: {sample.key}"
    out = []
    if sample.key in seen_keys:
        out.append(f"{where}: duplicate key (also in {seen_keys[sample.key]})")
    seen_keys[sample.key] = shard.path
    if not (sample.label == UNLABELED or 0 <= sample.label < n_classes):
        out.append(f"{where}: label {sample.label} outside [0, {n_classes}) and not {UNLABELED}")
    out += _label_problems(sample, n_classes, where)
    missing = [k for k in REQUIRED_META if k not in sample.meta]
    if missing:
        out.append(f"{where}: metadata lacks {missing} (rebuild with `python -m data_shards build`)")
    if sample.meta.get("codec") not in shard.codecs:
        out.append(f"{where}: codec {sample.meta.get('codec')!r} not in the shard's {shard.codecs}")
    out += _audio_problems(sample, audio, decode, where)
    if decode:
        try:
            got = inspect_stored(sample.video)
        except RejectError as e:
            return [*out, f"{where}: {e}"]
        if got.problem:
            out.append(f"{where}: {got.problem}")
        if got.frames != sample.meta.get("frames"):
            out.append(f"{where}: decodes to {got.frames} frames, metadata says {sample.meta.get('frames')}")
        elif not got.problem and report is not None:
            report.decoded += 1
    return out


def _audio_problems(sample: Sample, audio: str, decode: bool, where: str) -> list[str]:
    """A sound member where the build promised one (`--audio keep`), none where it dropped sound, metadata
    agreeing with it; `decode`: the FLAC decoded and its length checked against the video."""
    if audio == "drop":
        return [f"{where}: a .flac member in a set built without sound"] if sample.audio is not None else []
    if audio == "keep" and sample.audio is None:
        return [f"{where}: no .flac member, the set was built with --audio keep"]
    if not decode:
        described = sample.meta.get("audio") is not None
        return (
            []
            if described == (sample.audio is not None)
            else [f"{where}: audio metadata and member disagree"]
        )
    problem = audio_problem(sample.audio, sample.meta)
    return [f"{where}: {problem}"] if problem else []


def _label_problems(sample: Sample, n_classes: int, where: str) -> list[str]:
    """A label set's classes in range; segments ordered, inside the clip, of a known class."""
    try:
        labels, segments = labels_of(sample.label, sample.meta), segments_of(sample.meta)
    except FormatError as e:
        return [f"{where}: {e}"]
    out = []
    if any(not 0 <= c < n_classes for c in labels):
        out.append(f"{where}: label set {list(labels)} has a class outside [0, {n_classes})")
    length = sample.meta.get("duration")
    for s, e, c in segments:
        if not (0 <= s < e) or (isinstance(length, (int, float)) and e > length + SEGMENT_SLACK_S):
            out.append(f"{where}: segment {s:g}-{e:g}s is empty or outside the clip ({length}s)")
        if not 0 < c < n_classes:
            out.append(f"{where}: segment class {c} outside [1, {n_classes})")
    return out


def _listing_problems(
    folder: storage.Location, shard: ShardInfo, rows: list[tuple[str, int, dict]]
) -> list[str]:
    """The shard's listing (what loaders plan from) says what its tar holds, sample for sample (`rows`: key,
    label and metadata of the tar's samples). A set built before listings existed has none: nothing to check."""
    if not shard.listing:
        return []
    path = storage.join(folder, shard.listing)
    if not storage.isfile(path):
        return [f"{shard.listing}: missing listing"]
    try:
        have = parse_listing(storage.read_bytes(path), str(path))
    except FormatError as e:
        return [f"{e} ({LISTING_FIX})"]
    if have == rows:
        return []
    n = next((i for i, (a, b) in enumerate(zip(have, rows)) if a != b), min(len(have), len(rows)))
    return [f"{shard.listing}: does not match {shard.path} from sample {n + 1} on ({LISTING_FIX})"]


def verify(folder: str | os.PathLike, decode: bool = False) -> tuple[list[str], dict[str, int]]:
    """Returns (problems, counts per split). An empty problem list means the set is safe to train on."""
    report = verify_report(folder, decode)
    return report.problems, report.counts


def verify_report(folder: str | os.PathLike, decode: bool = False) -> Report:
    """`verify`, with how many samples the manifest lists and how many decoded cleanly (`--decode`)."""
    folder = storage.join(folder)
    storage.check_access(folder)
    report = Report()
    problems, counts = report.problems, report.counts
    try:
        manifest = load_manifest(folder)
    except FormatError as e:
        return Report([str(e)])
    report.listed = sum(s.samples for s in manifest.shards)
    n_classes = manifest.num_classes
    seen_keys: dict[str, str] = {}
    listed = set()
    for shard in manifest.shards:
        listed |= {shard.path, shard.index, shard.listing}
        tar = storage.join(folder, shard.path)
        if not storage.isfile(tar):
            problems.append(f"{shard.path}: missing")
            continue
        if (n_bytes := storage.size(tar)) != shard.bytes:
            problems.append(f"{shard.path}: {n_bytes} bytes, manifest says {shard.bytes}")
        if sha256_file(tar) != shard.sha256:
            problems.append(f"{shard.path}: sha256 does not match the manifest")
            continue
        idx = storage.join(folder, shard.index)
        try:
            if not storage.isfile(idx):
                problems.append(f"{shard.index}: missing DALI index")
            elif storage.read_text(idx).splitlines() != dali_index_lines(tar):
                problems.append(f"{shard.index}: does not match {shard.path} (rebuild it)")
            n, rows = 0, []
            for sample in iter_tar_samples(tar):
                n += 1
                rows.append((sample.key, sample.label, sample.meta))
                problems += _check_sample(
                    sample, shard, n_classes, seen_keys, report if decode else None, manifest.audio
                )
            problems += _listing_problems(folder, shard, rows)
            if n != shard.samples:
                problems.append(f"{shard.path}: {n} samples, manifest says {shard.samples}")
            counts[shard.split] = counts.get(shard.split, 0) + n
        except (FormatError, OSError, EOFError) as e:
            problems.append(f"{shard.path}: unreadable ({e})")
    for split, info in manifest.splits.items():
        if counts.get(split, 0) != info.samples:
            problems.append(
                f"split {split}: {counts.get(split, 0)} samples in shards, manifest says {info.samples}"
            )
    for f in storage.listdir(folder):
        if shard_of(f) is not None and f not in listed:
            problems.append(f"{f}: not listed in the manifest (re-running the build lists or removes it)")
    return report
