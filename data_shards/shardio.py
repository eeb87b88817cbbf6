"""Writing one shard: tar (via webdataset's TarWriter, reproducible) + listing + DALI index + checksum.

The tar appears under its final name only when complete; its listing and then its index are written after it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds

from data_shards import storage
from data_shards.format import (
    Sample,
    ShardInfo,
    atomic_write_bytes,
    encode_listing,
    index_name,
    iter_tar_samples,
    listing_name,
    parse_shard_name,
    sample_members,
    sha256_file,
    write_dali_index,
)


def write_shard(tar_path: storage.Location, samples: Iterable[Sample]) -> ShardInfo:
    """Write `samples` to `tar_path` atomically, list and index it; same samples give the same bytes. A URL
    destination is written to a local temporary file first, then uploaded (tar, listing, then index)."""
    if not storage.is_url(tar_path):
        return _write_local(Path(tar_path), samples)
    with tempfile.TemporaryDirectory(prefix="tubelet-shard-") as tmp:
        local = Path(tmp) / storage.name(tar_path)
        info = _write_local(local, samples)
        storage.upload(local, tar_path)
        storage.upload(local.with_name(info.listing), storage.join(storage.parent(tar_path), info.listing))
        storage.upload(local.with_name(info.index), storage.join(storage.parent(tar_path), info.index))
    return info


def _write_local(tar_path: Path, samples: Iterable[Sample]) -> ShardInfo:
    split, _ = parse_shard_name(tar_path.name)
    tmp = tar_path.with_name(f".{tar_path.name}.partial")
    codecs: set[str] = set()
    listing: list[tuple[str, int, dict]] = []
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0, user="tubelet", group="tubelet", mode=0o444)
        for s in samples:
            writer.write({"__key__": s.key, **sample_members(s)})
            codecs.add(str(s.meta.get("codec", "unknown")))
            listing.append((s.key, s.label, s.meta))
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    if not listing:
        tmp.unlink()
        raise ValueError(f"{tar_path}: refusing to write an empty shard")
    os.replace(tmp, tar_path)
    listed = tar_path.with_name(listing_name(tar_path.name))
    atomic_write_bytes(listed, encode_listing(listing))
    idx = tar_path.with_name(index_name(tar_path.name))
    write_dali_index(tar_path, idx)
    return ShardInfo(
        path=tar_path.name,
        index=idx.name,
        split=split,
        samples=len(listing),
        bytes=tar_path.stat().st_size,
        sha256=sha256_file(tar_path),
        codecs=sorted(codecs),
        listing=listed.name,
    )


def add_listing(tar_path: storage.Location) -> str:
    """Write the listing of a shard built before listings existed, from its tar, beside it (local or URL);
    returns its name. The bytes are those a build of the same samples writes."""
    name = listing_name(storage.name(tar_path))
    rows = ((s.key, s.label, s.meta) for s in iter_tar_samples(tar_path))
    atomic_write_bytes(storage.join(storage.parent(tar_path), name), encode_listing(rows))
    return name
