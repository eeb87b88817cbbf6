"""ViT-B tube-90% pretraining throughput on one GPU: clips/s, MFU and data-wait fraction.

    python tests/bench/bench_pretrain_gpu.py [--shards DIR] [--steps 60] [--micro 32] [--stages 1,2]

Runs the real entry point (`python -m pretrain`, bf16, ZeRO-1/2) once per (data backend, ZeRO stage):
`synthetic` (no decoding: the model's ceiling) and, with `--shards`, `dali` (NVDEC decode of real shards).
Reads the engine's own `metrics.jsonl`, drops the first `--warmup` steps, prints one line per run and a
summary line. Exits 0 with a skip message when CUDA is not available.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "pretrain" / "configs" / "vitb_videomae.yaml"


def bench(backend: str, stage: int, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    run_dir = tmp / f"{backend}-zero{stage}"
    data = (
        [f"data.shards={args.shards}", "data.backend=dali"]
        if backend == "dali"
        else ["data.backend=synthetic"]
    )
    cmd = [
        sys.executable,
        "-m",
        "pretrain",
        "--config",
        str(CONFIG),
        *data,
        f"train.run_dir={run_dir}",
        f"train.steps={args.steps}",
        "train.epochs=null",
        f"train.micro_batch_size={args.micro}",
        f"train.global_batch_size={args.micro}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.visualize_every=0",
        "data.val_split=null",
        f"data.synthetic_size={args.micro * (args.steps + 2)}",
        "optim.warmup_steps=0",
        "optim.warmup_epochs=null",
        f"deepspeed.zero_stage={stage}",
        "deepspeed.bf16=true",
        "checkpoint.save_final=false",
        "tracking.enabled=false",
        "tracking.log_model=false",
    ]
    timeout = getattr(args, "timeout", None)
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out, err = (
            x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr)
        )
        raise SystemExit(
            f"{backend}/zero{stage} timed out after {timeout:.0f}s:\n{out[-3000:]}\n{err[-3000:]}"
        ) from e
    if r.returncode != 0:
        raise SystemExit(f"{backend}/zero{stage} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [x for x in rows if "loss" in x][args.warmup :]
    med = lambda k: statistics.median(float(x[k]) for x in rows)  # noqa: E731
    return {
        "clips_per_s": med("clips_per_s"),
        "mfu": med("mfu"),
        "data_wait_frac": med("data_wait_frac"),
        "peak_mem_gib": max(float(x["peak_mem_gib"]) for x in rows),
        "loss": float(rows[-1]["loss"]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shards", type=Path, default=None, help="shard folder for the DALI run (skipped without)"
    )
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="leading steps left out of the medians")
    p.add_argument("--micro", type=int, default=32, help="clips per GPU per step")
    p.add_argument("--stages", default="1,2")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed to each run")
    args = p.parse_args()
    try:
        import torch
    except ImportError:
        print("SKIP bench_pretrain_gpu: torch is not installed")
        return 0
    if not torch.cuda.is_available():
        print("SKIP bench_pretrain_gpu: CUDA is not available (this benchmark needs a GPU)")
        return 0
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    backends = ["synthetic"] + (["dali"] if args.shards else [])
    if not args.shards:
        print(
            "note: no --shards given, the DALI run is skipped (build some with `python -m data_shards build`)"
        )
    device = torch.cuda.get_device_name(0)
    results = {}
    with tempfile.TemporaryDirectory(prefix="tubelet-bench-") as tmp:
        for backend in backends:
            for stage in (int(s) for s in args.stages.split(",")):
                res = bench(backend, stage, args, Path(tmp))
                results[(backend, stage)] = res
                print(
                    f"{device} vit-b 16x224 tube-0.9 bf16 zero{stage} {backend:9s} micro {args.micro}: "
                    f"{res['clips_per_s']:7.1f} clips/s  MFU {res['mfu'] * 100:5.1f}%  "
                    f"data-wait {res['data_wait_frac'] * 100:4.1f}%  peak {res['peak_mem_gib']:.1f} GiB",
                    flush=True,
                )
    summary = "  ".join(
        f"{b}/zero{s}={r['clips_per_s']:.1f}clips/s,mfu={r['mfu'] * 100:.1f}%,wait={r['data_wait_frac'] * 100:.1f}%"
        for (b, s), r in results.items()
    )
    print(f"SUMMARY bench_pretrain_gpu [{device}] {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
