"""Shared inputs for the sharding tests, made once per session (read-only: copy before changing)."""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable
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
    """Files no shard may contain: zero bytes, text, a truncated VP9 clip, audio only, a still image."""
    root = tmp_path_factory.mktemp("broken")
    (root / "empty.webm").write_bytes(b"")
    _still_image(root / "picture.mp4")
    (root / "text.webm").write_text("not a video at all")
    data = (synth_vp9 / synth_rows[8]["path"]).read_bytes()
    (root / "trunc.webm").write_bytes(data[: len(data) * 6 // 10])
    _audio_only(root / "audio.mp4")
    return {p.stem: p for p in root.iterdir()}


def _still_image(path: Path) -> Path:
    """A PNG named like a video: FFmpeg opens it as a one-frame stream; it is not a video."""
    with av.open(str(path), "w", format="image2pipe") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = 8, 8, "rgb24"
        c.mux(s.encode(av.VideoFrame.from_ndarray(np.zeros((8, 8, 3), np.uint8), format="rgb24")))
        c.mux(s.encode())
    return path


# ----------------------------------------------------------------------------------------- codec zoo

FRAMES, RATE = 24, 12  # every zoo clip: 24 frames at 12 fps (2 s), 48 x 64


def moving_clip(frames: int = FRAMES, h: int = 48, w: int = 64) -> np.ndarray:
    """uint8 [T, H, W, 3] that differs everywhere at every step: a frame out of order cannot pass."""
    yy, xx = np.mgrid[0:h, 0:w]
    t = np.arange(frames)[:, None, None]
    base = (xx[None] * 5 + yy[None] * 3 + t * 11) % 256
    return np.stack([base, (base * 7 + 40) % 256, 255 - base], -1).astype(np.uint8)


def _encode(
    path: Path, container: str, codec: str, pix_fmt: str, options: dict[str, str], frames: int
) -> Path:
    with av.open(str(path), "w", format=container) as c:
        s = c.add_stream(codec, rate=RATE, options={"threads": "1", **options})
        s.width, s.height, s.pix_fmt = 64, 48, pix_fmt
        for f in moving_clip(frames):
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    return path


def _packed_xvid_avi(path: Path) -> Path:
    """MPEG-4 Part 2 in AVI with DivX-style *packed* B-frames: each P-frame chunk carries the following
    B-frame, an N-VOP placeholder takes the B-frame's slot, and the user data says "DivX503b1393p"."""
    enc = av.CodecContext.create("mpeg4", "w")
    enc.width, enc.height, enc.pix_fmt = 64, 48, "yuv420p"
    enc.time_base, enc.framerate = Fraction(1, RATE), RATE
    enc.options = {"bf": "1", "g": "12", "threads": "1"}
    coded = []
    for i, rgb in enumerate(moving_clip()):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts, frame.time_base = i, Fraction(1, RATE)
        coded += [(bytes(p), p.pts, p.is_keyframe) for p in enc.encode(frame)]
    coded += [(bytes(p), p.pts, p.is_keyframe) for p in enc.encode(None)]
    nvop = bytes([0, 0, 1, 0xB6, 0x50, 0x9F])  # P-VOP, vop_coded=0 (4-bit time increment at 12 fps)
    chunks, i = [], 0
    while i < len(coded):
        data, pts, key = coded[i]
        if i + 1 < len(coded) and coded[i + 1][1] < pts:  # a B-frame follows its P-frame: pack them
            chunks += [(data + coded[i + 1][0], key), (nvop, False)]
            i += 2
        else:
            chunks.append((data, key))
            i += 1
    first = chunks[0][0]
    vop = first.find(bytes([0, 0, 1, 0xB6]))
    chunks[0] = (first[:vop] + bytes([0, 0, 1, 0xB2]) + b"DivX503b1393p" + first[vop:], True)
    with av.open(str(path), "w", format="avi") as out:
        s = out.add_stream("mpeg4", rate=RATE)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for k, (data, key) in enumerate(chunks):
            p = av.Packet(data)
            p.stream, p.pts, p.dts, p.time_base = s, k, k, Fraction(1, RATE)
            p.is_keyframe = key
            out.mux(p)
    return path


# name -> (container, encoder, pix_fmt, options, what `--codec auto` must do with it)
ZOO: dict[str, tuple[str, str, str, dict[str, str], str]] = {
    "mjpeg.avi": ("avi", "mjpeg", "yuvj420p", {}, "remuxed"),
    "xvid.avi": ("avi", "mpeg4", "yuv420p", {"bf": "2", "g": "8"}, "remuxed"),
    "hevc.mp4": ("mp4", "libx265", "yuv420p", {"x265-params": "log-level=none"}, "kept"),
    "vp9.webm": ("webm", "libvpx-vp9", "yuv420p", {"cpu-used": "8", "deadline": "realtime"}, "kept"),
    "av1.mkv": ("matroska", "libsvtav1", "yuv420p", {"preset": "12"}, "kept"),
    "h264.mov": ("mov", "libx264", "yuv420p", {}, "remuxed"),
    "h264.mkv": ("matroska", "libx264", "yuv420p", {}, "kept"),
    "h264.avi": ("avi", "libx264", "yuv420p", {}, "remuxed"),
    "h264.ts": ("mpegts", "libx264", "yuv420p", {}, "remuxed"),
    "wmv2.wmv": ("asf", "wmv2", "yuv420p", {}, "transcoded"),
    "flv1.flv": ("flv", "flv", "yuv420p", {}, "transcoded"),
    "msmpeg4.avi": ("avi", "msmpeg4", "yuv420p", {}, "transcoded"),
    "rawvideo.avi": ("avi", "rawvideo", "yuv420p", {}, "transcoded"),
    "h264_444.mkv": ("matroska", "libx264", "yuv444p", {}, "transcoded"),  # not an NVDEC stream
    "mjpeg422.avi": ("avi", "mjpeg", "yuvj422p", {}, "transcoded"),  # camera MJPEG
}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """One small clip per container/codec pair (made with PyAV's bundled encoders) and the ingest action
    `--codec auto` must take for it: name -> (path, action)."""
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its configuration to stderr otherwise
    root = tmp_path_factory.mktemp("zoo")
    out = {name: (_encode(root / name, *spec[:4], FRAMES), spec[4]) for name, spec in ZOO.items()}
    out["xvid_packed.avi"] = (_packed_xvid_avi(root / "xvid_packed.avi"), "remuxed")
    return out


@pytest.fixture(scope="session")
def frame_index() -> Callable[[np.ndarray], list[int]]:
    """`frame_index(frames_THWC)`: which frame of the zoo's moving pattern each decoded frame is."""
    ref = moving_clip(64).astype(np.float32)

    def index(frames_THWC: np.ndarray) -> list[int]:
        return [int(np.argmin(np.abs(ref - f.astype(np.float32)).mean(axis=(1, 2, 3)))) for f in frames_THWC]

    return index


@pytest.fixture(scope="session")
def make_clip() -> Callable[..., Path]:
    """`make_clip(path, frames=24, codec="mjpeg", container="avi")`: a small moving clip at 12 fps."""

    def make(path: Path, frames: int = FRAMES, codec: str = "mjpeg", container: str = "avi") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        pix = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        return _encode(path, container, codec, pix, {}, frames)

    return make
