"""Evaluation maths and task-level logic on crafted inputs: per-video multi-view averaging with padding,
the classification report, CutMix / Mixup for video, early stopping and the best-model bookkeeping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.augment import mix_batch
from finetune.config import AugmentSection, FinetuneConfig
from finetune.evaluate import average_per_video, summarize
from finetune.heads import SingleLabelHead
from finetune.reports import classification_report
from finetune.task import ClassificationTask
from pretrain.engine import load_config


def test_views_are_averaged_per_video_and_padding_is_ignored() -> None:
    # video a: 3 views, the average favours class 0 though one view says class 2
    # video b: 2 views -> class 1; video c: one view -> class 2 (wrong: label 0)
    keys = ["a", "a", "a", "b", "b", "c"]
    probs = torch.tensor(
        [
            [0.6, 0.1, 0.3],
            [0.5, 0.2, 0.3],
            [0.2, 0.1, 0.7],  # mean over a: [0.433, 0.133, 0.433] -> tie broken by order: class 0
            [0.1, 0.8, 0.1],
            [0.3, 0.4, 0.3],
            [0.1, 0.2, 0.7],
        ]
    )
    labels = torch.tensor([0, 0, 0, 1, 1, 0])
    vkeys, vprobs, vlabels = average_per_video(keys, probs, labels)
    assert vkeys == ["a", "b", "c"]
    torch.testing.assert_close(vprobs[0], probs[:3].mean(0))
    torch.testing.assert_close(vprobs[1], probs[3:5].mean(0))
    assert vlabels.tolist() == [0, 1, 0]
    m = summarize(keys, probs, labels)
    assert m["n"] == 3
    assert m["top1"] == pytest.approx(2 / 3)
    assert m["top5"] == 1.0


def test_collect_scores_drops_padding_duplicates() -> None:
    from finetune.evaluate import collect_scores

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, 0, 0, 0, :2]  # logits read straight from the "video"

    video = torch.zeros(4, 1, 1, 1, 2)
    video[:, 0, 0, 0] = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0], [0.0, 5.0]])
    batch = {
        "video": video,
        "label": torch.tensor([0, 0, 0, 0]),
        "key": ["x", "x", "y", "y"],
        "view": torch.tensor([0, 1, 0, 1]),
        "pad": torch.tensor([False, False, True, True]),  # video y is a padding duplicate
    }
    keys, probs, labels = collect_scores(Fixed(), [batch], torch.device("cpu"), torch.float32)
    assert keys == ["x", "x"]
    m = summarize(keys, probs, labels)
    assert m["n"] == 1 and m["top1"] == 1.0


def test_classification_report_counts() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2])
    preds = torch.tensor([0, 1, 1, 1, 0])
    rows, cm, text = classification_report(labels, preds, ["x", "y", "z"])
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert rows[0]["precision"] == pytest.approx(0.5) and rows[0]["recall"] == pytest.approx(0.5)
    assert rows[1]["precision"] == pytest.approx(2 / 3) and rows[1]["recall"] == 1.0
    assert rows[2]["f1"] == 0.0 and rows[2]["support"] == 1
    assert "macro avg" in text


def test_cutmix_cuts_the_same_box_from_every_frame() -> None:
    aug = AugmentSection(cutmix=1.0, mixup=0.0)
    video = torch.stack([torch.full((3, 4, 16, 16), float(i)) for i in range(4)])
    targets = SingleLabelHead().targets(torch.tensor([0, 1, 2, 3]), 4, 0.0)
    for seed in range(20):
        mixed, t, lam = mix_batch(video, targets, aug, np.random.default_rng(seed))
        changed = mixed != video  # [B, C, T, H, W]
        box = changed[0, 0, 0]
        assert (changed[0] == box).all(), "the box must be identical over channels and frames"
        area = float(box.float().mean())
        assert lam == pytest.approx(1.0 - area)
        torch.testing.assert_close(t.sum(1), torch.ones(4))
        assert t[0, 0] == pytest.approx(lam) and t[0, 3] == pytest.approx(1 - lam)


def test_mixup_blends_videos_and_targets() -> None:
    aug = AugmentSection(mixup=0.8)
    video = torch.randn(2, 3, 2, 8, 8)
    targets = SingleLabelHead().targets(torch.tensor([0, 1]), 2, 0.1)
    mixed, t, lam = mix_batch(video, targets, aug, np.random.default_rng(0))
    torch.testing.assert_close(mixed[0], lam * video[0] + (1 - lam) * video[1])
    torch.testing.assert_close(t.sum(1), torch.ones(2))
    assert targets[0].tolist() == pytest.approx([0.95, 0.05])


def _task(tmp_path: Path, *over: str) -> ClassificationTask:
    cfg = load_config(
        FinetuneConfig,
        Path(__file__).resolve().parents[2] / "finetune" / "configs" / "tiny_cpu.yaml",
        ["data.backend=synthetic", "model.num_classes=4", f"train.run_dir={tmp_path}", *over],
    )
    cfg.validate()
    return ClassificationTask(cfg)


def test_early_stopping_triggers_after_patience_evaluations(tmp_path: Path) -> None:
    task = _task(tmp_path, "eval.patience=2", "eval.keep_best=false")
    task.build_model()
    history = [0.5, 0.6, 0.6, 0.55]  # best at the 2nd; two evaluations without improvement → stop
    stops = [task.after_evaluate(None, {"top1": v}, step).stop for step, v in enumerate(history, 1)]
    assert stops == [False, False, False, True]
    assert task.best_score == 0.6 and task.best_step == 2
    state = task.state_dict()  # survives a resume
    other = _task(tmp_path, "eval.patience=2", "eval.keep_best=false")
    other.load_state_dict(state)
    assert (other.best_score, other.best_step, other.bad_evals) == (0.6, 2, 2)


def test_best_model_is_written_only_on_improvement(tmp_path: Path) -> None:
    task = _task(tmp_path, "eval.keep_best=true")
    model = task.build_model()
    out = task.after_evaluate(model, {"top1": 0.5}, 10)
    assert out.artifacts and (tmp_path / "best" / "model.safetensors").is_file()
    first = (tmp_path / "best" / "config.json").read_text()
    out = task.after_evaluate(model, {"top1": 0.4}, 20)
    assert not out.artifacts and (tmp_path / "best" / "config.json").read_text() == first
    assert '"val_top1": 0.5' in first


def test_no_val_split_warns_once_naming_the_splits_and_the_missing_best(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from data_shards import format as fmt
    from pretrain.engine import TaskContext

    shards = tmp_path / "shards"  # train + test, no val (planning reads only the manifest)
    shards.mkdir()
    info = {s: fmt.SplitInfo(samples=4, shards=1, bytes=1) for s in ("train", "test")}
    fmt.Manifest(classes=["a", "b", "c", "d"], shards=[], splits=info).save(shards)
    run = tmp_path / "run"
    task = _task(run, f"data.shards={shards}", "data.backend=pyav")
    for rank in (0, 1):
        assert task.val_loader(TaskContext(rank, 2, torch.device("cpu"), 0, run)) is None
    (line,) = capsys.readouterr().out.splitlines()  # rank 0 only
    assert "data.val_split=val is not a split of" in line and "(it has: test, train)" in line
    assert f"no {run / 'best'} will be written" in line and str(run / "model") in line
    # with a val split: no warning
    assert _task(run).val_loader(TaskContext(0, 1, torch.device("cpu"), 0, run)) is not None
    assert capsys.readouterr().out == ""
    # pretraining says it too when a val split is named and evaluation is on (not with val_split null)
    from pretrain.config import PretrainConfig
    from pretrain.task import MaskedVideoTask

    for val, said in (("val", True), ("null", False)):
        cfg = load_config(PretrainConfig, Path(__file__).resolve().parents[2] / "pretrain/configs/tiny_cpu.yaml",
                          [f"data.shards={shards}", "data.backend=pyav", f"data.val_split={val}"])  # fmt: skip
        assert MaskedVideoTask(cfg).val_loader(TaskContext(0, 1, torch.device("cpu"), 0, run)) is None
        out = capsys.readouterr().out
        assert ("[tubelet] warning: no validation (data.val_split=val is not a split of" in out) == said, out


def test_evaluate_run_best_without_a_best_names_run_model(tmp_path: Path) -> None:
    from finetune.registry import resolve_model

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"\({tmp_path / 'model'} is one: the run wrote no best\)"):
        resolve_model(str(tmp_path / "best"))


def test_a_registration_that_could_not_be_made_is_said_at_the_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """MLflow unreachable from the start: the run goes on (a warning then), and where the outcome is read
    it says the model asked to be registered was not."""
    from types import SimpleNamespace

    task = _task(tmp_path, "tracking.register_as=clf")
    task.log_model(tmp_path / "model", SimpleNamespace(active=False, uri="http://127.0.0.1:9"))
    out = capsys.readouterr().out
    assert "NOT registered as 'clf': MLflow at http://127.0.0.1:9 was unavailable" in out
    _task(tmp_path).log_model(tmp_path / "model", SimpleNamespace(active=False, uri="x"))
    assert capsys.readouterr().out == ""  # nothing asked, nothing said
