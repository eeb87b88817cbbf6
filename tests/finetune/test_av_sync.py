"""Audio-visual synchronisation on the engine: the av_sync head (is the sound in sync with the picture, and by
which shift is it off), the audio branch (lagged correlation of the two streams), its config checks, and end to
end from synthetic videos with sound: build --audio keep → fine-tune on 2 ranks → evaluate → predict recovers
the offset of clips whose sound was recorded late or early."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from ft_helpers import PY, REPO, base_env, data_shards, ok, run_cli, run_ranks

from finetune.config import FinetuneConfig
from finetune.heads import SyncHead, head_of
from finetune.peft_methods import FinetuneSection, apply_method
from pretrain.engine import ConfigError, load_config
from pretrain.models import VideoClassifier, VideoClassifierConfig, VideoViTConfig
from pretrain.models.audio import AudioBranchConfig, lagged_correlation

SYNC = REPO / "finetune" / "configs" / "tiny_cpu_sync.yaml"


def test_sync_head_metrics_and_verdict() -> None:
    head = head_of({"head": "av_sync", "audio": {"offsets": [-0.4, 0.0, 0.4]}})
    assert isinstance(head, SyncHead) and head.primary == "sync_acc"
    scores = torch.tensor([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6]])
    labels = torch.tensor([1, 2, 2, 1])  # truth: in sync, late, late, in sync
    m = head.metrics(scores, labels)
    # predicted: in sync, early, late, late → in-sync-or-not right for rows 0, 1, 2; offset right for 0 and 2
    assert m["sync_acc"] == pytest.approx(0.75) and m["offset_acc"] == pytest.approx(0.5)
    assert m["offset_mae"] == pytest.approx((0 + 0.8 + 0 + 0.4) / 4)
    assert head.verdict(torch.tensor([0.1, 0.2, 0.7])) == {"offset": 0.4, "in_sync": False}
    assert head.batch_labels({"audio_shift": labels}, 3) is labels
    with pytest.raises(ValueError, match="--audio keep"):
        head.batch_labels({"label": labels}, 3)


def _listening_vit(modality: str = "both") -> VideoClassifier:
    enc = VideoViTConfig.from_preset("tiny", img_size=32, num_frames=8)
    audio = AudioBranchConfig(modality=modality)
    return VideoClassifier(VideoClassifierConfig(encoder=enc, num_classes=5, audio=audio))


def test_audio_branch_correlates_the_streams_and_the_baseline_ignores_the_picture() -> None:
    v = torch.zeros(1, 1, 8)
    a = torch.zeros(1, 1, 8)
    v[0, 0, 2], a[0, 0, 5] = 1.0, 1.0  # the sound 3 steps after the picture
    corr = lagged_correlation(v, a, 4)[0, 0]
    assert corr.shape == (9,) and int(corr.argmax()) == 4 + 3
    torch.manual_seed(0)
    model = _listening_vit().eval()
    video, sound = torch.randn(2, 3, 8, 32, 32), torch.randn(2, 64, 101)
    assert model(video, sound).shape == (2, 5)
    with pytest.raises(ValueError, match="pass the clip's sound"):
        model(video)
    deaf_to_pictures = _listening_vit("audio").eval()
    torch.testing.assert_close(deaf_to_pictures(video, sound), deaf_to_pictures(video.flip(0), sound))
    # every PEFT method trains the audio branch (no starting point has one), like the head
    lora = _listening_vit()
    apply_method(lora, FinetuneSection(method="lora"))
    audio = [p.requires_grad for n, p in lora.named_parameters() if n.startswith("audio.")]
    assert audio and all(audio)
    assert not any(p.requires_grad for n, p in lora.named_parameters() if ".qkv.base_layer" in n)


def test_a_pretrained_video_model_starts_the_picture_side(mae_dir: Path) -> None:
    """From a pretraining: the encoder's weights load, the audio branch and head are new (named as such)."""
    from finetune.init import format_init_report, load_init_weights
    from pretrain.sources import load_source

    model = _listening_vit()
    report = load_init_weights(model, load_source(mae_dir))
    new = [k for keys in report["expected_new"].values() for k in keys]
    assert any(k.startswith("audio.") for k in new) and not report["unexpected_other"]
    assert "new audio branch" in format_init_report(report)
    src = load_source(mae_dir).state_dict
    torch.testing.assert_close(model.encoder.patch_embed.proj.weight, src["encoder.patch_embed.proj.weight"])


def _synth(root: Path, videos: int, *extra: str) -> Path:
    data_shards("synth", "--out", str(root), "--videos", str(videos), "--size", "32", *extra)
    return root / "labels.csv"


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """64 clips with sound (H.264 + AAC), built with --audio keep, fine-tuned on 2 ranks (ViT-tiny from
    scratch, 150 steps): (root, run)."""
    root = tmp_path_factory.mktemp("sync")
    table = _synth(root / "src", 64, "--audio")
    data_shards("build", str(table), "--out", str(root / "shards"), "--audio", "keep", "--workers", "0",
                "--val-fraction", "0.25")  # fmt: skip
    args = [
        "--config",
        str(SYNC),
        f"train.run_dir={root / 'run'}",
        f"data.shards={root / 'shards'}",
        "data.backend=pyav",
        "data.num_workers=0",
        "train.steps=150",
        "train.micro_batch_size=8",
        "train.eval_every=0",
        "tracking.enabled=false",
    ]
    ok(run_ranks(args, 2, timeout=600))
    return root, root / "run"


