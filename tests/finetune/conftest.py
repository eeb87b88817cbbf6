"""Fixtures for the fine-tuning tests: a tiny real shard set (train / val / test, H.264 via PyAV), a tiny
MAE model directory (the pretraining export format) and raw video files (good and broken)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


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
