"""DALI with device="mixed" (NVDEC) on H.264 and VP9 shards: contract and parity with PyAV. Needs CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_shards.loader import SamplingSpec, build_loader
from data_shards.loader.fixtures import make_shard_set

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NVDEC)"),
]

EVAL = SamplingSpec(frames=8, stride=2, size=32, train=False)


def to_uint8_space(video: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean).view(3, 1, 1, 1) * 255
    std = torch.tensor(spec.std).view(3, 1, 1, 1) * 255
    return video.float().cpu() * std + mean


@pytest.fixture(scope="module", params=["h264", "vp9"])
def shards(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 128 px: NVDEC's smallest VP9 frame is 128x128 (H.264: 48x16)
    return make_shard_set(
        tmp_path_factory.mktemp(request.param), codec=request.param, size=128, short={5: 10}
    )


def test_auto_picks_mixed_and_matches_pyav(shards: Path) -> None:
    gpu = build_loader(shards, "train", batch_size=4, spec=EVAL, device="cuda")
    assert gpu.backend == "dali-mixed"
    a = list(gpu)
    b = list(build_loader(shards, "train", batch_size=4, spec=EVAL, backend="pyav", num_workers=0))
    assert all(x["video"].is_cuda and x["label"].is_cuda for x in a)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    diff = (
        (
            to_uint8_space(torch.cat([x["video"] for x in a]), EVAL)
            - to_uint8_space(torch.cat([x["video"] for x in b]), EVAL)
        )
        .abs()
        .mean()
        .item()
    )
    assert diff < 2.0, diff


def test_mixed_train_resume(shards: Path) -> None:
    spec = SamplingSpec(frames=8, stride=2, size=32, clips_per_video=2)

    def make():
        return build_loader(shards, "train", batch_size=4, spec=spec, backend="dali", device="cuda", seed=1)

    ref = [b["key"] for b in make()]
    first = make()
    it = iter(first)
    next(it)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert [b["key"] for b in resumed] == ref[1:]
    assert first.backend == "dali-mixed"
