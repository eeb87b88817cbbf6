"""The head seam: the single-label head computes what torch's cross-entropy and top-k accuracy compute, a model
directory without a head entry is single-label, and per-video combination follows the head's reduction
through evaluation's grouping and the predictor alike."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune.evaluate import average_per_video, summarize
from finetune.heads import HEADS, SingleLabelHead, head_of


def test_single_label_loss_is_cross_entropy_with_label_smoothing() -> None:
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 5, generator=g), torch.tensor([0, 4, 2, 2, 1, 3])
    head = SingleLabelHead()
    got = head.loss(logits, head.targets(labels, 5, 0.1))
    torch.testing.assert_close(got, F.cross_entropy(logits, labels, label_smoothing=0.1))
    assert float(head.accuracy(logits, labels)) == pytest.approx(
        float((logits.argmax(1) == labels).float().mean())
    )


def test_single_label_metrics_and_views() -> None:
    head = SingleLabelHead()
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    m = head.metrics(scores, torch.tensor([0, 1, -1]))  # -1: a class the model has no output for
    assert m["top1"] == pytest.approx(1 / 3) and m["top5"] == pytest.approx(2 / 3)
    assert m["loss"] == pytest.approx(
        -(torch.log(torch.tensor(0.7)) + torch.log(torch.tensor(0.3))).item() / 2
    )
    views = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    torch.testing.assert_close(head.combine_views(views), torch.tensor([0.4, 0.6]))
    assert [t["label"] for t in head.top(torch.tensor([0.1, 0.7, 0.2]), ["a", "b", "c"], 9)] == [
        "b",
        "c",
        "a",
    ]


def test_per_video_grouping_follows_the_heads_reduction() -> None:
    keys = ["b", "a", "b", "a"]
    scores = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.6, 0.4], [0.5, 0.5]])
    order, mean, labels = average_per_video(keys, scores, torch.tensor([1, 0, 1, 0]))
    assert order == ["a", "b"] and labels.tolist() == [0, 1]
    torch.testing.assert_close(mean, torch.tensor([[0.7, 0.3], [0.4, 0.6]]))
    _, peak, _ = average_per_video(keys, scores, torch.tensor([1, 0, 1, 0]), "amax")
    torch.testing.assert_close(peak, torch.tensor([[0.9, 0.5], [0.6, 0.8]]))
    assert summarize(keys, scores, torch.tensor([1, 0, 1, 0]))["top1"] == 1.0


def test_a_model_directory_names_its_head() -> None:
    assert head_of({}) is HEADS["single_label"] and head_of({"head": "single_label"}) is HEADS["single_label"]
    assert head_of({"head": "temporal"}) is HEADS["temporal"]
    with pytest.raises(ValueError, match="head 'multi_labels' is not known"):
        head_of({"head": "multi_labels"})
