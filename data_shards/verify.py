"""`python -m data_shards verify`: check a shard set against its manifest before training on it.

Checksums, DALI indexes, member structure, labels, counts, and (with `--decode`) a full decode of
every video. Every problem names the shard and, where there is one, the sample key.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_shards.format import (
    UNLABELED,
    FormatError,
    dali_index_lines,
    iter_tar_samples,
    load_manifest,
    parse_shard_name,
    sha256_file,
)
from data_shards.probe import RejectError, decode_check_bytes

REQUIRED_META = ("id", "source", "codec", "frames", "fps", "width", "height", "duration")


def verify(folder: str | os.PathLike, decode: bool = False) -> tuple[list[str], dict[str, int]]:
    """Returns (problems, counts per split). An empty problem list means the set is safe to train on."""
    folder = Path(folder)
    problems: list[str] = []
    try:
        manifest = load_manifest(folder)
    except FormatError as e:
        return [str(e)], {}
    n_classes = manifest.num_classes
    seen_keys: dict[str, str] = {}
    counts: dict[str, int] = {}
    listed = set()
    for shard in manifest.shards:
        listed |= {shard.path, shard.index}
        tar = folder / shard.path
        if not tar.is_file():
            problems.append(f"{shard.path}: missing")
            continue
        if tar.stat().st_size != shard.bytes:
            problems.append(f"{shard.path}: {tar.stat().st_size} bytes, manifest says {shard.bytes}")
        if sha256_file(tar) != shard.sha256:
            problems.append(f"{shard.path}: sha256 does not match the manifest")
            continue
        idx = folder / shard.index
        try:
            if not idx.is_file():
                problems.append(f"{shard.index}: missing DALI index")
            elif idx.read_text().splitlines() != dali_index_lines(tar):
                problems.append(f"{shard.index}: does not match {shard.path} (rebuild it)")
            n = 0
            for sample in iter_tar_samples(tar):
                n += 1
                where = f"{shard.path}: {sample.key}"
                if sample.key in seen_keys:
                    problems.append(f"{where}: duplicate key (also in {seen_keys[sample.key]})")
                seen_keys[sample.key] = shard.path
                if not (sample.label == UNLABELED or 0 <= sample.label < n_classes):
                    problems.append(
                        f"{where}: label {sample.label} outside [0, {n_classes}) and not {UNLABELED}"
                    )
                missing = [k for k in REQUIRED_META if k not in sample.meta]
                if missing:
                    problems.append(f"{where}: metadata lacks {missing}")
                if sample.meta.get("codec") not in shard.codecs:
                    problems.append(
                        f"{where}: codec {sample.meta.get('codec')!r} not in the shard's {shard.codecs}"
                    )
                if decode:
                    try:
                        decode_check_bytes(sample.video)
                    except RejectError as e:
                        problems.append(f"{where}: {e}")
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
    for f in sorted(folder.iterdir()):
        name = f.name[: -len(".idx")] + ".tar" if f.name.endswith(".idx") else f.name
        try:
            parse_shard_name(name)
        except FormatError:
            continue
        if f.name not in listed:
            problems.append(f"{f.name}: not listed in the manifest")
    return problems, counts
