"""Fixtures for the fine-tuning tests: a tiny real shard set (train / val / test, H.264 via PyAV), a tiny
MAE model directory (the pretraining export format), raw video files (good and broken), video bytes of each
kind a server must refuse, a tiny classifier directory, and two fine-tunes registered in an MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ft_helpers import REGISTERED_NAME, Registry


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Registry versions download into a cache of the test session (inherited by the CLI processes), never
    into the user's ~/.cache/tubelet."""
    import os

    folder = tmp_path_factory.mktemp("tubelet_cache")
    os.environ["TUBELET_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 train + 4 val + 4 test clips, H.264, 32 px, 16 frames: real encodes, real shard writer."""
    from data_shards import format as fmt
    from data_shards.loader.fixtures import make_sample
    from data_shards.shardio import write_shard
    from data_shards.synth import MOTIONS, SynthSpec

    folder = tmp_path_factory.mktemp("ft_shards")
    spec = SynthSpec(videos=20, classes=4, frames=16, size=32, codec="h264", seed=5)
    infos = [
        write_shard(folder / fmt.shard_name("train", 0), [make_sample(i, spec, folder) for i in range(12)]),
        write_shard(folder / fmt.shard_name("val", 0), [make_sample(i, spec, folder) for i in range(12, 16)]),
        write_shard(
            folder / fmt.shard_name("test", 0), [make_sample(i, spec, folder) for i in range(16, 20)]
        ),
    ]
    splits = {i.split: fmt.SplitInfo(samples=i.samples, shards=1, bytes=i.bytes) for i in infos}
    fmt.Manifest(classes=list(MOTIONS[:4]), shards=infos, splits=splits, options={"synthetic": True}).save(
        folder
    )
    return folder


@pytest.fixture(scope="session")
def mae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MAE (pretraining architecture) in the model-directory format, random weights."""
    from pretrain.models import MAEConfig, MaskedVideoAutoencoder, save_model

    torch.manual_seed(0)
    mae = MaskedVideoAutoencoder(MAEConfig.from_preset("tiny", img_size=32, num_frames=8))
    return save_model(mae, tmp_path_factory.mktemp("mae") / "model")


@pytest.fixture(scope="session")
def raw_videos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two good clips (mp4, webm) and a file that is not a video."""
    from data_shards.synth import SynthSpec, encode_clip, render_clip

    folder = tmp_path_factory.mktemp("raw")
    out = []
    for i, (codec, ext) in enumerate((("h264", "mp4"), ("vp9", "webm"))):
        frames, _ = render_clip(i, SynthSpec(videos=2, frames=16, size=48, codec=codec))
        encode_clip(frames, folder / f"good{i}.{ext}", codec, 16)
        out.append(folder / f"good{i}.{ext}")
    bad = folder / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00 ftypisom not really a video" * 10)
    out.insert(1, bad)
    return out


@pytest.fixture(scope="session")
def video_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Good clips (H.264 .mp4, VP9 .webm, 32 frames at 16 fps) and each kind of input a server must refuse:
    empty, not a video, a still image (PNG), audio only, an MP4 cut before its index (moov), a WebM cut at
    60 %."""
    import av
    import numpy as np

    from data_shards.synth import SynthSpec, encode_clip, render_clip

    folder = tmp_path_factory.mktemp("inputs")
    out: dict[str, bytes] = {}
    for i, (codec, ext) in enumerate((("h264", "mp4"), ("vp9", "webm"))):
        frames, _ = render_clip(i, SynthSpec(videos=2, frames=32, size=48, codec=codec))
        encode_clip(frames, folder / f"clip.{ext}", codec, 16)
        out[ext] = (folder / f"clip.{ext}").read_bytes()
    with av.open(str(folder / "audio.m4a"), "w") as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            c.mux(s.encode(frame))
        c.mux(s.encode(None))
    out["audio_only"] = (folder / "audio.m4a").read_bytes()
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(png, "PNG")
    out["still_image"] = png.getvalue()
    out["empty"] = b""
    out["not_a_video"] = b"just some text, certainly not a video\n" * 20
    out["truncated_mp4"] = out["mp4"][: len(out["mp4"]) // 2]
    out["truncated_webm"] = out["webm"][: len(out["webm"]) * 6 // 10]
    return out


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT classifier directory with random weights: the 4 motion classes, 32 px, 8 frames, stride 2,
    2 test clips x 1 crop (what a fine-tune of tiny_cpu.yaml exports)."""
    from data_shards.synth import MOTIONS
    from finetune.config import FinetuneSection
    from finetune.model_dir import export_model_dir
    from pretrain.models import VideoClassifier, VideoClassifierConfig, VideoViTConfig
    from pretrain.models.mae import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    enc = VideoViTConfig.from_preset("tiny", img_size=32, num_frames=8)
    cfg = VideoClassifierConfig(encoder=enc, num_classes=4, class_names=list(MOTIONS[:4]))
    sampling = {
        "stride": 2,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "test_clips": 2,
        "test_crops": 1,
    }
    out = tmp_path_factory.mktemp("tiny_classifier") / "model"
    extra = {"sampling": sampling, "finetune": {"method": "full"}, "step": 0}
    return export_model_dir(VideoClassifier(cfg), cfg, FinetuneSection(), out, extra)


@pytest.fixture(scope="session")
def motion_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 train + 8 val + 24 test clips of the 4 motion classes (H.264, 32 px, 16 frames): enough for a short
    fine-tune from scratch to learn the motion direction (the embedding and registry tests use it)."""
    from data_shards import format as fmt
    from data_shards.loader.fixtures import make_sample
    from data_shards.shardio import write_shard
    from data_shards.synth import MOTIONS, SynthSpec

    folder = tmp_path_factory.mktemp("motion_shards")
    spec = SynthSpec(videos=112, classes=4, frames=16, size=32, codec="h264", seed=7)
    parts = {"train": range(0, 80), "val": range(80, 88), "test": range(88, 112)}
    infos = [
        write_shard(folder / fmt.shard_name(split, 0), [make_sample(i, spec, folder) for i in ids])
        for split, ids in parts.items()
    ]
    splits = {i.split: fmt.SplitInfo(samples=i.samples, shards=1, bytes=i.bytes) for i in infos}
    manifest = fmt.Manifest(
        classes=list(MOTIONS[:4]), shards=infos, splits=splits, options={"synthetic": True}
    )
    manifest.save(folder)
    return folder


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory, motion_shards: Path) -> Registry:
    from ft_helpers import ft_args, ok, run_cli
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    track = [
        "tracking.enabled=true",
        f"tracking.uri={uri}",
        "tracking.experiment=tubelet-test",
        f"tracking.register_as={REGISTERED_NAME}",
    ]
    runs = (root / "scratch", root / "again")
    learn = [
        "train.steps=300",
        "train.global_batch_size=8",
        "train.micro_batch_size=8",
        "train.eval_every=100",
    ]
    ok(
        run_cli(
            [*ft_args(runs[0], motion_shards, None, *learn, "optim.warmup_steps=10"), *track], timeout=400
        )
    )
    again = run_cli([*ft_args(runs[1], motion_shards, runs[0] / "best"), *track], timeout=300, merge_output=True)
    ok(again)
    (root / "again.log").write_text(again.stdout)  # what a terminal showed (test_mlflow_model)
    MlflowClient(uri, registry_uri=uri).set_registered_model_alias(REGISTERED_NAME, "champion", "1")
    return Registry(uri, REGISTERED_NAME, runs, motion_shards)