def test_sync_end_to_end_on_two_ranks(sync_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, run = sync_run
    extra = json.loads((run / "model" / "config.json").read_text())["extra"]
    assert extra["head"] == "av_sync" and extra["audio"]["offsets"] == [-0.4, -0.2, 0.0, 0.2, 0.4]
    r = run_cli(
        [
            "evaluate",
            "--model",
            str(run / "model"),
            "--shards",
            str(root / "shards"),
            "--split",
            "val",
            "--json",
            "--no-mlflow",
        ]
    )
    ok(r)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["head"] == "av_sync" and got["n"] > 15
    # chance: always "in sync" is right for about half the clips (sync_prob 0.5)
    assert got["sync_acc"] >= 0.85 and got["offset_acc"] >= 0.6, got
    assert (run / "model" / "eval_val" / "report.txt").read_text().count("sound late") == 2

    folders = {}
    for delay in ("0.2", "-0.4", "0"):
        folders[float(delay)] = tmp_path / f"d{delay}" / "videos"
        _synth(folders[float(delay)].parent, 3, "--audio", "--seed", "11", "--audio-delay", delay)
    p = run_cli(["predict", "--model", str(run / "model"), *map(str, folders.values()), "--json"])
    ok(p)
    rows = [json.loads(line) for line in p.stdout.strip().splitlines()]
    answers = {d: [r["offset"] for r in rows if Path(r["video"]).parent == f] for d, f in folders.items()}
    for delay, offsets in answers.items():
        assert len(offsets) == 3 and sum(o == pytest.approx(delay) for o in offsets) >= 2, answers
    # the MLflow pyfunc model (same Predictor): the offset classes by name; its logged example has sound
    import pandas as pd

    from finetune.mlflow_model import VideoClassifierModel, example_clip
    from finetune.predict import Predictor

    pyfunc = VideoClassifierModel()
    pyfunc.predictor = Predictor(run / "model")
    late = sorted(str(v) for v in (tmp_path / "d0.2" / "videos").iterdir())
    rows = pyfunc.predict(None, pd.DataFrame({"path": late}))
    assert (rows["label"] == "sound late 0.20s").sum() >= 2, rows
    example = pyfunc.predict(None, pd.DataFrame({"video": [example_clip(run / "model")]}))
    assert example["error"][0] is None and example["label"][0] in pyfunc.predictor.labels
    mute = tmp_path / "mute"
    _synth(mute, 1)
    p = run_cli(["predict", "--model", str(run / "model"), str(mute / "videos"), "--json"])
    assert p.returncode != 0, (p.stdout, p.stderr)
    error = json.loads(p.stdout.strip().splitlines()[0])["error"]
    assert "no audio stream" in error and "--audio" not in error  # predict has no build options to suggest
    # no embeddings from a model that listens (its features are per time step, paired with the sound)
    e = run_cli(["embed", "--model", str(run / "model"), "--shards", str(root / "shards"), "--split", "val",
                 "--out", str(tmp_path / "e.npy")])  # fmt: skip
    assert e.returncode == 2 and "is an audio-visual model" in e.stderr and not (tmp_path / "e.npy").exists()


def test_config_names_what_a_sync_run_needs(sync_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = sync_run
    mute = tmp_path / "mute"  # the same shards, as a build without --audio would describe them
    shutil.copytree(root / "shards", mute)
    manifest = json.loads((mute / "manifest.json").read_text())
    manifest["options"]["ingest"]["audio"] = "drop"
    (mute / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"built without it .*--audio keep"):
        load_config(FinetuneConfig, SYNC, [f"data.shards={mute}"]).validate()
    load_config(FinetuneConfig, SYNC, [f"data.shards={root / 'shards'}"]).validate()
    for over, why in (
        (["audio.offsets=[-0.2,0.2]"], "needs 0.0"),
        (["audio.offsets=[0.2,0.0]"], "increasing order"),
        (["audio.offsets=[0.0,1.5]"], "within audio.seconds"),
        (["augment.mixup=0.8"], "mixup / cutmix"),
    ):
        with pytest.raises(ConfigError, match=why):
            load_config(FinetuneConfig, SYNC, [f"data.shards={root / 'shards'}", *over]).validate()


@pytest.mark.slow  # a Serve start (≈ 20 s)
def test_served_sync_model_answers_the_offset(sync_run: tuple[Path, Path], tmp_path: Path) -> None:
    """Over HTTP: the offset classes by name, as `predict` ranks them; a video without sound is a 422."""
    import requests
    from ft_helpers import free_port, start_server, stop_server

    _, run = sync_run
    _synth(tmp_path / "late", 1, "--audio", "--seed", "11", "--audio-delay", "0.2")
    video = next((tmp_path / "late" / "videos").iterdir())
    _synth(tmp_path / "mute", 1)
    mute = next((tmp_path / "mute" / "videos").iterdir())
    port = free_port()
    cmd = [PY, "-m", "finetune", "serve", "--model", str(run / "model"), "--port", str(port)]
    env = {**base_env(), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = start_server(cmd, env, tmp_path / "serve.log", f"http://127.0.0.1:{port}/health")
    try:
        got = requests.post(f"http://127.0.0.1:{port}/predict", data=video.read_bytes(), timeout=120)
        silent = requests.post(f"http://127.0.0.1:{port}/predict", data=mute.read_bytes(), timeout=120)
        meta = requests.get(f"http://127.0.0.1:{port}/metadata", timeout=30).json()
    finally:
        stop_server(proc)
    assert got.status_code == 200, got.text
    local = run_cli(["predict", "--model", str(run / "model"), str(video), "--json"])
    ok(local)
    want = json.loads(local.stdout.strip().splitlines()[-1])
    assert [a["label"] for a in got.json()] == [t["label"] for t in want["top"]]
    assert silent.status_code == 422 and "no_audio_stream" in silent.text
    assert meta["head"] == "av_sync"
