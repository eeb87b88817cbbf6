"""Audio-visual synchronisation on synthetic videos with sound, against chance and an audio-only baseline on the
same test clips.

The set: `synth --audio` (a click whenever the picture flashes, at irregular times), built with `--audio keep`.
Each clip's sound is shifted by one of -0.4 / -0.2 / 0 / +0.2 / +0.4 s (in sync for half of them, drawn per
video, keyed); the task says whether it is in sync and by which shift. Runs, each fine-tuned from scratch unless
said otherwise, evaluated on the test split:

  vit        ViT-tiny + audio branch, full fine-tuning
  cnn_rnn    the CNN+RNN backbone + audio branch, full fine-tuning
  lora       ViT-tiny from a tiny MAE pretrained on the same clips (300 steps), LoRA + the audio branch
  audio      the vit run's recipe with the picture ignored (`audio.modality=audio`): the audio-only baseline
  chance     always answering "in sync" (the majority class)

and the vit model's `predict` on new clips whose sound was recorded late (+0.2 s) or early (-0.4 s): how many
offsets it recovers exactly.

    .venv/bin/python tests/bench/bench_sync.py [--work /tmp/bench_sync] [--videos 240]

Prints one summary line (`av_sync: ...`); the per-run numbers above it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}
SYNC = "finetune/configs/tiny_cpu_sync.yaml"


def sh(*args: str) -> str:
    p = subprocess.run([PY, *args], cwd=REPO, env=ENV, check=True, capture_output=True, text=True)
    return p.stdout


def make_set(root: Path, videos: int) -> Path:
    if not (root / "labels.csv").is_file():
        sh(
            "-m",
            "data_shards",
            "synth",
            "--out",
            str(root),
            "--videos",
            str(videos),
            "--size",
            "32",
            "--audio",
        )
    if not (root / "shards" / "manifest.json").is_file():
        sh("-m", "data_shards", "build", str(root / "labels.csv"), "--out", str(root / "shards"), "--audio", "keep",
           "--val-fraction", "0.15", "--test-fraction", "0.15")  # fmt: skip
    return root / "shards"


def fine_tune(run: Path, shards: Path, *extra: str) -> float:
    t0 = time.perf_counter()
    if not (run / "best" / "config.json").is_file():
        sh("-m", "finetune", "--config", SYNC, f"data.shards={shards}", f"train.run_dir={run}",
           "tracking.enabled=false", *extra)  # fmt: skip
    return time.perf_counter() - t0


def evaluate(model: Path, shards: Path) -> dict:
    out = sh("-m", "finetune", "evaluate", "--model", str(model), "--shards", str(shards), "--split", "test",
             "--json", "--no-mlflow")  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def majority(shards: Path) -> float:
    """The share of in-sync test clips: what always answering "in sync" scores."""
    from data_shards.loader import build_loader
    from data_shards.loader.audio import AudioSpec
    from data_shards.loader.sampling import SamplingSpec

    spec = SamplingSpec(
        frames=8, stride=2, size=32, train=False, audio=AudioSpec(offsets=(-0.4, -0.2, 0.0, 0.2, 0.4))
    )
    loader = build_loader(
        shards, "test", batch_size=8, spec=spec, backend="pyav", num_workers=0, drop_last=False
    )
    offsets = [float(o) for b in loader for o in b["audio_offset"]]
    return sum(o == 0 for o in offsets) / len(offsets)


def recovered(model: Path, work: Path) -> tuple[int, int]:
    """Exact offsets `predict` finds on 10 new clips recorded late (+0.2 s) and 10 early (-0.4 s)."""
    hits = total = 0
    for delay in ("0.2", "-0.4"):
        folder = work / f"delay{delay}"
        if not (folder / "labels.csv").is_file():
            sh("-m", "data_shards", "synth", "--out", str(folder), "--videos", "10", "--size", "32", "--seed", "99",
               "--audio", "--audio-delay", delay)  # fmt: skip
        out = sh("-m", "finetune", "predict", "--model", str(model), str(folder / "videos"), "--json")
        got = [json.loads(line)["offset"] for line in out.strip().splitlines()]
        hits += sum(abs(o - float(delay)) < 1e-6 for o in got)
        total += len(got)
    return hits, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_sync"))
    ap.add_argument("--videos", type=int, default=240)
    args = ap.parse_args()
    work = args.work
    shards = make_set(work / "set", args.videos)
    pre = work / "pretrain"
    if not (pre / "model.json").is_file():
        sh("-m", "pretrain", "--config", "pretrain/configs/tiny_cpu.yaml", f"data.shards={shards}",
           f"train.run_dir={pre}", "train.steps=300", "tracking.enabled=false")  # fmt: skip
    runs = {
        "vit": (),
        "cnn_rnn": ("model.backbone=cnn_rnn", "optim.lr=3e-3"),
        "lora": (f"finetune.init={pre}", "finetune.method=lora"),
        "audio": ("audio.modality=audio",),
    }
    results = {}
    for name, extra in runs.items():
        seconds = fine_tune(work / name, shards, *extra)
        r = evaluate(work / name / "best", shards)
        results[name] = {k: round(r[k], 3) for k in ("sync_acc", "offset_acc", "offset_mae")}
        print(f"{name}: {json.dumps(results[name])} ({seconds:.0f}s)", flush=True)
    chance = majority(shards)
    hits, total = recovered(work / "vit" / "best", work)
    runs_line = "  ".join(
        f"{n} {100 * r['sync_acc']:.1f}/{100 * r['offset_acc']:.1f}" for n, r in results.items()
    )
    print(
        f"av_sync (test sync/offset accuracy %): {runs_line}  chance {100 * chance:.1f}/{100 * chance:.1f}  "
        f"vit recovers {hits}/{total} recorded delays (+0.2 s, -0.4 s)"
    )


if __name__ == "__main__":
    main()
