from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data_shards.synth import SynthSpec, write_synthetic_set


@pytest.fixture(scope="session")
def synth_vp9(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 small VP9 clips + labels.csv, made once per session (read-only for tests)."""
    out = tmp_path_factory.mktemp("synth_vp9")
    write_synthetic_set(out, SynthSpec(videos=12, classes=4, frames=16, size=32, codec="vp9", seed=7))
    return out


@pytest.fixture
def synth_copy(synth_vp9: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the synthetic set."""
    dst = tmp_path / "src"
    shutil.copytree(synth_vp9, dst)
    return dst
