"""Classify raw video files with a model directory: PyAV decode, the loader's eval sampling, top-k.

Sampling and normalisation are the loader's own functions (`data_shards.loader.pyav.decode_views`:
probe → `plan_video` → decode → `views_from_frames`), with the frames/size of the model and the stride
and mean/std recorded at export, so a file is seen exactly as a test-split clip would be.
A file that cannot be read gets an error line naming it; the others are still predicted.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def predict_files(
    model_dir: str | Path,
    videos: list[str],
    *,
    top_k: int = 5,
    clips: int | None = None,
    crops: int | None = None,
    stride: int | None = None,
) -> Iterator[dict[str, Any]]:
    """One result per file, in order: {"video", "top": [{"label", "index", "prob"}...]} or {"video", "error"}."""
    from data_shards.loader.pyav import decode_views
    from finetune.evaluate import sampling_for
    from finetune.export import load_finetuned, model_extra

    model = load_finetuned(model_dir)
    spec = sampling_for(model, model_extra(model_dir), clips or 1, crops or 1, stride)
    names = model.cfg.class_names or [str(i) for i in range(model.cfg.num_classes)]
    k = max(1, min(top_k, model.cfg.num_classes))
    for video in videos:
        try:
            views_VCTHW = decode_views(Path(video).read_bytes(), spec, None)
            with torch.no_grad():
                probs = model(views_VCTHW).float().softmax(-1).mean(0)
        except Exception as e:  # unreadable, truncated, not a video: report it and go on
            yield {"video": video, "error": f"{type(e).__name__}: {e}"}
            continue
        top = probs.topk(k)
        yield {
            "video": video,
            "top": [
                {"label": names[i], "index": int(i), "prob": round(float(p), 6)}
                for p, i in zip(top.values.tolist(), top.indices.tolist())
            ],
        }


def print_predictions(results: Iterator[dict[str, Any]], as_json: bool) -> int:
    """Print each result (JSON lines or text); returns the number of failed files."""
    import json

    failed = 0
    for r in results:
        if "error" in r:
            failed += 1
            if as_json:
                print(json.dumps(r), flush=True)
            print(f"error: {r['video']}: {r['error']}", file=sys.stderr, flush=True)
            continue
        if as_json:
            print(json.dumps(r), flush=True)
        else:
            tops = "  ".join(f"{t['label']} {t['prob']:.3f}" for t in r["top"])
            print(f"{r['video']}: {tops}", flush=True)
    return failed
