"""Shared inputs for the sharding tests, made once per session (read-only: copy before changing)."""

from __future__ import annotations

import csv
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from data_shards.synth import SynthSpec, write_synthetic_set


@pytest.fixture(scope="session")
def synth_vp9(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 small VP9 clips + labels.csv (path,label)."""
    out = tmp_path_factory.mktemp("synth_vp9")
    write_synthetic_set(out, SynthSpec(videos=12, classes=4, frames=16, size=32, codec="vp9", seed=7))
    return out


@pytest.fixture(scope="session")
def synth_rows(synth_vp9: Path) -> list[dict[str, str]]:
    """The rows of `synth_vp9/labels.csv`."""
    with open(synth_vp9 / "labels.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def synth_copy(synth_vp9: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the synthetic set."""
    dst = tmp_path / "src"
    shutil.copytree(synth_vp9, dst)
    return dst


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 8000, 0, Fraction(1, 8000)
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="session")
def broken_videos(
    tmp_path_factory: pytest.TempPathFactory, synth_vp9: Path, synth_rows: list
) -> dict[str, Path]:
    """Files no shard may contain: zero bytes, text, a truncated VP9 clip, audio only."""
    root = tmp_path_factory.mktemp("broken")
    (root / "empty.webm").write_bytes(b"")
    (root / "text.webm").write_text("not a video at all")
    data = (synth_vp9 / synth_rows[8]["path"]).read_bytes()
    (root / "trunc.webm").write_bytes(data[: len(data) * 6 // 10])
    _audio_only(root / "audio.mp4")
    return {p.stem: p for p in root.iterdir()}
