"""Tasks beyond one label per clip, on the engine: the multi-label head (sigmoid BCE, mAP as PySlowFast
defines it, F1 at the val-tuned threshold) and the temporal head (a class per time step, background
included; segments from sliding windows; segment mAP at tIoU 0.3/0.5/0.7), each end to end from synthetic
videos: build → fine-tune on 2 ranks → evaluate → predict (labels above the threshold; segments and a summary clip)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ft_helpers import PY, REPO, base_env, data_shards, ok, run_cli, run_ranks

from finetune.heads import (
    HEADS,
    MultiLabelHead,
    TemporalHead,
    average_precision,
    head_of,
    multi_hot,
    token_targets,
)
from finetune.temporal import Segment, frame_scores, segment_map, segments_of


def test_average_precision_and_map_follow_scikit_learn_and_pyslowfast() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(2, 30, (1,), generator=g))
        scores = (torch.rand(n, generator=g) * 4).round() / 4  # ties: scored together, as scikit-learn does
        truth = torch.rand(n, generator=g) < 0.4
        if truth.any():
            assert average_precision(scores, truth) == pytest.approx(
                sk.average_precision_score(truth, scores)
            )
    scores = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.4], [0.6, 0.7, 0.3]])
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.float32)  # class 2: no positive
    m = MultiLabelHead().metrics(scores, labels)
    assert m["map"] == pytest.approx((1.0 + 1.0) / 2)  # classes without positives are left out
    assert m["precision_at_1"] == pytest.approx(1.0) and 0.05 <= m["threshold"] <= 0.95
    assert m["f1"] == pytest.approx(1.0)  # some threshold separates them perfectly
    assert MultiLabelHead().metrics(scores, labels, threshold=0.95)["f1"] == pytest.approx(0.0)


def test_multi_label_head_loss_targets_views_and_answers() -> None:
    sets = torch.tensor([[0, 2, -1], [1, -1, -1]])
    hot = multi_hot(sets, 4)
    assert hot.tolist() == [[1, 0, 1, 0], [0, 1, 0, 0]]
    logits = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    head = head_of({"head": "multi_label"})
    assert isinstance(head, MultiLabelHead) and head.view_reduce == "amax"
    torch.testing.assert_close(
        head.loss(logits, head.targets(hot, 4, 0.0)), F.binary_cross_entropy_with_logits(logits, hot)
    )
    weighted = head_of({"head": "multi_label", "pos_weight": 3.0})
    torch.testing.assert_close(
        weighted.loss(logits, hot),
        F.binary_cross_entropy_with_logits(logits, hot, pos_weight=torch.tensor(3.0)),
    )
    torch.testing.assert_close(
        head.combine_views(torch.tensor([[0.2, 0.9], [0.7, 0.1]])), torch.tensor([0.7, 0.9])
    )
    mean = head_of({"head": "multi_label", "view_reduce": "mean"})  # eval.view_reduce=mean
    torch.testing.assert_close(
        mean.combine_views(torch.tensor([[0.2, 0.9], [0.7, 0.1]])), torch.tensor([0.45, 0.5])
    )
    above = head.above(torch.tensor([0.3, 0.8, 0.55, 0.1]), ["a", "b", "c", "d"], 0.5)
    assert [a["label"] for a in above] == ["b", "c"]
    with pytest.raises(ValueError, match="head 'nonsense' is not known"):
        head_of({"head": "nonsense"})


def test_temporal_head_scores_each_token_against_its_middle_frame() -> None:
    frames = torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2]])
    assert token_targets(frames, 4).tolist() == [[0, 1, 1, 2]]
    assert token_targets(frames, 8).tolist() == frames.tolist()
    head = HEADS["temporal"]
    assert isinstance(head, TemporalHead) and not head.per_video
    logits = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        head.loss(logits, head.targets(frames, 3, 0.0)),
        F.cross_entropy(logits[0], torch.tensor([0, 1, 1, 2])),
    )
    perfect = F.one_hot(torch.tensor([[0, 1, 1, 2]]), 3).float()
    m = head.metrics(perfect, frames)
    assert m["frame_acc"] == 1.0 and m["action_acc"] == 1.0


def test_windows_become_segments_and_segment_map_matches_by_tiou() -> None:
    # two windows of 4 frames × stride 1, 2 tokens each, over a 6-frame video at 2 fps
    windows = torch.tensor([[[0.9, 0.1], [0.2, 0.8]], [[0.1, 0.9], [0.3, 0.7]]])
    per_frame = frame_scores(windows, [0, 2], frames=4, stride=1, n_frames=6)
    assert per_frame.argmax(1).tolist() == [0, 0, 1, 1, 1, 1]
    torch.testing.assert_close(per_frame[2], torch.tensor([0.15, 0.85]))  # both windows cover frame 2
    (seg,) = segments_of(per_frame, fps=2.0)
    assert (seg.start, seg.end, seg.label) == (1.0, 3.0, 1)

    truth = {"v": [Segment(1.0, 3.0, 1), Segment(5.0, 6.0, 2)]}
    assert segment_map({"v": [Segment(1.0, 3.0, 1, 0.9), Segment(5.0, 6.0, 2, 0.8)]}, truth) == {
        "0.3": 1.0,
        "0.5": 1.0,
        "0.7": 1.0,
    }
    shifted = {"v": [Segment(1.5, 3.5, 1, 0.9), Segment(5.0, 6.0, 2, 0.8)]}  # tIoU 1.5 / 2.5 = 0.6
    got = segment_map(shifted, truth)
    assert got["0.5"] == 1.0 and got["0.7"] == 0.5
    false_first = {"v": [Segment(7.0, 8.0, 1, 0.95), Segment(1.0, 3.0, 1, 0.5)]}
    assert segment_map(false_first, {"v": truth["v"][:1]})["0.5"] == pytest.approx(
        0.5
    )  # precision 1/2 at recall 1
    assert math.isnan(segment_map({}, {})["0.5"])


def _synth_and_build(root: Path, kind: str, videos: int, frames: int) -> Path:
    flag = {"multi": "--multi-label", "segments": "--segments"}[kind]
    data_shards("synth", "--out", str(root), "--videos", str(videos), "--frames", str(frames), "--size", "32",
                "--codec", "vp9", flag)  # fmt: skip
    table = root / ("segments.csv" if kind == "segments" else "labels.csv")
    # data for the fine-tunes: built in this process, no Ray start
    data_shards(
        "build", str(table), "--out", str(root / "shards"), "--val-fraction", "0.25", "--workers", "0"
    )
    return root / "shards"


def _fine_tune(run: Path, shards: Path, steps: int, *extra: str) -> None:
    args = [
        "--config",
        str(REPO / "finetune" / "configs" / "tiny_cpu.yaml"),
        f"train.run_dir={run}",
        f"data.shards={shards}",
        "data.num_workers=0",
        f"train.steps={steps}",
        "train.micro_batch_size=4",
        "train.eval_every=0",
        "tracking.enabled=false",
        *extra,
    ]
    ok(run_ranks(args, 2, timeout=600))


def _evaluate(model: Path, shards: Path) -> dict:
    r = run_cli(
        [
            "evaluate",
            "--model",
            str(model),
            "--shards",
            str(shards),
            "--split",
            "val",
            "--json",
            "--no-mlflow",
        ]
    )
    ok(r)
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """64 `--multi-label` videos, built, fine-tuned on 2 ranks (R(2+1)D-tiny, 150 steps): (root, run)."""
    root = tmp_path_factory.mktemp("multi")
    shards = _synth_and_build(root / "ml", "multi", 64, 16)
    _fine_tune(
        root / "run",
        shards,
        150,
        "model.backbone=r2plus1d",
        "model.drop_path_rate=0",
        "model.pos_weight=2.0",
        "eval.view_reduce=mean",
    )
    return root, root / "run"


@pytest.fixture(scope="module")
def temporal_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """48 `--segments` videos of 3 s, built, fine-tuned on 2 ranks (ViT-tiny, 300 steps): (root, run)."""
    root = tmp_path_factory.mktemp("temporal")
    shards = _synth_and_build(root / "seg", "segments", 48, 48)
    _fine_tune(root / "run", shards, 300, "optim.lr=3e-3", "optim.warmup_steps=10")
    return root, root / "run"


def test_multi_label_end_to_end_on_two_ranks(multi_run: tuple[Path, Path]) -> None:
    root, run = multi_run
    shards = root / "ml" / "shards"
    extra = json.loads((run / "model" / "config.json").read_text())["extra"]
    assert (
        extra["head"] == "multi_label" and extra["pos_weight"] == 2.0 and 0.05 <= extra["threshold"] <= 0.95
    )
    assert extra["view_reduce"] == "mean"
    r = _evaluate(run / "model", shards)
    chance = json.loads((shards / "manifest.json").read_text())["splits"]["val"]
    assert r["head"] == "multi_label" and r["n"] == chance["samples"]
    prevalence = sum(chance["per_class"].values()) / (4 * chance["samples"])  # mAP of random scores
    assert r["map"] > prevalence + 0.15, (r, prevalence)
    report = (run / "model" / "eval_val" / "report.txt").read_text()
    assert "AP" in report and "move_" in report
    # logged into the fine-tune's MLflow run without the confusion picture that only exclusive labels have
    # (its absence failed the logging)
    from mlflow import MlflowClient

    store = f"sqlite:///{root / 'eval.db'}"
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("ml")).info.run_id
    (run / "mlflow_run.json").write_text(json.dumps({"uri": store, "run_id": run_id}))
    logged = run_cli(["evaluate", "--model", str(run / "model"), "--shards", str(shards), "--split", "val"])
    ok(logged)
    assert "not logged" not in logged.stdout + logged.stderr and run_id in logged.stdout, logged.stdout
    files = {f.path for f in client.list_artifacts(run_id, "eval/model_val")}
    assert files == {"eval/model_val/report.txt", "eval/model_val/metrics.json"}, files

    videos = sorted((root / "ml" / "videos").iterdir())[:3]
    p = run_cli(["predict", "--model", str(run / "model"), *map(str, videos), "--json"])
    ok(p)
    for line in p.stdout.strip().splitlines():
        got = json.loads(line)
        assert len(got["top"]) == 4 and all(a["score"] >= extra["threshold"] for a in got["labels"])
        assert [a["label"] for a in got["labels"]] == [t["label"] for t in got["top"][: len(got["labels"])]]


def test_temporal_segments_end_to_end_on_two_ranks(temporal_run: tuple[Path, Path]) -> None:
    root, run = temporal_run
    shards = root / "seg" / "shards"
    assert json.loads((run / "model" / "config.json").read_text())["config"]["temporal"] is True
    r = _evaluate(run / "model", shards)
    assert r["head"] == "temporal" and r["frame_acc"] > 0.35, r  # 5 classes with background: chance 0.2
    assert set(r["segment_map"]) == {"0.3", "0.5", "0.7"} and r["segment_map"]["0.3"] > 0.2, r
    video = root / "seg" / "videos" / "000000.webm"
    p = run_cli(
        ["predict", "--model", str(run / "model"), str(video), "--json", "--summary", str(root / "summary")]
    )
    ok(p)
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["duration"] == 3.0 and got["windows"] >= 3
    for s in got["segments"]:
        assert 0 <= s["start"] < s["end"] <= 3.0 and s["label"] != "background"
    if got["segments"]:
        import av

        with av.open(got["summary"]) as c:
            assert 0 < c.streams.video[0].frames <= 5 * 16


@pytest.mark.slow  # two Serve starts (≈ 20 s each)
@pytest.mark.parametrize("kind", ["multi", "temporal"])
def test_served_answers_follow_the_head(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Over HTTP: a multi-label model answers every label above its threshold, a temporal model the segments
    `predict` prints (the same Predictor behind both)."""
    import requests
    from ft_helpers import free_port, start_server, stop_server

    root, run = request.getfixturevalue(f"{kind}_run")
    video = sorted((root / ("ml" if kind == "multi" else "seg") / "videos").iterdir())[0]
    port = free_port()
    cmd = [PY, "-m", "finetune", "serve", "--model", str(run / "model"), "--port", str(port)]
    proc = start_server(
        cmd,
        {**base_env(), "RAY_USAGE_STATS_ENABLED": "0"},
        tmp_path / "serve.log",
        f"http://127.0.0.1:{port}/health",
    )
    try:
        got = requests.post(f"http://127.0.0.1:{port}/predict", data=video.read_bytes(), timeout=120)
    finally:
        stop_server(proc)
    assert got.status_code == 200, got.text
    local = run_cli(["predict", "--model", str(run / "model"), str(video), "--json"])
    ok(local)
    want = json.loads(local.stdout.strip().splitlines()[-1])
    if kind == "multi":
        assert [a["label"] for a in got.json()] == [a["label"] for a in want["labels"]]
    else:
        assert [(s["label"], s["start"], s["end"]) for s in got.json()] == [
            (s["label"], s["start"], s["end"]) for s in want["segments"]
        ]
