"""Fixtures for the engine tests: a tiny real shard set (train + val), and helpers that start real
training processes (bash launcher, `deepspeed` launcher, or one process per rank with torch env vars)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 train clips in 2 shards + 4 val clips, H.264, 32 px, 12 frames: real encodes, real shard writer."""
    from data_shards import format as fmt
    from data_shards.shardio import write_shard
    from data_shards.synth import MOTIONS, SynthSpec, encode_clip, render_clip

    folder = tmp_path_factory.mktemp("shards")
    spec = SynthSpec(videos=20, classes=4, frames=12, size=32, codec="h264", seed=3)
    tmp = folder / "tmp"
    tmp.mkdir()

    def sample(i: int) -> fmt.Sample:
        frames, motion = render_clip(i, spec)
        path = tmp / f"{i}.mp4"
        encode_clip(frames, path, spec.codec, spec.fps)
        vid = f"videos/{i:06d}_{motion}.mp4"
        meta = {"id": vid, "codec": "h264", "frames": spec.frames, "height": 32, "width": 32}
        return fmt.Sample(fmt.sample_key(vid), path.read_bytes(), "mp4", MOTIONS.index(motion), meta)

    infos = [
        write_shard(folder / fmt.shard_name("train", 0), [sample(i) for i in range(0, 8)]),
        write_shard(folder / fmt.shard_name("train", 1), [sample(i) for i in range(8, 16)]),
        write_shard(folder / fmt.shard_name("val", 0), [sample(i) for i in range(16, 20)]),
    ]
    splits = {}
    for split in ("train", "val"):
        mine = [i for i in infos if i.split == split]
        splits[split] = fmt.SplitInfo(
            samples=sum(i.samples for i in mine), shards=len(mine), bytes=sum(i.bytes for i in mine)
        )
    fmt.Manifest(classes=list(MOTIONS[:4]), shards=infos, splits=splits, options={"synthetic": True}).save(
        folder
    )
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return folder
