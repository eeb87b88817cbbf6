"""Writing one shard: tar (via webdataset's TarWriter, reproducible) + DALI index + checksum.

The tar appears under its final name only when complete; its index is written after it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds

from data_shards.format import (
    Sample,
    ShardInfo,
    index_name,
    parse_shard_name,
    sample_members,
    sha256_file,
    write_dali_index,
)


def write_shard(tar_path: str | os.PathLike, samples: Iterable[Sample]) -> ShardInfo:
    """Write `samples` to `tar_path` atomically and index it; same samples give the same bytes."""
    tar_path = Path(tar_path)
    split, _ = parse_shard_name(tar_path.name)
    tmp = tar_path.with_name(f".{tar_path.name}.partial")
    count, codecs = 0, set()
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0, user="tubelet", group="tubelet", mode=0o444)
        for s in samples:
            writer.write({"__key__": s.key, **sample_members(s)})
            codecs.add(str(s.meta.get("codec", "unknown")))
            count += 1
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    if count == 0:
        tmp.unlink()
        raise ValueError(f"{tar_path}: refusing to write an empty shard")
    os.replace(tmp, tar_path)
    idx = tar_path.with_name(index_name(tar_path.name))
    write_dali_index(tar_path, idx)
    return ShardInfo(
        path=tar_path.name,
        index=idx.name,
        split=split,
        samples=count,
        bytes=tar_path.stat().st_size,
        sha256=sha256_file(tar_path),
        codecs=sorted(codecs),
    )
