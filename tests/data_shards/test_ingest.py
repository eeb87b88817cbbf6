"""`--codec auto`: a zoo of containers and codecs (and broken files) built with default options. Every
decodable clip is accepted with the right ingest action and its stored bytes decode, in order, to the
source's frames through the loaders; every broken file is rejected with a reason."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards import format as fmt
from data_shards.build import BuildOptions, build, summary
from data_shards.ingest import Clip, IngestOptions, decide, ingest_video
from data_shards.loader import SamplingSpec, build_loader
from data_shards.loader.pyav import decode_frames
from data_shards.probe import RejectError, StreamInfo
from data_shards.verify import verify

FRAMES = 24
BROKEN_KINDS = {
    "empty.webm": "empty-file",
    "text.webm": "not-a-video",
    "trunc.webm": "truncated",
    "audio.mp4": "no-video-stream",
    "picture.mp4": "not-a-video",  # a PNG named .mp4: a still image, not a one-frame video
    "garbage.avi": "not-a-video",
}


def _source(folder: Path, files: dict[str, Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        shutil.copy(path, folder / name)
    return folder


def _samples(out: Path) -> dict[str, fmt.Sample]:
    """Stored samples by source file name."""
    m = fmt.load_manifest(out)
    return {s.meta["id"]: s for sh in m.shards for s in fmt.iter_tar_samples(out / sh.path)}


def _rejects(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / fmt.REJECTS_NAME).read_text().splitlines())}


@pytest.fixture(scope="module")
def zoo_build(tmp_path_factory: pytest.TempPathFactory, zoo: dict, broken_videos: dict) -> tuple[Path, str]:
    """The zoo and the broken files in one flat folder, built with default options: (shards, summary)."""
    root = tmp_path_factory.mktemp("zoo_build")
    files = {name: path for name, (path, _) in zoo.items()}
    files |= {p.name: p for p in broken_videos.values()}
    src = _source(root / "src", files)
    (src / "garbage.avi").write_bytes(np.random.default_rng(0).bytes(5000))
    result = build(src, root / "shards", BuildOptions(test_fraction=0.3), quiet=True)
    return root / "shards", summary(result)


def test_every_decodable_clip_is_stored_with_the_right_action(zoo_build: tuple[Path, str], zoo: dict) -> None:
    out, text = zoo_build
    samples, rejects = _samples(out), _rejects(out)
    assert set(samples) == set(zoo) and set(rejects) == set(BROKEN_KINDS)
    for name, (_, action) in zoo.items():
        meta = samples[name].meta
        assert meta["ingest"] == action, (name, meta["ingest_reason"])
        assert meta["frames"] == FRAMES and (meta["width"], meta["height"]) == (64, 48), name
        assert meta["source_container"] and meta["source_codec"], name
        if action == "transcoded":
            assert meta["codec"] == "h264" and samples[name].video_ext == "mp4"
        else:
            assert meta["codec"] == meta["source_codec"]  # lossless: the same stream
    assert samples["av1.mkv"].meta["codec"] == "av1" and samples["av1.mkv"].video_ext == "webm"
    assert samples["h264.mov"].meta["ingest_reason"] == "container mov (qt)"
    assert samples["wmv2.wmv"].meta["ingest_reason"] == "codec wmv2 is not NVDEC-decodable"
    assert (
        samples["mjpeg422.avi"].meta["ingest_reason"]
        == "pixel format yuvj422p of mjpeg is not NVDEC-decodable"
    )
    for name, kind in BROKEN_KINDS.items():
        assert rejects[name]["kind"] == kind and rejects[name]["reason"] and rejects[name]["where"] == name
    m = fmt.load_manifest(out)
    assert verify(out, decode=True) == ([], {k: v.samples for k, v in m.splits.items()})
    ingest = {
        a: sum(sp.ingest.get(a, 0) for sp in m.splits.values()) for a in ("kept", "remuxed", "transcoded")
    }
    assert ingest == {a: sum(v == a for _, v in zoo.values()) for a in ingest}
    for split, sp in m.splits.items():  # the summary line of each split carries its counts
        line = next(x for x in text.splitlines() if x.strip().startswith(split))
        assert [int(c) for c in line.split()[4:8]] == [
            sp.ingest.get(a, 0) for a in ("kept", "remuxed", "transcoded", "trimmed")
        ]
    lines = text.splitlines()
    assert sum(int(x.split()[8]) for x in lines[2:] if x.split()[0] in ("train", "test")) == len(BROKEN_KINDS)


def test_stored_bytes_decode_to_the_source_frames_in_order(zoo_build: tuple[Path, str], frame_index) -> None:
    """Remuxes keep every frame in presentation order (packed B-frames, AVI without timestamps included);
    checked against the pattern the clips were made from, frame by frame."""
    out, _ = zoo_build
    for name, sample in _samples(out).items():
        order = frame_index(decode_frames(sample.video, np.arange(FRAMES)))
        assert order == list(range(FRAMES)), (name, sample.meta["ingest"], order)


def test_pyav_loader_reads_every_stored_clip(zoo_build: tuple[Path, str], zoo: dict) -> None:
    out, _ = zoo_build
    spec = SamplingSpec(frames=8, stride=3, size=32, train=False, eval_clips=2)
    keys = []
    for split in fmt.load_manifest(out).splits:
        loader = build_loader(
            out, split, batch_size=4, spec=spec, backend="pyav", num_workers=0, drop_last=False
        )
        for batch in loader:
            assert torch.isfinite(batch["video"]).all()
            keys += [k for k, p in zip(batch["key"][::2], batch["pad"][::2].tolist()) if not p]
        assert loader.stats["skipped"] == 0
    assert len(keys) == len(set(keys)) == len(zoo)


def test_copy_keeps_the_strict_behaviour(tmp_path: Path, zoo: dict) -> None:
    names = ["mjpeg.avi", "vp9.webm", "h264.mkv", "xvid_packed.avi"]
    src = _source(tmp_path / "src", {n: zoo[n][0] for n in names})
    build(src, tmp_path / "out", BuildOptions(ingest=IngestOptions(codec="copy")), quiet=True)
    samples, rejects = _samples(tmp_path / "out"), _rejects(tmp_path / "out")
    assert set(samples) == {"vp9.webm", "h264.mkv"} and all(
        s.meta["ingest"] == "kept" for s in samples.values()
    )
    assert samples["vp9.webm"].video == zoo["vp9.webm"][0].read_bytes()
    assert {rejects[n]["kind"] for n in ("mjpeg.avi", "xvid_packed.avi")} == {"needs-reencode"}
    assert "--codec auto" in rejects["mjpeg.avi"]["reason"]


def test_dali_cpu_target_is_read_by_the_dali_cpu_pipeline(tmp_path: Path, zoo: dict) -> None:
    names = ["mjpeg.avi", "vp9.webm", "h264.mkv"]
    src = _source(tmp_path / "src", {n: zoo[n][0] for n in names})
    build(src, tmp_path / "out", BuildOptions(ingest=IngestOptions(dali_cpu=True)), quiet=True)
    samples = _samples(tmp_path / "out")
    got = {n: (s.meta["ingest"], s.meta["codec"]) for n, s in samples.items()}
    assert got == {
        "mjpeg.avi": ("remuxed", "mjpeg"),
        "vp9.webm": ("kept", "vp9"),
        "h264.mkv": ("transcoded", "vp9"),
    }
    spec = SamplingSpec(frames=4, stride=2, size=32, train=False)
    dali = build_loader(tmp_path / "out", "train", batch_size=3, spec=spec)
    assert dali.backend == "dali-cpu"
    a = next(iter(dali))
    b = next(
        iter(build_loader(tmp_path / "out", "train", batch_size=3, spec=spec, backend="pyav", num_workers=0))
    )
    assert a["key"] == b["key"]
    std = torch.tensor(spec.std).view(3, 1, 1, 1) * 255
    diff = [((x - y).abs() * std).mean().item() for x, y in zip(a["video"], b["video"])]
    # same pictures: measured 3.5-4.2 grey levels on these small sharp test patterns (swscale resamples chroma
    # from its grid where DALI upsamples it first; 1.1-3.9 with the earlier torch path); 0.2-0.3 on 128 px clips
    assert max(diff) < 5.0, diff


def _info(container: str, codec: str, brand: str | None = None) -> StreamInfo:
    return StreamInfo(container, brand, codec, 25.0, 50, 2.0, 64, 48)


def test_decide_without_decoding() -> None:
    auto, cpu = IngestOptions(), IngestOptions(dali_cpu=True)
    mp4 = "mov,mp4,m4a,3gp,3g2,mj2"
    assert decide(_info(mp4, "h264", "isom"), auto, None)[0] == "kept"
    assert decide(_info(mp4, "h264", "qt"), auto, None) == ("remuxed", "container mov (qt)")
    assert decide(_info(mp4, "h264", "3gp6"), auto, None)[0] == "remuxed"
    assert decide(_info("matroska,webm", "theora"), auto, None)[0] == "transcoded"
    assert decide(_info("matroska,webm", "vp9"), cpu, None)[0] == "kept"
    assert decide(_info("matroska,webm", "h264"), cpu, None)[0] == "transcoded"
    assert decide(_info("avi", "mjpeg"), cpu, None)[0] == "remuxed"
    assert decide(_info("matroska,webm", "vp9"), IngestOptions(short_side=32), None)[0] == "transcoded"
    assert decide(_info("matroska,webm", "vp9"), auto, Clip(0.5, 1.0))[0] == "trimmed"
    with pytest.raises(RejectError, match="time range needs a re-encode"):
        decide(_info("matroska,webm", "vp9"), IngestOptions(codec="copy"), Clip(0.5, 1.0))
    with pytest.raises(ValueError, match="--dali-cpu"):
        IngestOptions(codec="h264", dali_cpu=True)


def test_ingest_is_deterministic_and_trims_frame_exactly(zoo: dict, tmp_path: Path, frame_index) -> None:
    packed = zoo["xvid_packed.avi"][0]
    a, b = (
        ingest_video(packed, IngestOptions(), workdir=tmp_path),
        ingest_video(packed, IngestOptions(), workdir=tmp_path),
    )
    assert a.data == b.data and a.meta["ingest"] == "remuxed"
    cut = ingest_video(zoo["h264.ts"][0], IngestOptions(), Clip(0.5, 1.25), workdir=tmp_path)
    assert (cut.meta["ingest"], cut.meta["frames"]) == ("trimmed", 9)  # frames 6..14 at 12 fps
    assert frame_index(decode_frames(cut.data, np.arange(9))) == list(range(6, 15))
    assert math.isclose(cut.meta["duration"], 0.75)
    with pytest.raises(RejectError, match="ends past the video") as e:
        ingest_video(zoo["h264.ts"][0], IngestOptions(), Clip(1.5, 2.5), workdir=tmp_path)
    assert e.value.kind == "bad-time-range"
