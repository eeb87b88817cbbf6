"""`python -m data_shards loadtest SHARDS ...`: drive the loader like training would, print one JSON line.

Check an input pipeline before spending GPU hours: which backend `auto` picks and why, clips/s, the
fraction of time spent waiting for decode, coverage (every key once per epoch across the simulated
ranks), and undecodable samples. Ranks are simulated in this process one after another.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from data_shards.format import FormatError
from data_shards.loader import BACKENDS, LoaderError, SamplingSpec, build_loader
from data_shards.loader.cache import IO_STATS


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"  # what argparse names in its error
    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    positive, natural = _at_least(1), _at_least(0)
    parser.add_argument("shards", help="shard folder (with manifest.json)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--split", default="train")
    parser.add_argument("--frames", type=positive, default=16, help="frames per clip (T)")
    parser.add_argument("--stride", type=positive, default=4, help="temporal stride between sampled frames")
    parser.add_argument("--size", type=positive, default=224, help="output height = width")
    parser.add_argument("--batch", type=positive, default=8, help="clips per batch")
    parser.add_argument("--ranks", type=positive, default=1, help="simulated data-parallel ranks")
    parser.add_argument("--epochs", type=positive, default=1)
    parser.add_argument("--clips-per-video", type=positive, default=1, help="K augmented clips per decode")
    parser.add_argument("--workers", type=natural, default=2, help="PyAV decode worker processes")
    parser.add_argument(
        "--max-batches", type=natural, default=0, help="stop each rank-epoch after N batches (0: all)"
    )
    parser.add_argument("--eval", action="store_true", help="eval sampling (multi-view, no shuffle)")
    parser.add_argument("--eval-clips", type=positive, default=1)
    parser.add_argument("--eval-crops", type=positive, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-skip-fraction", type=_fraction, default=0.01)
    parser.add_argument("--cache-dir", default=None, help="local cache of samples read from a URL")
    parser.add_argument("--cache-bytes", type=int, default=0, help="the cache's bound in bytes")
    return parser


def run_loadtest(args: argparse.Namespace | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run the load test; returns the summary dict (raises LoaderError / FormatError on loader errors)."""
    ns = vars(add_arguments(argparse.ArgumentParser()).parse_args([kwargs.get("shards", "_")]))
    ns.update(vars(args) if args is not None else {})
    ns.update(kwargs)
    a = argparse.Namespace(**ns)
    spec = SamplingSpec(
        frames=a.frames,
        stride=a.stride,
        size=a.size,
        clips_per_video=a.clips_per_video,
        train=not a.eval,
        eval_clips=a.eval_clips,
        eval_crops=a.eval_crops,
    )
    clips = videos = skipped = batches = 0
    wait = busy = 0.0
    backend, why, num_samples = "", "", 0
    duplicates = 0
    all_keys: set[str] = set()
    io: dict[str, int] = dict.fromkeys(IO_STATS, 0)
    t0 = time.perf_counter()
    for epoch in range(a.epochs):
        epoch_keys: list[str] = []
        for rank in range(a.ranks):
            loader = _loader(a, spec, rank, epoch)
            backend, why, num_samples = loader.backend, loader.reason, loader.num_samples
            for i, batch in enumerate(loader):
                pad = batch.get("pad")
                keys = batch["key"][:: spec.views_per_video]
                if pad is not None:
                    keep = pad[:: spec.views_per_video].tolist()
                    keys = [k for k, p in zip(keys, keep) if not p]
                epoch_keys.extend(keys)
                if a.max_batches and i + 1 >= a.max_batches:
                    break
            s = loader.stats
            clips, videos, skipped, batches = (
                clips + s["clips"],
                videos + s["videos"],
                skipped + s["skipped"],
                batches + s["batches"],
            )
            wait, busy = wait + s["decode_wait_s"], busy + s["iter_s"]
            io = {k: io.get(k, 0) + s[k] for k in IO_STATS}
        duplicates += len(epoch_keys) - len(set(epoch_keys))
        all_keys |= set(epoch_keys)
    wall = time.perf_counter() - t0
    return {
        "backend": backend,
        "why": why,
        "split": a.split,
        "ranks": a.ranks,
        "epochs": a.epochs,
        "samples_in_split": num_samples,
        "batches": batches,
        "clips": clips,
        "videos": videos,
        "unique_keys": len(all_keys),
        "duplicate_keys_within_epoch": duplicates,
        "skipped": skipped,
        "clips_per_s": round(clips / busy, 2) if busy else 0.0,
        "decode_wait_fraction": round(wait / busy, 4) if busy else 0.0,
        "wall_s": round(wall, 3),
        **io,
    }


def _loader(a: argparse.Namespace, spec: SamplingSpec, rank: int, epoch: int) -> Any:
    return build_loader(
        a.shards,
        a.split,
        batch_size=a.batch,
        spec=spec,
        backend=a.backend,
        rank=rank,
        world_size=a.ranks,
        seed=a.seed,
        device=a.device,
        num_workers=a.workers,
        max_skip_fraction=a.max_skip_fraction,
        epoch=epoch,
        cache_dir=a.cache_dir,
        cache_bytes=a.cache_bytes,
    )


def main(args: argparse.Namespace) -> int:
    """Print one JSON summary line; exit status 1 on loader errors."""
    try:
        summary = {"ok": True, **run_loadtest(args)}
        code = 0
        if not summary["batches"]:  # nothing loaded is not a pass
            need = f"{args.batch} clips x {args.ranks} rank(s)"
            summary = {"ok": False, "error": f"no batch loaded: split {args.split!r} has "
                       f"{summary['samples_in_split']} samples for batches of {need} (whole batches only)",
                       **{k: v for k, v in summary.items() if k != "ok"}}  # fmt: skip
            code = 1
    except (LoaderError, FormatError, OSError, ValueError) as e:
        summary, code = {"ok": False, "error": f"{type(e).__name__}: {e}"}, 1
    print(json.dumps(summary), flush=True)
    return code


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(main(add_arguments(argparse.ArgumentParser(prog="python -m data_shards.loadtest")).parse_args()))
