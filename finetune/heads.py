"""Heads: what a kind of label means, from the classifier's logits on. One object per kind owns the loss, the
clip scores, how a video's views are combined, the predictions and the metrics, so training, continual
learning, evaluation, prediction, serving and the MLflow model all call the same code (MMAction2's heads
own their loss and view averaging in the same way).

A model directory names its head in config.json (`extra.head`, default `single_label` for directories
written before heads existed); `head_of` returns it. A new kind of label (several labels per clip, labels per
time step) is a new `Head` subclass registered in `HEADS`; nothing else compares label kinds.
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

    def metrics(self, scores_NK: torch.Tensor, labels_N: torch.Tensor) -> dict[str, float]:
        """Metrics over videos (labels −1: a class the model has no output for, always wrong)."""
        raise NotImplementedError


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

    def metrics(self, scores_NK: torch.Tensor, labels_N: torch.Tensor) -> dict[str, float]:
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


HEADS: dict[str, Head] = {h.kind: h for h in (SingleLabelHead(),)}
DEFAULT_HEAD = SingleLabelHead.kind


def head_of(extra: dict[str, Any] | None = None) -> Head:
    """The head a model directory's `extra` names (`extra.head`; single-label when absent)."""
    kind = (extra or {}).get("head", DEFAULT_HEAD)
    if kind not in HEADS:
        raise ValueError(f"head {kind!r} is not known to this tubelet: it knows {sorted(HEADS)}")
    return HEADS[kind]
