"""Open, inspect and fully decode videos: the checks behind the shard format's validation gate.

A DALI pipeline crashes on a clip it cannot decode, and the PyAV loader maps frames by presentation
timestamp, so the bytes that go into a shard (after any remux, trim or re-encode) are decoded to the last
frame here (`inspect_stored`) before they may enter a shard: every packet must give exactly one frame, in
timestamp order, and the count is the one the shard's metadata records.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av


class RejectError(Exception):
    """The input cannot go into a shard; `str(e)` is the reason and `kind` its category, both written to
    rejects.jsonl (kinds: missing-file, empty-file, not-a-video, no-video-stream, undecodable, truncated,
    needs-reencode, bad-time-range, error)."""

    def __init__(self, reason: str, kind: str = "undecodable") -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class StreamInfo:
    """What the container says about its first video stream (declared, not yet decoded)."""

    container: str  # FFmpeg demuxer name, e.g. "avi", "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"
    brand: str | None  # mp4 family: major brand ("isom", "qt  ", "3gp6", ...)
    codec: str  # canonical FFmpeg codec name: h264, hevc, vp9, av1 (not libdav1d), mpeg4, wmv2, ...
    fps: float
    declared_frames: int
    declared_duration: float
    width: int
    height: int
    pix_fmt: str | None = None  # decoder output format, e.g. yuv420p, yuvj422p, yuv420p10le


def open_video(path: str | os.PathLike) -> av.container.InputContainer:
    """Open a source file; RejectError (with its kind) for anything that is not a file with a video stream."""
    path = Path(path)
    if not path.exists():
        raise RejectError("missing file", "missing-file")
    if not path.is_file():
        raise RejectError("not a regular file", "missing-file")
    if path.stat().st_size == 0:
        raise RejectError("empty file (0 bytes)", "empty-file")
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as e:
        raise RejectError(f"not a video: {e}", "not-a-video") from None
    if not container.streams.video:
        container.close()
        raise RejectError("no video stream", "no-video-stream")
    still = still_image(container)
    if still:
        container.close()
        raise RejectError(f"not a video: a still image ({still})", "not-a-video")
    return container


def still_image(container: av.container.InputContainer) -> str | None:
    """The demuxer's name when FFmpeg opened a still image (png/jpeg/webp pipe, image2), else None."""
    demuxer = container.format.name
    return demuxer if demuxer == "image2" or demuxer.endswith("_pipe") else None


def canonical_codec(stream: av.video.stream.VideoStream) -> str:
    """The codec's canonical name (AV1 decoded by libdav1d is still "av1")."""
    codec = stream.codec_context.codec
    return str(getattr(codec, "canonical_name", None) or codec.name)


def stream_info(container: av.container.InputContainer) -> StreamInfo:
    """The declared facts of the first video stream (the truncation check compares a decode with them)."""
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or Fraction(0)
    if stream.duration is not None and stream.time_base is not None:
        declared = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        declared = container.duration / 1_000_000
    else:
        declared = math.nan
    brand = container.metadata.get("major_brand")
    return StreamInfo(
        container=container.format.name,
        brand=brand.strip() if brand else None,
        codec=canonical_codec(stream),
        fps=float(rate) if rate else math.nan,
        declared_frames=int(stream.frames or 0),
        declared_duration=declared,
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        pix_fmt=stream.codec_context.pix_fmt,
    )


def iter_frames(container: av.container.InputContainer, what: str = "") -> Iterator[av.VideoFrame]:
    """Decode the first video stream; a decoder error becomes a RejectError saying how far it got."""
    stream = container.streams.video[0]
    n = 0
    try:
        for frame in container.decode(stream):
            yield frame
            n += 1
    except av.FFmpegError as e:
        raise RejectError(f"undecodable: {e} (after {n} frames){what}") from None


def check_complete(info: StreamInfo, frames: int, last_time: float) -> None:
    """FFmpeg decodes a truncated file without raising; compare what decoded with what was declared."""
    if frames == 0:
        raise RejectError("undecodable: no frame could be decoded")
    if info.declared_frames and frames < 0.95 * info.declared_frames - 1:
        raise RejectError(
            f"truncated: decoded {frames} of {info.declared_frames} declared frames", "truncated"
        )
    declared, fps = info.declared_duration, info.fps
    if not info.declared_frames and math.isfinite(declared) and fps and math.isfinite(fps):
        decoded = last_time + 1 / fps
        if decoded < 0.9 * declared - 2 / fps:
            raise RejectError(f"truncated: decoded {decoded:.2f}s of {declared:.2f}s declared", "truncated")


@dataclass(frozen=True)
class Decoded:
    """A full decode: frame count, time of the last frame, and whether the stream keeps the loaders'
    contract (one frame per packet, frames in timestamp order) -- `problem` says how it does not."""

    frames: int
    last_time: float
    width: int
    height: int
    problem: str | None


def _timestamp_problem(packets: list[int | None], shown: list[int | None]) -> str | None:
    if len(packets) != len(shown):
        return f"{len(packets)} packets decode to {len(shown)} frames"
    if None in packets or len(set(packets)) != len(packets):
        return None  # no usable timestamps: the loader decodes from the start and counts frames
    if shown != sorted(packets):
        return "frame timestamps are not in presentation order (e.g. unpacked B-frames)"
    return None


def decode_all(container: av.container.InputContainer, what: str = "") -> Decoded:
    """Demux and decode every packet of the first video stream (one pass), checking the contract."""
    stream = container.streams.video[0]
    ctx = stream.codec_context
    packets: list[int | None] = []
    shown: list[int | None] = []
    last = 0.0

    def take(frames: list[av.VideoFrame]) -> None:
        nonlocal last
        for f in frames:
            shown.append(f.pts)
            last = f.time if f.time is not None else last

    try:
        for p in container.demux(stream):
            if p.size:
                packets.append(p.pts)
            take(ctx.decode(p))  # the empty packet at the end flushes the decoder
    except av.FFmpegError as e:
        raise RejectError(f"undecodable: {e} (after {len(shown)} frames){what}") from None
    return Decoded(len(shown), last, ctx.width, ctx.height, _timestamp_problem(packets, shown))


def inspect_stored(data: bytes, what: str = "") -> Decoded:
    """The gate: fully decode the exact bytes that would go into a shard."""
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as e:
        raise RejectError(f"not a video: {e}{what}", "not-a-video") from None
    with container:
        if not container.streams.video:
            raise RejectError(f"no video stream{what}", "no-video-stream")
        got = decode_all(container, what)
    if got.frames == 0:
        raise RejectError(f"undecodable: no frame could be decoded{what}")
    return got


def info_json(info: StreamInfo) -> dict[str, Any]:
    """The source facts a shard's metadata keeps."""
    return {"source_container": info.container.split(",")[0], "source_codec": info.codec}
