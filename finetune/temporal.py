"""Labelled segments from a temporal model, and how good they are.

A temporal model scores every temporal token of a clip ([T', K], class 0 = background). On a whole video,
`predict` slides clips over it (`data_shards.loader.pyav.decode_windows`), `frame_scores` spreads each
token's scores over the source frames it covers and averages overlapping windows, and `segments_of` turns
the per-frame classes into segments (runs of one action class; score = its mean probability over the run).
`segment_map` is the ActivityNet / THUMOS detection metric: per class, detections ranked by score are
matched greedily to unmatched ground truth at temporal IoU ≥ t, AP = area under the interpolated
precision-recall curve, mean over the classes that have ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

TIOU_THRESHOLDS = (0.3, 0.5, 0.7)


@dataclass(frozen=True)
class Segment:
    """A labelled time range of a video (seconds) with a score (1.0 for ground truth)."""

    start: float
    end: float
    label: int
    score: float = 1.0

    def to_json(self, names: Sequence[str]) -> dict[str, object]:
        return {
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "label": names[self.label],
            "score": round(self.score, 6),
        }


def frame_scores(
    window_scores_WTK: torch.Tensor, starts: Sequence[int], frames: int, stride: int, n_frames: int
) -> torch.Tensor:
    """Per source frame class scores [n_frames, K]: token j of the window starting at frame s covers source
    frames [s + j·r·stride, s + (j+1)·r·stride) with r = frames / T' sampled frames per token; where windows
    overlap their scores are averaged; frames no window reaches take the nearest covered frame's scores."""
    _, steps, k = window_scores_WTK.shape
    total = torch.zeros(n_frames, k, dtype=torch.float64)
    count = torch.zeros(n_frames, dtype=torch.float64)
    span = frames / steps * stride  # source frames per token
    for scores_TK, s in zip(window_scores_WTK.double(), starts):
        for j in range(steps):
            lo, hi = round(s + j * span), round(s + (j + 1) * span)
            lo, hi = min(lo, n_frames), min(max(hi, lo + 1), n_frames)
            total[lo:hi] += scores_TK[j]
            count[lo:hi] += 1
    covered = torch.nonzero(count).flatten()
    if len(covered) == 0:
        return total.float()
    nearest = covered[(torch.arange(n_frames).unsqueeze(1) - covered).abs().argmin(1)]
    return (total[nearest] / count[nearest].unsqueeze(1)).float()


def segments_of(frame_scores_FK: torch.Tensor, fps: float, min_frames: int = 1) -> list[Segment]:
    """Runs of one non-background class in the per-frame argmax, at least `min_frames` long, as segments
    (seconds: frame index / fps), scored by the class's mean probability over the run; best first."""
    pred = frame_scores_FK.argmax(1).tolist()
    out: list[Segment] = []
    start = 0
    for i in range(1, len(pred) + 1):
        if i < len(pred) and pred[i] == pred[start]:
            continue
        c = pred[start]
        if c > 0 and i - start >= min_frames:
            score = float(frame_scores_FK[start:i, c].mean())
            out.append(Segment(start / fps, i / fps, c, score))
        start = i
    return sorted(out, key=lambda s: -s.score)


def tiou(a: Segment, b: Segment) -> float:
    inter = max(0.0, min(a.end, b.end) - max(a.start, b.start))
    union = max(a.end, b.end) - min(a.start, b.start)
    return inter / union if union > 0 else 0.0


def interpolated_ap(tp: np.ndarray, n_truth: int) -> float:
    """Area under the precision-recall curve with precision made monotone (ActivityNet's evaluation)."""
    if n_truth == 0:
        return math.nan
    if len(tp) == 0:
        return 0.0
    ctp = np.cumsum(tp)
    recall = np.concatenate([[0.0], ctp / n_truth, [1.0]])
    precision = np.concatenate([[0.0], ctp / np.arange(1, len(tp) + 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    changed = np.nonzero(recall[1:] != recall[:-1])[0] + 1
    return float(np.sum((recall[changed] - recall[changed - 1]) * precision[changed]))


def segment_ap(
    predicted: dict[str, list[Segment]], truth: dict[str, list[Segment]], label: int, threshold: float
) -> float:
    """AP of one class at one tIoU threshold over a set of videos (keyed alike)."""
    gts = {v: [g for g in segs if g.label == label] for v, segs in truth.items()}
    n_truth = sum(len(g) for g in gts.values())
    dets = sorted(
        ((v, p) for v, segs in predicted.items() for p in segs if p.label == label), key=lambda d: -d[1].score
    )
    used = {v: [False] * len(g) for v, g in gts.items()}
    tp = np.zeros(len(dets))
    for i, (v, p) in enumerate(dets):
        best, which = threshold, -1
        for j, g in enumerate(gts.get(v, [])):
            overlap = tiou(p, g)
            if not used[v][j] and overlap >= best:
                best, which = overlap, j
        if which >= 0:
            used[v][which] = True
            tp[i] = 1.0
    return interpolated_ap(tp, n_truth)


def segment_map(
    predicted: dict[str, list[Segment]],
    truth: dict[str, list[Segment]],
    thresholds: Sequence[float] = TIOU_THRESHOLDS,
) -> dict[str, float]:
    """{"0.3": mAP, "0.5": ..., "0.7": ...}: mean AP over the classes with ground truth."""
    classes = sorted({g.label for segs in truth.values() for g in segs})
    out = {}
    for t in thresholds:
        aps = [segment_ap(predicted, truth, c, t) for c in classes]
        out[f"{t:g}"] = float(np.mean(aps)) if aps else math.nan
    return out
