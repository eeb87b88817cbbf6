"""Open, fully decode and optionally transcode one source video.

This is the validation gate of the shard format: a DALI pipeline crashes on a clip it cannot
decode, so every video is decoded to the last frame here before it may enter a shard.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from data_shards.codec import ENCODERS, VideoWriter
from data_shards.format import FormatError, video_ext_for


class RejectError(Exception):
    """The input cannot go into a shard; the message is the reason written to rejects.jsonl."""


@dataclass(frozen=True)
class TranscodeOptions:
    """How accepted videos are stored. `codec="copy"` keeps the source bytes untouched."""

    codec: str = "copy"  # copy | h264 | vp9
    short_side: int | None = None  # resize so the shorter side is this (even) size
    fps: float | None = None  # resample the frame rate (drop/repeat frames by timestamp)
    max_frames: int | None = None
    max_duration: float | None = None  # seconds
    gop: int | None = None  # keyframe interval of the re-encode

    def __post_init__(self) -> None:
        if self.codec != "copy" and self.codec not in ENCODERS:
            raise ValueError(f"--codec must be copy or one of {sorted(ENCODERS)}, got {self.codec!r}")
        reshaping = [
            k for k in ("short_side", "fps", "max_frames", "max_duration", "gop") if getattr(self, k)
        ]
        if self.codec == "copy" and reshaping:
            raise ValueError(
                f"--codec copy keeps the source bytes; {', '.join(reshaping)} need --codec h264 or vp9"
            )
        if self.short_side is not None and (self.short_side < 16 or self.short_side % 2):
            raise ValueError(f"--short-side must be an even number >= 16, got {self.short_side}")
        for name in ("fps", "max_frames", "max_duration", "gop"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProbedVideo:
    """What a shard stores about one accepted video (becomes its `.json` member)."""

    data: bytes
    ext: str
    meta: dict[str, Any]


def _open(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise RejectError("missing file")
    if not path.is_file():
        raise RejectError("not a regular file")
    if path.stat().st_size == 0:
        raise RejectError("empty file (0 bytes)")
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as e:
        raise RejectError(f"not a video: {e}") from None
    if not container.streams.video:
        container.close()
        raise RejectError("no video stream")
    return container


def _stream_info(container: av.container.InputContainer) -> dict[str, Any]:
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or Fraction(0)
    if stream.duration is not None and stream.time_base is not None:
        declared = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        declared = container.duration / 1_000_000
    else:
        declared = math.nan
    return {
        "codec": stream.codec_context.name,
        "container": container.format.name,
        "fps": float(rate) if rate else math.nan,
        "declared_frames": int(stream.frames or 0),
        "declared_duration": declared,
        "width": stream.codec_context.width,
        "height": stream.codec_context.height,
    }


def _iter_frames(container: av.container.InputContainer, what: str):
    stream = container.streams.video[0]
    n = 0
    try:
        for frame in container.decode(stream):
            yield frame
            n += 1
    except av.FFmpegError as e:
        raise RejectError(f"undecodable: {e} (after {n} frames){what}") from None


def _check_complete(info: dict[str, Any], frames: int, last_time: float) -> None:
    """FFmpeg decodes a truncated file without raising; compare what decoded with what was declared."""
    if frames == 0:
        raise RejectError("undecodable: no frame could be decoded")
    declared_frames = info["declared_frames"]
    if declared_frames and frames < 0.95 * declared_frames - 1:
        raise RejectError(f"truncated: decoded {frames} of {declared_frames} declared frames")
    declared = info["declared_duration"]
    fps = info["fps"]
    if not declared_frames and math.isfinite(declared) and fps and math.isfinite(fps):
        decoded = last_time + 1 / fps
        if decoded < 0.9 * declared - 2 / fps:
            raise RejectError(f"truncated: decoded {decoded:.2f}s of {declared:.2f}s declared")


def _even(x: float) -> int:
    return max(2, round(x / 2) * 2)


def probe_video(
    path: str | os.PathLike, options: TranscodeOptions, workdir: str | os.PathLike | None = None
) -> ProbedVideo:
    """Decode `path` fully; return the bytes to store (source or re-encode) and their metadata.

    Raises `RejectError` with a one-line reason for anything a shard must not contain.
    """
    path = Path(path)
    container = _open(path)
    try:
        info = _stream_info(container)
        if options.codec == "copy":
            frames, last_time = 0, 0.0
            for frame in _iter_frames(container, ""):
                frames += 1
                if frame.time is not None:
                    last_time = frame.time
            _check_complete(info, frames, last_time)
            try:
                ext = video_ext_for(info["container"])
            except FormatError as e:
                raise RejectError(str(e)) from None
            data = path.read_bytes()
            out = {
                "codec": info["codec"],
                "frames": frames,
                "fps": info["fps"],
                "width": info["width"],
                "height": info["height"],
            }
        else:
            data, ext, out = _transcode(container, info, options, path, workdir)
    finally:
        container.close()
    fps = out["fps"]
    out["duration"] = round(out["frames"] / fps, 6) if fps and math.isfinite(fps) else None
    out["fps"] = round(fps, 6) if fps and math.isfinite(fps) else None
    out["bytes"] = len(data)
    out["sha256"] = hashlib.sha256(data).hexdigest()
    out["source_codec"] = info["codec"]
    return ProbedVideo(data=data, ext=ext, meta=out)


def _transcode(
    container: av.container.InputContainer,
    info: dict[str, Any],
    options: TranscodeOptions,
    path: Path,
    workdir: str | os.PathLike | None,
) -> tuple[bytes, str, dict[str, Any]]:
    src_fps = info["fps"] if info["fps"] and math.isfinite(info["fps"]) else 25.0
    out_fps = float(options.fps or src_fps)
    w, h = info["width"], info["height"]
    if options.short_side:
        scale = options.short_side / min(w, h)
        w, h = _even(w * scale), _even(h * scale)
    else:
        w, h = _even(w), _even(h)
    limit = options.max_frames or math.inf
    if options.max_duration:
        limit = min(limit, math.floor(options.max_duration * out_fps + 1e-6))
    _, ext, _ = ENCODERS[options.codec]
    tmp_dir = Path(workdir) if workdir else path.parent
    tmp = tmp_dir / f".transcode-{os.getpid()}-{hashlib.sha256(str(path).encode()).hexdigest()[:12]}.{ext}"
    written, src_frames, last_time = 0, 0, 0.0
    try:
        with VideoWriter(
            tmp, options.codec, Fraction(out_fps).limit_denominator(1001), w, h, gop=options.gop
        ) as writer:
            for frame in _iter_frames(container, ""):
                t = frame.time if frame.time is not None else src_frames / src_fps
                src_frames += 1
                last_time = t
                # keep output frame i at time i/out_fps: emit this source frame for every slot it covers
                while written < limit and (options.fps is None or written / out_fps <= t + 0.5 / src_fps):
                    rgb = frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="BILINEAR")
                    writer.write_rgb(np.ascontiguousarray(rgb))
                    written += 1
                    if options.fps is None:
                        break
            if written == 0 and src_frames:
                raise RejectError("no frame within the requested --max-frames/--max-duration")
        _check_complete(info, src_frames, last_time)
        data = tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    return data, ext, {"codec": options.codec, "frames": written, "fps": out_fps, "width": w, "height": h}


def decode_check_bytes(data: bytes, what: str = "") -> int:
    """Fully decode an in-memory video (a shard member); returns its frame count or raises RejectError."""
    import io

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as e:
        raise RejectError(f"not a video: {e}{what}") from None
    with container:
        if not container.streams.video:
            raise RejectError(f"no video stream{what}")
        frames = sum(1 for _ in _iter_frames(container, what))
    if frames == 0:
        raise RejectError(f"undecodable: no frame could be decoded{what}")
    return frames
