"""Heads: what a kind of label means, from the classifier's logits on. One object per kind owns the loss, the
clip scores, how a video's views are combined, the predictions and the metrics, so training, continual
learning, evaluation, prediction, serving and the MLflow model all call the same code (MMAction2's heads
own their loss and view averaging in the same way).

A model directory names its head in config.json (`extra.head`, default `single_label` for directories
written before heads existed); `head_of` returns it. A new kind of label is a new `Head` subclass registered
in `HEADS`; nothing else compares label kinds. The four:

  single_label  one class per clip: softmax CE, views averaged, top-1 / top-5 (primary: top1)
  multi_label   a set per clip: sigmoid BCE (optional pos_weight), views max-pooled (PySlowFast's Charades
                recipe), mAP over the classes with positives, per-class AP, F1 at the threshold that is best
                on val (stored with the model: `extra.threshold`) (primary: map)
  temporal      a class per time step (background = class 0): CE over the model's temporal tokens, each
                clip scored on its own, frame accuracy (primary: frame_acc); segments and their mAP at
                tIoU 0.3/0.5/0.7 come from `finetune/temporal.py` on whole videos
  av_sync       audio-visual synchronisation: the classes are the shifts of the sound the loader draws
                (`audio.offsets`, 0 = in sync); the model hears the clip's sound too (`inputs`); softmax CE,
                views averaged; sync accuracy (in sync or not), offset accuracy and mean absolute offset
                error in seconds (primary: sync_acc)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


class Head:
    """The interface; `SingleLabelHead` is the reference implementation."""

    kind = ""
    view_reduce = "mean"  # how a video's clip scores combine (torch scatter_reduce: "mean" | "amax")
    per_video = True  # metrics over videos (views combined); False: every clip on its own (its own times)
    thresholded = False  # answers are the labels above a decision threshold (`extra.threshold`), not a top k
    primary = "top1"  # the metric best-model tracking, early stopping and search maximise
    metric_names: tuple[str, ...] = ("top1", "top5", "loss")  # what `metrics` returns, in report order

    def batch_labels(self, batch: dict[str, Any], num_classes: int) -> torch.Tensor:
        """What `targets`, `accuracy` and `metrics` take from a loader batch (here: "label" [B])."""
        return batch["label"]

    def inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """What the model takes besides the video (here: nothing; av_sync: the clip's sound)."""
        return ()

    def verdict(self, scores_K: torch.Tensor) -> dict[str, Any]:
        """Fields a prediction of one video adds to its answer (av_sync: the estimated offset)."""
        return {}

    def targets(self, labels_B: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
        """Training targets [B, K] (what Mixup/CutMix mix)."""
        raise NotImplementedError

    def loss(self, logits_BK: torch.Tensor, targets_BK: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def accuracy(self, logits_BK: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """The training metric of an unmixed batch."""
        raise NotImplementedError

    def clip_scores(self, logits_NK: torch.Tensor) -> torch.Tensor:
        """Per-clip scores [N, K] from logits (float32)."""
        raise NotImplementedError

    def combine_views(self, scores_VK: torch.Tensor) -> torch.Tensor:
        """One video's scores [K] from its views' scores [V, K]."""
        return scores_VK.amax(0) if self.view_reduce == "amax" else scores_VK.mean(0)

    def predictions(self, scores_NK: torch.Tensor) -> torch.Tensor:
        """The predicted class per video [N] (the confusion matrix's columns)."""
        raise NotImplementedError

    def top(self, scores_K: torch.Tensor, labels: list[str], k: int) -> list[dict[str, Any]]:
        """[{"label", "score", "index"}, ...], best first; `k` clipped to [1, number of classes]."""
        k = max(1, min(int(k), len(labels)))
        top = scores_K.topk(k)
        return [
            {"label": labels[i], "score": round(float(p), 6), "index": int(i)}
            for p, i in zip(top.values.tolist(), top.indices.tolist())
        ]

    def metrics(
        self, scores_NK: torch.Tensor, labels_N: torch.Tensor, threshold: float | None = None
    ) -> dict[str, float]:
        """Metrics over videos (labels −1: a class the model has no output for, always wrong); `threshold`
        (multi-label): the decision threshold F1 is measured at (None: the best one on these scores)."""
        raise NotImplementedError

    def answer(
        self, scores_K: torch.Tensor, labels: list[str], k: int, threshold: float
    ) -> list[dict[str, Any]]:
        """What predict / serve / pyfunc answer for a video: its top `k` classes here."""
        return self.top(scores_K, labels, k)

    def confusion_pairs(self, m: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(true, predicted) class per scored item for the confusion matrix and the per-class table (items
        whose class the model does not know are left out); None where classes are not exclusive."""
        known = m["labels"] >= 0
        return m["labels"][known], self.predictions(m["probs"])[known]

    def summary_line(self, r: dict[str, Any]) -> str:
        """An evaluation's headline numbers, e.g. `top-1 91.25%  top-5 100.00%`."""
        return f"top-1 {100 * r['top1']:.2f}%  top-5 {100 * r['top5']:.2f}%"


class SingleLabelHead(Head):
    """One class per clip: soft-target cross-entropy (label smoothing, mixed targets), softmax scores averaged
    over views, top-1 / top-5 accuracy and the negative log-likelihood of the averaged probabilities."""

    kind = "single_label"

    def targets(self, labels_B: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
        off = smoothing / num_classes
        return torch.full((labels_B.shape[0], num_classes), off, device=labels_B.device).scatter_(
            1, labels_B.unsqueeze(1), 1.0 - smoothing + off
        )

    def loss(self, logits_BK: torch.Tensor, targets_BK: torch.Tensor) -> torch.Tensor:
        return torch.sum(-targets_BK * F.log_softmax(logits_BK, dim=-1), dim=-1).mean()

    def accuracy(self, logits_BK: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        return (logits_BK.argmax(-1) == labels_B).float().mean()

    def clip_scores(self, logits_NK: torch.Tensor) -> torch.Tensor:
        return logits_NK.float().softmax(-1)

    def predictions(self, scores_NK: torch.Tensor) -> torch.Tensor:
        return scores_NK.argmax(1)

    def metrics(
        self, scores_NK: torch.Tensor, labels_N: torch.Tensor, threshold: float | None = None
    ) -> dict[str, float]:
        if len(labels_N) == 0:
            return {"top1": math.nan, "top5": math.nan, "loss": math.nan}
        topk = scores_NK.topk(min(5, scores_NK.shape[1]), dim=1).indices
        known = labels_N >= 0
        nll = F.nll_loss(scores_NK[known].clamp_min(1e-12).log(), labels_N[known]) if known.any() else None
        return {
            "top1": float((topk[:, 0] == labels_N).float().mean()),
            "top5": float((topk == labels_N.unsqueeze(1)).any(1).float().mean()),
            "loss": math.nan if nll is None else float(nll),
        }


def multi_hot(sets_BL: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label sets (int [B, L], −1 padded) → float [B, K] 0/1."""
    out = torch.zeros(sets_BL.shape[0], num_classes + 1, device=sets_BL.device)
    idx = torch.where(sets_BL >= 0, sets_BL, torch.full_like(sets_BL, num_classes))
    return out.scatter_(1, idx, 1.0)[:, :num_classes]


def average_precision(scores_N: torch.Tensor, positive_N: torch.Tensor) -> float:
    """Non-interpolated AP (scikit-learn's `average_precision_score`): Σ (R_n − R_{n−1}) P_n over the
    distinct score thresholds, highest first (tied scores enter together). NaN without positives."""
    pos = positive_N.bool()
    n_pos = int(pos.sum())
    if n_pos == 0:
        return math.nan
    order = torch.argsort(scores_N.double(), descending=True, stable=True)
    s, p = scores_N.double()[order], pos[order].double()
    tp, seen = p.cumsum(0), torch.arange(1, len(s) + 1, dtype=torch.float64)
    last = torch.ones(len(s), dtype=torch.bool)  # the last row of each run of tied scores
    last[:-1] = s[1:] != s[:-1]
    tp, seen = tp[last], seen[last]
    recall, precision = tp / n_pos, tp / seen
    gain = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((gain * precision).sum())


def f1_at(scores_NK: torch.Tensor, labels_NK: torch.Tensor, threshold: float) -> tuple[float, float]:
    """(micro F1, macro F1 over classes with positives) of `scores ≥ threshold`."""
    pred, true = scores_NK >= threshold, labels_NK.bool()
    tp, fp, fn = (pred & true).sum(0).double(), (pred & ~true).sum(0).double(), (~pred & true).sum(0).double()
    micro = float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp_min(1))
    has = true.any(0)
    macro = float((2 * tp / (2 * tp + fp + fn).clamp_min(1))[has].mean()) if has.any() else math.nan
    return micro, macro


def best_threshold(scores_NK: torch.Tensor, labels_NK: torch.Tensor) -> float:
    """The threshold (0.05 … 0.95) with the best micro F1 on these scores: tuned on val, stored with the
    model, used by evaluate / predict / serve."""
    grid = [round(0.05 * i, 2) for i in range(1, 20)]
    return max(grid, key=lambda t: (f1_at(scores_NK, labels_NK, t)[0], -abs(t - 0.5)))


class MultiLabelHead(Head):
    """Several labels per clip (PySlowFast's `MULTI_LABEL`): sigmoid scores, binary cross-entropy with an
    optional weight on the positives, views combined by max, mAP over the classes that have positives."""

    kind = "multi_label"
    view_reduce = "amax"
    thresholded = True
    primary = "map"
    metric_names = ("map", "f1", "macro_f1", "threshold", "precision_at_1", "loss")

    def __init__(self, pos_weight: float | None = None, view_reduce: str = "amax") -> None:
        self.pos_weight = pos_weight
        self.view_reduce = view_reduce  # "amax" (PySlowFast) or "mean"

    def batch_labels(self, batch: dict[str, Any], num_classes: int) -> torch.Tensor:
        return multi_hot(batch["labels"], num_classes)

    def targets(self, labels_BK: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
        """Multi-hot targets; smoothing moves them towards 1/2 (BCE's uninformed target)."""
        return labels_BK * (1.0 - smoothing) + 0.5 * smoothing

    def loss(self, logits_BK: torch.Tensor, targets_BK: torch.Tensor) -> torch.Tensor:
        weight = None if self.pos_weight is None else logits_BK.new_tensor(self.pos_weight)
        return F.binary_cross_entropy_with_logits(logits_BK, targets_BK, pos_weight=weight)

    def accuracy(self, logits_BK: torch.Tensor, labels_BK: torch.Tensor) -> torch.Tensor:
        """Precision at 1: the top-scored class is one of the clip's labels."""
        return labels_BK.gather(1, logits_BK.argmax(-1, keepdim=True)).float().mean()

    def clip_scores(self, logits_NK: torch.Tensor) -> torch.Tensor:
        return logits_NK.float().sigmoid()

    def predictions(self, scores_NK: torch.Tensor) -> torch.Tensor:
        return scores_NK.argmax(1)

    def above(self, scores_K: torch.Tensor, labels: list[str], threshold: float) -> list[dict[str, Any]]:
        """Every label scored ≥ `threshold`, best first (what predict / serve return as "labels")."""
        hits = torch.nonzero(scores_K >= threshold).flatten().tolist()
        hits.sort(key=lambda i: -float(scores_K[i]))
        return [{"label": labels[i], "score": round(float(scores_K[i]), 6), "index": int(i)} for i in hits]

    def per_class_ap(self, scores_NK: torch.Tensor, labels_NK: torch.Tensor) -> list[float]:
        return [average_precision(scores_NK[:, k], labels_NK[:, k]) for k in range(scores_NK.shape[1])]

    def metrics(
        self, scores_NK: torch.Tensor, labels_NK: torch.Tensor, threshold: float | None = None
    ) -> dict[str, float]:
        if len(labels_NK) == 0:
            return {name: math.nan for name in self.metric_names}
        aps = [a for a in self.per_class_ap(scores_NK, labels_NK) if not math.isnan(a)]
        t = best_threshold(scores_NK, labels_NK) if threshold is None else threshold
        micro, macro = f1_at(scores_NK, labels_NK, t)
        bce = F.binary_cross_entropy(scores_NK.clamp(1e-7, 1 - 1e-7), labels_NK.float())
        return {
            "map": sum(aps) / len(aps) if aps else math.nan,
            "f1": micro,
            "macro_f1": macro,
            "threshold": t,
            "precision_at_1": float(self.accuracy(scores_NK, labels_NK)),
            "loss": float(bce),
        }

    def answer(
        self, scores_K: torch.Tensor, labels: list[str], k: int, threshold: float
    ) -> list[dict[str, Any]]:
        """Every label at or above the threshold (`k` unused: a clip has as many labels as it has)."""
        return self.above(scores_K, labels, threshold)

    def confusion_pairs(self, m: dict[str, Any]) -> None:
        return None

    def class_rows(self, m: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
        """Per class: AP, videos with the label, F1 at the evaluation's threshold."""
        aps = self.per_class_ap(m["probs"], m["labels"])
        pred, true = m["probs"] >= m["threshold"], m["labels"].bool()
        rows = []
        for k, name in enumerate(names):
            tp, fp = int((pred[:, k] & true[:, k]).sum()), int((pred[:, k] & ~true[:, k]).sum())
            fn = int((~pred[:, k] & true[:, k]).sum())
            f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
            rows.append({"class": name, "ap": aps[k], "f1": f1, "support": int(true[:, k].sum())})
        return rows

    def summary_line(self, r: dict[str, Any]) -> str:
        return (
            f"mAP {100 * r['map']:.2f}%  F1 {100 * r['f1']:.2f}% (macro {100 * r['macro_f1']:.2f}%) at "
            f"threshold {r['threshold']:.2f}  precision@1 {100 * r['precision_at_1']:.2f}%"
        )


def token_targets(frames_BT: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-frame labels [B, T] → one per temporal token [B, T']: the frame at the middle of each token's
    span (T' = T / tubelet for a ViT, the last feature map's length for a CNN)."""
    t = frames_BT.shape[1]
    centre = ((torch.arange(steps, device=frames_BT.device) + 0.5) * t / steps).long().clamp_max(t - 1)
    return frames_BT[:, centre]


class TemporalHead(Head):
    """A class per time step (class 0 = background: no segment there): CE over the model's temporal tokens
    against the label of each token's middle frame; every clip is scored on its own times."""

    kind = "temporal"
    per_video = False
    primary = "frame_acc"
    metric_names = ("frame_acc", "action_acc", "loss")

    def batch_labels(self, batch: dict[str, Any], num_classes: int) -> torch.Tensor:
        if "frame_label" not in batch:
            raise ValueError("the temporal head needs per-frame labels: shards built from segments")
        return batch["frame_label"]

    def targets(self, labels_BT: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
        """Soft targets per frame [B, T, K] (Mixup/CutMix mix them like clip targets)."""
        off = smoothing / num_classes
        return torch.full((*labels_BT.shape, num_classes), off, device=labels_BT.device).scatter_(
            -1, labels_BT.unsqueeze(-1), 1.0 - smoothing + off
        )

    def loss(self, logits_BTK: torch.Tensor, targets_BTK: torch.Tensor) -> torch.Tensor:
        steps = logits_BTK.shape[1]
        centre = token_targets(torch.arange(targets_BTK.shape[1]).expand(1, -1), steps)[0]
        soft = targets_BTK[:, centre.to(targets_BTK.device)]
        return torch.sum(-soft * F.log_softmax(logits_BTK, dim=-1), dim=-1).mean()

    def accuracy(self, logits_BTK: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        """Token accuracy against the middle frame of each token."""
        return (logits_BTK.argmax(-1) == token_targets(labels_BT, logits_BTK.shape[1])).float().mean()

    def clip_scores(self, logits_NTK: torch.Tensor) -> torch.Tensor:
        return logits_NTK.float().softmax(-1)

    def combine_views(self, scores_VTK: torch.Tensor) -> torch.Tensor:
        """A clip's per-step scores averaged over its spatial crops (same times), [T', K]."""
        return scores_VTK.mean(0)

    def predictions(self, scores_NTK: torch.Tensor) -> torch.Tensor:
        return scores_NTK.argmax(-1).flatten()

    def top(self, scores_TK: torch.Tensor, labels: list[str], k: int) -> list[dict[str, Any]]:
        """The clip's classes by mean score over its time steps."""
        return super().top(scores_TK.mean(0) if scores_TK.ndim == 2 else scores_TK, labels, k)

    def metrics(
        self, scores_NTK: torch.Tensor, labels_NT: torch.Tensor, threshold: float | None = None
    ) -> dict[str, float]:
        if len(labels_NT) == 0:
            return {name: math.nan for name in self.metric_names}
        truth = token_targets(labels_NT, scores_NTK.shape[1])
        pred = scores_NTK.argmax(-1)
        action = truth > 0
        nll = F.nll_loss(scores_NTK.clamp_min(1e-12).log().flatten(0, 1), truth.flatten())
        return {
            "frame_acc": float((pred == truth).float().mean()),
            "action_acc": float((pred == truth)[action].float().mean()) if action.any() else math.nan,
            "loss": float(nll),
        }

    def confusion_pairs(self, m: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every temporal token of every clip: its middle frame's class vs the predicted one."""
        truth = token_targets(m["labels"], m["probs"].shape[1])
        return truth.flatten(), m["probs"].argmax(-1).flatten()

    def summary_line(self, r: dict[str, Any]) -> str:
        line = f"frame accuracy {100 * r['frame_acc']:.2f}%  on actions {100 * r['action_acc']:.2f}%"
        if "segment_map" in r:
            line += "  segment mAP " + "  ".join(f"@{t} {100 * v:.1f}%" for t, v in r["segment_map"].items())
        return line


class SyncHead(SingleLabelHead):
    """Audio-visual synchronisation (AVTS's in-sync-or-shifted task, with SyncNet's offset): one class per shift
    of the sound (`offsets`, seconds, + = late; 0 = in sync), the loader's drawn shift per clip ("audio_shift")
    is the label, the sound goes into the model beside the video."""

    kind = "av_sync"
    primary = "sync_acc"
    metric_names = ("sync_acc", "offset_acc", "offset_mae", "loss")

    def __init__(self, offsets: tuple[float, ...] = (-0.4, -0.2, 0.0, 0.2, 0.4)) -> None:
        self.offsets = torch.tensor([float(o) for o in offsets], dtype=torch.float64)

    def batch_labels(self, batch: dict[str, Any], num_classes: int) -> torch.Tensor:
        if "audio_shift" not in batch:
            raise ValueError(
                "the av_sync head needs the clips' sound: a loader with audio (shards built with --audio keep)"
            )
        return batch["audio_shift"]

    def inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        return (batch["audio"],)

    def metrics(
        self, scores_NK: torch.Tensor, labels_N: torch.Tensor, threshold: float | None = None
    ) -> dict[str, float]:
        if len(labels_N) == 0:
            return {name: math.nan for name in self.metric_names}
        pred, true = self.offsets[scores_NK.argmax(1)], self.offsets[labels_N]
        nll = F.nll_loss(scores_NK.clamp_min(1e-12).log(), labels_N)
        return {
            "sync_acc": float(((pred == 0) == (true == 0)).double().mean()),
            "offset_acc": float((pred == true).double().mean()),
            "offset_mae": float((pred - true).abs().mean()),
            "loss": float(nll),
        }

    def verdict(self, scores_K: torch.Tensor) -> dict[str, Any]:
        """The most likely shift of the video's sound (seconds, + = late) and whether that is in sync."""
        offset = float(self.offsets[int(scores_K.argmax())])
        return {"offset": round(offset, 4), "in_sync": offset == 0.0}

    def summary_line(self, r: dict[str, Any]) -> str:
        return (
            f"sync accuracy {100 * r['sync_acc']:.2f}%  offset accuracy {100 * r['offset_acc']:.2f}%  "
            f"mean |offset error| {r['offset_mae']:.3f}s"
        )


HEADS: dict[str, Head] = {
    h.kind: h for h in (SingleLabelHead(), MultiLabelHead(), TemporalHead(), SyncHead())
}
DEFAULT_HEAD = SingleLabelHead.kind


def head_of(extra: dict[str, Any] | None = None) -> Head:
    """The head a model directory's `extra` names (`extra.head`; single-label when absent)."""
    e = extra or {}
    offsets = tuple((e.get("audio") or {}).get("offsets", ())) or None
    return make_head(e.get("head", DEFAULT_HEAD), e.get("pos_weight"), e.get("view_reduce", "auto"), offsets)


def make_head(
    kind: str,
    pos_weight: float | None = None,
    view_reduce: str = "auto",
    offsets: tuple[float, ...] | None = None,
) -> Head:
    """The head of `kind` (a training run's `model.head`), with its options; `view_reduce` (multi-label:
    "max" or "mean" over a video's views; "auto": max); `offsets` (av_sync: the shifts its classes are)."""
    if kind not in HEADS:
        raise ValueError(f"head {kind!r} is not known to this tubelet: it knows {sorted(HEADS)}")
    if kind == SyncHead.kind:
        return SyncHead(offsets) if offsets else HEADS[kind]
    if kind != MultiLabelHead.kind:
        return HEADS[kind]
    return MultiLabelHead(pos_weight, "mean" if view_reduce == "mean" else "amax")
