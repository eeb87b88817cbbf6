"""Multi-label and temporal-segment fine-tuning on synthetic videos, each against chance and a simple
baseline computed on the same test clips.

  multi-label  `synth --multi-label` (1-3 shapes, each its own motion): R(2+1)D-tiny from scratch, sigmoid
               BCE. Test mAP vs chance (random scores: AP = the class's prevalence) and F1 at the val-tuned
               threshold vs the single-label answer (only the top-scored class per clip, same model).
  temporal     `synth --segments` (still / moving stretches, 64 frames): ViT-tiny from scratch, a class per
               temporal token. Test frame accuracy vs chance (1 / classes), the majority class, and the
               clip-level answer (the same model's scores averaged over each clip: one class per clip); segment
               mAP at tIoU 0.3 / 0.5 / 0.7 from sliding windows over whole videos, vs the same windows each
               answering one class (a clip classifier slid over the video: the usual localization baseline).

    .venv/bin/python tests/bench/bench_tasks.py [--work /tmp/bench_tasks] [--videos 240]

Prints one summary line (`tasks: ...`); the per-task numbers above it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}


def sh(*args: str) -> None:
    subprocess.run(
        [PY, *args], cwd=REPO, env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def make_set(root: Path, flag: str, videos: int, frames: int) -> Path:
    table = root / ("segments.csv" if flag == "--segments" else "labels.csv")
    if not table.is_file():
        sh("-m", "data_shards", "synth", "--out", str(root), "--videos", str(videos), "--frames", str(frames),
           "--size", "32", "--codec", "vp9", flag)  # fmt: skip
    if not (root / "shards" / "manifest.json").is_file():
        sh("-m", "data_shards", "build", str(table), "--out", str(root / "shards"), "--val-fraction", "0.15",
           "--test-fraction", "0.15")  # fmt: skip
    return root / "shards"


def fine_tune(run: Path, shards: Path, steps: int, *extra: str) -> float:
    t0 = time.perf_counter()
    if not (run / "best" / "config.json").is_file():
        sh("-m", "finetune", "--config", "finetune/configs/tiny_cpu.yaml", f"data.shards={shards}",
           f"train.run_dir={run}", f"train.steps={steps}", f"train.eval_every={steps // 5}",
           "tracking.enabled=false", "model.drop_path_rate=0", *extra)  # fmt: skip
    return time.perf_counter() - t0


def test_scores(model: Path, shards: Path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The evaluation's own scoring of the test split: (metrics, scores, labels)."""
    from data_shards.loader import build_loader
    from finetune.evaluate import collect_scores, summarize
    from finetune.model_dir import open_model_dir

    opened = open_model_dir(model)
    loader = build_loader(shards, "test", batch_size=8, spec=opened.spec, backend="pyav", num_workers=0,
                          drop_last=False)  # fmt: skip
    with torch.no_grad():
        keys, probs, labels = collect_scores(
            opened.model, loader, torch.device("cpu"), torch.float32, opened.head
        )
    m = summarize(keys, probs, labels, opened.head, opened.extra.get("threshold"))
    return m, m["probs"], m["labels"]


def multi_label(work: Path, videos: int) -> dict:
    from finetune.heads import f1_at

    shards = make_set(work / "multi", "--multi-label", videos, 16)
    run = work / "multi" / "run"
    seconds = fine_tune(run, shards, 300, "model.backbone=r2plus1d")
    m, probs, labels = test_scores(run / "best", shards)
    chance = float(labels.mean(0)[labels.any(0)].mean())
    top1_only = torch.zeros_like(probs).scatter_(1, probs.argmax(1, keepdim=True), 1.0)
    return {
        "videos": m["n"],
        "map": m["map"],
        "chance_map": chance,
        "f1": m["f1"],
        "threshold": m["threshold"],
        "top1_only_f1": f1_at(top1_only, labels, 0.5)[0],
        "seconds": seconds,
    }


def clip_level_segment_map(model: Path, loader: object) -> dict[str, float]:
    """The clip-classifier baseline of temporal localization: the same windows slid over each video, but
    each window answers one class for all its time steps (its scores averaged over its tokens)."""
    from data_shards.loader.pyav import decode_windows
    from finetune.predict import Predictor
    from finetune.temporal import Segment, frame_scores, segment_map, segments_of

    p = Predictor(model)
    predicted, truth = {}, {}
    for ref in loader.refs:
        w = decode_windows(loader.reader.video_bytes(ref), p.spec)
        scores = p.clip_outputs(w.views, False)
        flat = scores.mean(1, keepdim=True).expand_as(scores)
        per_frame = frame_scores(flat, w.starts, p.spec.frames, p.spec.stride, w.frames)
        predicted[ref.ref] = segments_of(
            per_frame, w.fps, min_frames=p.spec.frames // scores.shape[1] * p.spec.stride
        )
        truth[ref.ref] = [Segment(a, b, c) for a, b, c in ref.segments]
    return segment_map(predicted, truth)


def temporal(work: Path, videos: int) -> dict:
    from finetune.evaluate import segment_metrics
    from finetune.heads import token_targets

    shards = make_set(work / "segments", "--segments", videos, 64)
    run = work / "segments" / "run"
    seconds = fine_tune(run, shards, 1000)
    m, probs, labels = test_scores(run / "best", shards)
    truth = token_targets(labels, probs.shape[1])
    classes = probs.shape[-1]
    from data_shards.loader import build_loader
    from data_shards.loader.sampling import SamplingSpec

    train = build_loader(shards, "train", batch_size=8, spec=SamplingSpec(frames=8, stride=2, size=32,
                         train=False), backend="pyav", num_workers=0, drop_last=False)  # fmt: skip
    counts = torch.bincount(torch.cat([b["frame_label"].flatten() for b in train]), minlength=classes)
    majority = int(counts.argmax())
    clip_level = probs.mean(1).argmax(-1, keepdim=True).expand_as(truth)
    test = build_loader(shards, "test", batch_size=8, spec=SamplingSpec(frames=8, stride=2, size=32, train=False),
                        backend="pyav", num_workers=0, drop_last=False)  # fmt: skip
    return {
        "clips": m["n"],
        "frame_acc": m["frame_acc"],
        "chance": 1.0 / classes,
        "majority": float((truth == majority).float().mean()),
        "clip_level": float((clip_level == truth).float().mean()),
        "segment_map": segment_metrics(run / "best", test),
        "clip_level_segment_map": clip_level_segment_map(run / "best", test),
        "seconds": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/bench_tasks")
    p.add_argument("--videos", type=int, default=240)
    a = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = Path(a.work)
    ml = multi_label(work, a.videos)
    print("multi-label:", json.dumps(ml), flush=True)
    tp = temporal(work, a.videos)
    print("temporal:", json.dumps(tp), flush=True)
    seg, base = tp["segment_map"], tp["clip_level_segment_map"]
    print(
        f"tasks: multi-label test mAP {ml['map']:.3f} (chance {ml['chance_map']:.3f}), F1 {ml['f1']:.3f} at "
        f"{ml['threshold']:.2f} vs top-1 only {ml['top1_only_f1']:.3f} | temporal frame acc {tp['frame_acc']:.3f} "
        f"(chance {tp['chance']:.3f}, majority {tp['majority']:.3f}, clip-level {tp['clip_level']:.3f}), segment "
        f"mAP@0.3/0.5/0.7 {seg['0.3']:.3f}/{seg['0.5']:.3f}/{seg['0.7']:.3f} vs clip-level windows "
        f"{base['0.3']:.3f}/{base['0.5']:.3f}/{base['0.7']:.3f}"
    )


if __name__ == "__main__":
    main()
