"""Serving throughput and latency: `python -m finetune serve` (Ray Serve, real HTTP on 127.0.0.1) with batching
on and off, 1 and 8 concurrent clients, against calling the predictor in a loop (what `predict` does per file).

Each request posts the same H.264 clip; the model is a classifier with random weights built here (ViT-S,
8 frames at 112 px, one view per video by default) unless `--model DIR` names one. Requests/s counts answered
requests over the wall time of a round; p50/p99 are per-request latencies seen by the clients. Not part of
the default test run:

    .venv/bin/python tests/bench/bench_serve.py [--preset vit-s --size 112 --frames 8 --requests 48]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def build_model(out: Path, preset: str, size: int, frames: int) -> Path:
    """A classifier directory with random weights, 4 classes, one eval view (1 clip x 1 crop), stride 2."""
    import torch

    from finetune.config import FinetuneSection
    from finetune.model_dir import export_model_dir
    from pretrain.models import VideoClassifier, VideoClassifierConfig, VideoViTConfig
    from pretrain.models.mae import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    enc = VideoViTConfig.from_preset(preset, img_size=size, num_frames=frames)
    cfg = VideoClassifierConfig(encoder=enc, num_classes=4, class_names=["a", "b", "c", "d"])
    sampling = {
        "stride": 2,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "test_clips": 1,
        "test_crops": 1,
    }
    return export_model_dir(VideoClassifier(cfg), cfg, FinetuneSection(), out, {"sampling": sampling})


def make_clip(out: Path, size: int, frames: int) -> bytes:
    from data_shards.synth import SynthSpec, encode_clip, render_clip

    spec = SynthSpec(videos=1, frames=frames * 2 + 8, size=size, codec="h264")
    clip, _ = render_clip(0, spec)
    encode_clip(clip, out, "h264", spec.fps)
    return out.read_bytes()


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def row(name: str, clients: int, lat: list[float], wall: float, batches: str = "") -> dict:
    return {
        "mode": name,
        "clients": clients,
        "requests": len(lat),
        "rps": len(lat) / wall,
        "p50": 1e3 * statistics.median(lat),
        "p99": 1e3 * percentile(lat, 0.99),
        "batches": batches,
    }


def bench_loop(model: Path, clip: bytes, n: int, threads: int) -> dict:
    """The predictor called once per video in this process: decode + forward, one after the other."""
    import torch

    from finetune.predict import Predictor

    torch.set_num_threads(threads)
    p = Predictor(model)
    for _ in range(3):
        p.probabilities([p.decode(clip)])
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        p.top(p.probabilities([p.decode(clip)])[0])
        lat.append(time.perf_counter() - t)
    return row("predict in a loop (in process)", 1, lat, time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: Path, batch: int, wait_ms: float, cpus: int, log: Path
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "finetune", "serve", "--model", str(model), "--port", str(port),
        "--max-batch-size", str(batch), "--batch-wait-ms", str(wait_ms), "--cpus-per-replica", str(cpus),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    with log.open("w") as out:  # own process group: a failed start takes its Ray cluster down with it
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{base}/health", timeout=2).ok:
                return proc, base
        except requests.RequestException:
            pass
        time.sleep(1)
    stop_server(proc)
    raise SystemExit(f"bench_serve: the server did not come up:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGINT (the server takes Serve and its local Ray down), then whatever is left of its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=120)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def bench_server(base: str, clip: bytes, clients: int, n: int) -> tuple[list[float], float]:
    """`n` requests spread over `clients` threads (each with its own connection); latencies and wall time."""

    def client(k: int) -> list[float]:
        s, out = requests.Session(), []
        for _ in range(k):
            t = time.perf_counter()
            r = s.post(f"{base}/predict", data=clip, timeout=300)
            out.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise SystemExit(f"bench_serve: HTTP {r.status_code}: {r.text[:300]}")
        return out

    client(2)  # warm-up
    share = [n // clients + (i < n % clients) for i in range(clients)]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        lat = [x for part in pool.map(client, share) for x in part]
    return lat, time.perf_counter() - t0


def histogram(base: str) -> dict[str, int]:
    return requests.get(f"{base}/metadata", timeout=10).json()["serving"]["batch_size_histogram"]["predict"]


def bench_mode(model: Path, clip: bytes, batch: int, args: argparse.Namespace, tmp: Path) -> list[dict]:
    name = f"serve, batching {'on (<= ' + str(batch) + ')' if batch > 1 else 'off'}"
    proc, base = start_server(model, batch, args.wait_ms, args.threads, tmp / f"serve_{batch}.log")
    rows = []
    try:
        for clients in (1, 8):
            before = histogram(base)
            lat, wall = bench_server(base, clip, clients, args.requests)
            after = histogram(base)
            sizes = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
            mean = sum(k * v for k, v in sizes.items()) / max(1, sum(sizes.values()))
            rows.append(row(name, clients, lat, wall, f"mean {mean:.1f}, max {max(sizes)}"))
    finally:
        stop_server(proc)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", type=Path, default=None, help="a model directory (default: random ViT built here)"
    )
    p.add_argument("--preset", default="vit-s")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--requests", type=int, default=48, help="timed requests per round")
    p.add_argument("--batch", type=int, default=8, help="--max-batch-size when batching is on")
    p.add_argument("--wait-ms", type=float, default=20.0, help="--batch-wait-ms (the server default)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (replica CPUs)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_serve-") as d:
        tmp = Path(d)
        model = args.model or build_model(tmp / "model", args.preset, args.size, args.frames)
        from finetune.predict import Predictor

        geo = Predictor(model).describe()["input"]
        clip = make_clip(tmp / "clip.mp4", geo["size"], geo["frames"])
        rows = [bench_loop(model, clip, args.requests, args.threads)]  # before and after the servers: the
        for batch in (
            1,
            args.batch,
        ):  # machine's load drifts (a shared CPU box); the faster loop is the baseline
            rows += bench_mode(model, clip, batch, args, tmp)
        rows.append(bench_loop(model, clip, args.requests, args.threads))
    print(f"{'mode':<34}{'clients':>8}{'requests':>9}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}  batch sizes")
    for r in rows:
        print(
            f"{r['mode']:<34}{r['clients']:>8}{r['requests']:>9}{r['rps']:>8.1f}{r['p50']:>9.1f}{r['p99']:>9.1f}  "
            f"{r['batches']}"
        )
    first, off1, off8, on1, on8, last = rows
    loop = max(first, last, key=lambda r: r["rps"])
    print(
        f"bench_serve: 8 clients {on8['rps']:.1f} req/s batched vs {off8['rps']:.1f} unbatched "
        f"({on8['rps'] / off8['rps']:.2f}x), predict loop {loop['rps']:.1f} req/s; 1 client p50 "
        f"{on1['p50']:.0f} ms batched / {off1['p50']:.0f} ms unbatched / {loop['p50']:.0f} ms in process "
        f"[{args.preset if args.model is None else args.model} {geo['frames']}x{geo['size']}, "
        f"{geo['views_per_video']} view(s), {args.threads} threads, batch <= {args.batch}, wait {args.wait_ms:g} ms]"
    )


if __name__ == "__main__":
    main()
