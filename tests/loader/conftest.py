"""Fixture shard sets for the loader tests: real VP9 / H.264 encodes written by the real shard writer."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_shards import format as fmt
from data_shards.loader.fixtures import make_sample, make_shard_set
from data_shards.shardio import write_shard
from data_shards.synth import SynthSpec

SHORT_INDEX = 5  # the shorter clip in every set
SHORT_FRAMES = 10


@pytest.fixture(scope="session")
def vp9_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 shards x 6 VP9 clips, 32 frames of 64 px; clip 5 has 10 frames."""
    return make_shard_set(tmp_path_factory.mktemp("vp9"), codec="vp9", short={SHORT_INDEX: SHORT_FRAMES})


@pytest.fixture(scope="session")
def h264_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 shards x 6 H.264 clips, 32 frames of 64 px; clip 5 has 10 frames."""
    return make_shard_set(tmp_path_factory.mktemp("h264"), codec="h264", short={SHORT_INDEX: SHORT_FRAMES})


def _save_manifest(folder: Path, infos: list[fmt.ShardInfo]) -> None:
    n = sum(i.samples for i in infos)
    fmt.Manifest(
        classes=["a", "b", "c", "d"],
        shards=infos,
        splits={"train": fmt.SplitInfo(samples=n, shards=len(infos), bytes=sum(i.bytes for i in infos))},
    ).save(folder)


@pytest.fixture(scope="session")
def corrupt_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """1 shard of 8 VP9 clips, 2 of them garbage bytes; returns (folder, corrupt keys)."""
    folder = tmp_path_factory.mktemp("corrupt")
    spec = SynthSpec(videos=8, frames=16, size=32, codec="vp9")
    samples = [make_sample(i, spec, folder) for i in range(8)]
    rng = np.random.default_rng(0)
    bad = [2, 6]
    for i in bad:
        s = samples[i]
        samples[i] = fmt.Sample(s.key, rng.bytes(len(s.video)), s.video_ext, s.label, s.meta)
    _save_manifest(folder, [write_shard(folder / "train-000000.tar", samples)])
    return folder, [samples[i].key for i in bad]


class _Payload:
    """Unpickling this creates a file: the proof that something executed."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (open, (str(self.target), "w"))


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> fmt.ShardInfo:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    idx = path.with_name(fmt.index_name(path.name))
    n = fmt.write_dali_index(path, idx)
    return fmt.ShardInfo(path.name, idx.name, "train", n, path.stat().st_size, fmt.sha256_file(path), ["vp9"])


@pytest.fixture(scope="session")
def pickle_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(set whose samples carry an extra .pyd/.pth, set with a sample that is only .pyd, canary path)."""
    root = tmp_path_factory.mktemp("pickle")
    canary = root / "PWNED"
    payload = pickle.dumps(_Payload(canary))
    spec = SynthSpec(videos=3, frames=16, size=32, codec="vp9")
    samples = [make_sample(i, spec, root) for i in range(3)]

    extra = root / "extra"
    extra.mkdir()
    members: list[tuple[str, bytes]] = []
    for s in samples:
        m = fmt.sample_members(s)
        members += [(f"{s.key}.{ext}", m[ext]) for ext in sorted(m)]
        members += [(f"{s.key}.pyd", payload), (f"{s.key}.pth", payload)]
    _save_manifest(extra, [_write_tar(extra / "train-000000.tar", members)])

    only = root / "only"
    only.mkdir()
    s = samples[0]
    m = fmt.sample_members(s)
    members = [(f"{s.key}.{ext}", m[ext]) for ext in sorted(m)]
    members += [("vdeadbeef.lbl.i64", fmt.encode_label(0)), ("vdeadbeef.pyd", payload)]
    _save_manifest(only, [_write_tar(only / "train-000000.tar", members)])
    return extra, only, canary
