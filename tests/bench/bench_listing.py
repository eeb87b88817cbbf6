"""Listing a split in a bucket: from the shards' listings (two GETs and a HEAD a shard) vs from each sample's
members (one ranged GET a sample: how sets built before listings existed are listed), in the same run against a
local S3 server (SeaweedFS on 127.0.0.1, started here).

    .venv/bin/python tests/bench/bench_listing.py [--shards 4] [--per-shard 500] [--sample-kb 1000] [--rounds 3]

The shards hold real-size samples (random bytes of `--sample-kb` standing in for the video: listing never reads
it), so a sample's label and metadata are a megabyte from the next one's and no two share a GET. Both sets are
the same tars; the older one's manifest names no listing. Each figure is the median of `--rounds` rounds,
alternating; a local server has no network latency, so a real store's ratio is larger. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from data_shards import format as fmt
from data_shards import storage
from data_shards.loader.index import list_split
from data_shards.shardio import write_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/s3server.py
from s3server import make_bucket, s3_server


def shard_sets(root: Path, shards: int, per_shard: int, sample_bytes: int) -> tuple[Path, Path]:
    """(a set with listings, the same tars as a set built before listings existed)."""
    new, old = root / "new", root / "old"
    new.mkdir()
    infos = []
    for s in range(shards):
        samples = [
            fmt.Sample(f"v{s:03d}{i:06d}", os.urandom(sample_bytes), "mp4", i % 4,
                       {"frames": 250, "height": 256, "width": 340, "codec": "h264", "id": f"{s}/{i}"})
            for i in range(per_shard)
        ]  # fmt: skip
        infos.append(write_shard(new / fmt.shard_name("train", s), samples))
    split = fmt.SplitInfo(samples=shards * per_shard, shards=shards, bytes=sum(i.bytes for i in infos))
    fmt.Manifest(classes=list("abcd"), shards=infos, splits={"train": split}).save(new)
    shutil.copytree(new, old, ignore=shutil.ignore_patterns(f"*{fmt.LISTING_SUFFIX}"))
    manifest = fmt.load_manifest(old)
    for info in manifest.shards:
        info.listing = ""
    manifest.save(old)
    return new, old


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--sample-kb", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tubelet-bench-listing-"))
    try:
        new, old = shard_sets(tmp, a.shards, a.per_shard, a.sample_kb * 1000)
        with s3_server(tmp / "weed") as env:
            os.environ.update(env)
            make_bucket(env, "listing")
            urls = {"listing": "s3://listing/new", "members": "s3://listing/old"}
            storage.upload(new, urls["listing"])
            storage.upload(old, urls["members"])
            times: dict[str, list[float]] = {k: [] for k in urls}
            for _ in range(a.rounds):
                for name, url in urls.items():
                    t0 = time.perf_counter()
                    refs = list_split(url, "train").refs
                    times[name].append(time.perf_counter() - t0)
                    assert len(refs) == a.shards * a.per_shard, (name, len(refs))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({
            "samples": a.shards * a.per_shard, "shards": a.shards, "sample_kb": a.sample_kb,
            "listing_s": round(med["listing"], 3), "members_s": round(med["members"], 3),
            "speedup": round(med["members"] / med["listing"], 1),
            "unit": f"seconds to list the split from a local S3 server, median of {a.rounds} rounds",
        }), flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
