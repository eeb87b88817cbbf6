"""Loader throughput per core: our PyAV backend vs a VideoMAE-style decord loader, K-clip reuse, DALI-CPU.

    .venv/bin/python tests/bench/bench_loader.py [--videos 12] [--frames 64] [--long-frames 250] [--size 256]

Everything runs in this process on one core (torch 1 thread, PyAV in-process, DALI num_threads=1), on
the same shards, the same sampling (16 x 4, 224 px, VideoMAE multi-scale crop) and the same torch
crop/resize for decord. Two clip lengths: `--frames` (64: the sampled span is the whole clip, every
frame up to the last must be decoded by both) and `--long-frames` (250: a Kinetics-like 10 s clip,
where the sampled window is a quarter of the video). Each figure is the median of `--rounds` rounds,
ours and decord alternating. The decode bound (`decode_bound`: libavcodec decoding exactly the frames a
sample needs, nothing else) is measured on the same clips, right after ours. Ratios are medians of the
per-round ratios. Prints one JSON line; targets (issue 28): ours within 15 % of the decode bound at K=1,
>= 1.3x decord on 64-frame clips, >= 1.5x on 250-frame, >= 2x at K=4.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from data_shards import format as fmt
from data_shards.loader import SamplingSpec, build_loader
from data_shards.loader.fixtures import make_shard_set
from data_shards.loader.sampling import plan_video, sample_rng, views_from_frames


def shard_set(root: Path, codec: str, videos: int, frames: int, size: int) -> Path:
    folder = root / f"{codec}-{videos}x{frames}x{size}"
    if not (folder / fmt.MANIFEST_NAME).is_file():
        make_shard_set(folder, codec=codec, shards=2, per_shard=videos // 2, frames=frames, size=size)
    return folder


def ours(folder: Path, spec: SamplingSpec, backend: str, epochs: int) -> float:
    loader = build_loader(
        folder, "train", batch_size=8, spec=spec, backend=backend, num_workers=0, num_threads=1
    )
    next(iter(loader))  # warm-up (pipeline build, page cache)
    clips, t0 = 0, time.perf_counter()
    for e in range(epochs):
        loader.set_epoch(e + 1)
        clips += sum(b["video"].shape[0] for b in loader)
    return clips / (time.perf_counter() - t0)


def decord_baseline(folder: Path, spec: SamplingSpec, epochs: int, reuse: bool, batch: int = 8) -> float:
    """VideoMAE-style: decord VideoReader per video file, get_batch(indices), torch crop/resize/normalize,
    clips collated into batches of `batch` as a DataLoader's default collate does (ours builds batches too).
    reuse=False decodes once per clip (what a loader without repeated augmentation does for K clips)."""
    import decord

    decord.bridge.set_bridge("native")
    tmp = Path(tempfile.mkdtemp(prefix="decord-bench-"))
    files = []
    for tar in sorted(folder.glob("*.tar")):
        for s in fmt.iter_tar_samples(tar):
            p = tmp / f"{s.key}.{s.video_ext}"
            p.write_bytes(s.video)
            files.append(p)
    clips, t0 = 0, time.perf_counter()
    k = spec.clips_per_video
    pending: list[torch.Tensor] = []
    for e in range(epochs):
        for i, path in enumerate(files):
            for rep in range(1 if reuse else k):
                vr = decord.VideoReader(str(path), num_threads=1)
                n, (h, w) = len(vr), vr[0].shape[:2]
                one = spec if reuse else SamplingSpec(**{**spec.__dict__, "clips_per_video": 1})
                vplan = plan_video(n, h, w, one, sample_rng(0, e, i * 16 + rep))
                frames = vr.get_batch(vplan.frames.tolist()).asnumpy()
                pending.append(views_from_frames(frames, vplan, spec))
                if len(pending) == batch:
                    clips += torch.cat(pending).shape[0]
                    pending = []
    clips += torch.cat(pending).shape[0] if pending else 0
    rate = clips / (time.perf_counter() - t0)
    shutil.rmtree(tmp)
    return rate


def decode_bound(folder: Path, spec: SamplingSpec, epochs: int) -> float:
    """The physical bound at one clip per video: libavcodec decoding exactly the frames each sample needs
    (demux, from the keyframe before the window, unsampled non-reference frames dropped, up to the last
    sampled frame) and nothing else: no tar reads, colour conversion, crop, resize or batching."""
    from data_shards.loader.pyav import _Packets

    videos = [s.video for tar in sorted(folder.glob("*.tar")) for s in fmt.iter_tar_samples(tar)]
    clips, t0 = 0, time.perf_counter()
    for e in range(epochs):
        for i, data in enumerate(videos):
            with _Packets(data) as video:
                vplan = plan_video(video.frames, video.height, video.width, spec, sample_rng(0, e, i))
                video.decode(set(vplan.frames.tolist()))
            clips += 1
    return clips / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--long-frames", type=int, default=250)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "tubelet-bench-loader"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(a.cache)
    h264 = shard_set(root, "h264", a.videos, a.frames, a.size)
    vp9 = shard_set(root, "vp9", a.videos, a.frames, a.size)
    long = shard_set(root, "h264", a.videos, a.long_frames, a.size)
    k1 = SamplingSpec(frames=16, stride=4, size=224)
    k4 = SamplingSpec(frames=16, stride=4, size=224, clips_per_video=4)
    # each ratio's two sides run back to back, and each ratio is the median of its per-round ratios: on a
    # shared VM the machine's speed drifts within a round (the bound moved 96 -> 118 clips/s between runs)
    runs: dict[str, Callable[[], float]] = {
        "pyav_h264_k1": lambda: ours(h264, k1, "pyav", a.epochs),
        "decode_bound_h264_k1": lambda: decode_bound(h264, k1, a.epochs),
        "decord_h264_k1": lambda: decord_baseline(h264, k1, a.epochs, reuse=True),
        "pyav_long_k1": lambda: ours(long, k1, "pyav", a.epochs),
        "decode_bound_long_k1": lambda: decode_bound(long, k1, a.epochs),
        "decord_long_k1": lambda: decord_baseline(long, k1, a.epochs, reuse=True),
        "pyav_h264_k4": lambda: ours(h264, k4, "pyav", a.epochs),
        "decord_h264_k4_noreuse": lambda: decord_baseline(h264, k4, a.epochs, reuse=False),
        "pyav_vp9_k1": lambda: ours(vp9, k1, "pyav", a.epochs),
        "dali_cpu_vp9_k1": lambda: ours(vp9, k1, "dali", a.epochs),
    }
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(a.rounds):
        for name, fn in runs.items():
            samples[name].append(fn())

    def ratio(num: str, den: str) -> float:
        return round(statistics.median(x / y for x, y in zip(samples[num], samples[den])), 2)

    out: dict[str, object] = {k: round(statistics.median(v), 2) for k, v in samples.items()}
    out |= {
        "unit": f"clips/s on one core (16x4 frames, 224 px, from {a.size} px clips of {a.frames} frames, "
        f"long: {a.long_frames}); median of {a.rounds} rounds, ratios: median of the per-round ratios",
        "ours_vs_decord_k1": ratio("pyav_h264_k1", "decord_h264_k1"),
        "ours_vs_decord_long_k1": ratio("pyav_long_k1", "decord_long_k1"),
        "ours_vs_decode_bound_k1": ratio("pyav_h264_k1", "decode_bound_h264_k1"),
        "ours_vs_decode_bound_long_k1": ratio("pyav_long_k1", "decode_bound_long_k1"),
        "ours_k4_reuse_vs_decord_k4": ratio("pyav_h264_k4", "decord_h264_k4_noreuse"),
        "k4_reuse_speedup": ratio("pyav_h264_k4", "pyav_h264_k1"),
        "dali_cpu_vs_pyav_vp9": ratio("dali_cpu_vp9_k1", "pyav_vp9_k1"),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
