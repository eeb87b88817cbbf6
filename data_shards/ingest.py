"""One source video (or a time range of it) -> the bytes a shard stores, and what was done to it.

`--codec auto` (the default) does the least that makes a video readable by every loader:
  kept        the stream and container are ones the loaders read (mp4 / webm / mkv; a codec and pixel format
              NVDEC and PyAV decode, `format.DALI_GPU_CODECS` in 4:2:0; with `--dali-cpu` only what DALI
              decodes on CPU);
  remuxed     only the container is the problem (AVI, MOV, FLV, TS, 3GP, ...): packets copied losslessly into
              mp4 (webm for VP8/VP9/AV1). MPEG-4 Part 2 goes through `mpeg4_unpack_bframes` (packed
              B-frames, DivX/Xvid AVI); a container without presentation timestamps (AVI) gets them
              rebuilt from the decoder's display order;
  transcoded  the codec itself cannot be stored (wmv, flv1, msmpeg4, rawvideo, theora, mpeg2, 4:4:4 H.264,
              4:2:2 MJPEG, ...), or a remux could not give a clean stream, or --short-side/--fps/--max-*
              ask for it: re-encoded to H.264 (VP9 with `--dali-cpu`), 8-bit 4:2:0;
  trimmed     a time range of the source, cut frame-exactly (frames whose time is in [start, end)) and
              re-encoded.
`--codec copy` stores source bytes only (strict: anything else is rejected); `--codec h264|vp9` always
re-encodes. Whatever was done, the stored bytes pass the gate (`probe.inspect_stored`): fully decoded, one
frame per packet in timestamp order, and a remux must decode to the source's frame count.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from data_shards import audio as sound
from data_shards import format as fmt
from data_shards.codec import ENCODERS, VideoWriter
from data_shards.probe import (
    Decoded,
    RejectError,
    StreamInfo,
    check_complete,
    decode_all,
    info_json,
    inspect_stored,
    iter_frames,
    open_video,
    stream_info,
)

CODEC_CHOICES = ("auto", "copy", *ENCODERS)
ACTIONS = ("kept", "remuxed", "transcoded", "trimmed")
WEBM_CODECS = frozenset({"vp8", "vp9", "av1"})
# What NVDEC decodes, by pixel format: 8-bit 4:2:0 for every codec, 10-bit 4:2:0 for HEVC/VP9/AV1
# (4:4:4 H.264 or 4:2:2 camera MJPEG are not NVDEC streams). DALI-CPU (libavcodec) takes any.
NVDEC_PIX_FMTS = frozenset({"yuv420p", "yuvj420p", "nv12"})
NVDEC_PIX_FMTS_10BIT = frozenset({"yuv420p10le", "p010le"})
_RESHAPING = ("short_side", "fps", "max_frames", "max_duration", "gop")


@dataclass(frozen=True)
class Clip:
    """A time range of a source, in seconds from its first frame: frames with start <= t < end."""

    start: float
    end: float


@dataclass(frozen=True)
class IngestOptions:
    """How accepted videos are stored (`--codec`, `--dali-cpu` and the re-encode shape options)."""

    codec: str = "auto"  # auto | copy | h264 | vp9
    dali_cpu: bool = False  # auto: keep only what DALI decodes on CPU (VP9, MJPEG), re-encode the rest to VP9
    short_side: int | None = None  # resize so the shorter side is this (even) size
    fps: float | None = None  # resample the frame rate (drop/repeat frames by timestamp)
    max_frames: int | None = None
    max_duration: float | None = None  # seconds
    gop: int | None = None  # keyframe interval of the re-encode
    audio: str = "drop"  # drop | keep (no usable sound: reject) | optional (keep the video without it)
    audio_rate: int = sound.DEFAULT_RATE  # Hz of the stored mono FLAC

    def __post_init__(self) -> None:
        if self.audio not in sound.AUDIO_MODES:
            raise ValueError(f"--audio must be one of {sound.AUDIO_MODES}, got {self.audio!r}")
        if not 4000 <= self.audio_rate <= 192000:
            raise ValueError(f"--audio-rate must be in 4000..192000 Hz, got {self.audio_rate}")
        if self.codec not in CODEC_CHOICES:
            raise ValueError(f"--codec must be one of {CODEC_CHOICES}, got {self.codec!r}")
        if self.codec == "copy" and self.reshaping:
            raise ValueError(
                f"--codec copy keeps the source bytes; {', '.join(self.reshaping)} need --codec auto, h264 or vp9"
            )
        if self.dali_cpu and self.codec not in ("auto", "vp9"):
            raise ValueError(
                f"--dali-cpu chooses what --codec auto keeps; it does not apply to --codec {self.codec}"
            )
        if self.short_side is not None and (self.short_side < 16 or self.short_side % 2):
            raise ValueError(f"--short-side must be an even number >= 16, got {self.short_side}")
        for name in ("fps", "max_frames", "max_duration", "gop"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")

    @property
    def reshaping(self) -> list[str]:
        """The re-encode shape options given (each forces a transcode)."""
        return [f"--{k.replace('_', '-')}" for k in _RESHAPING if getattr(self, k)]

    @property
    def reencode_codec(self) -> str:
        """The codec of every re-encode (transcode or trim)."""
        if self.codec in ENCODERS:
            return self.codec
        return "vp9" if self.dali_cpu else "h264"

    @property
    def keep_codecs(self) -> frozenset[str]:
        """Codecs `auto` may keep as they are: NVDEC's, or DALI-CPU's with --dali-cpu."""
        return fmt.DALI_CPU_CODECS if self.dali_cpu else fmt.DALI_GPU_CODECS

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Ingested:
    """What a shard stores about one accepted video (its bytes, member extension, `.json` metadata)."""

    data: bytes
    ext: str
    meta: dict[str, Any]
    audio: bytes | None = None  # the `.flac` member (`--audio keep|optional`)


def stored_ext(info: StreamInfo) -> str | None:
    """Member extension when the source container can be stored as it is, else None."""
    names = info.container.split(",")
    if "matroska" in names or "webm" in names:
        return "webm" if info.codec in WEBM_CODECS else "mkv"
    if "mp4" in names and not (info.brand or "").startswith(("qt", "3g")):
        return "mp4"  # the mov demuxer also reads QuickTime and 3GP files: those are remuxed
    return None


def _nvdec_pixels(info: StreamInfo) -> bool:
    if info.pix_fmt is None or info.pix_fmt in NVDEC_PIX_FMTS:
        return True
    return info.pix_fmt in NVDEC_PIX_FMTS_10BIT and info.codec in ("hevc", "vp9", "av1")


def decide(info: StreamInfo, opts: IngestOptions, clip: Clip | None) -> tuple[str, str]:
    """(action, why) before anything is decoded; a remux or keep may still fall back to a transcode."""
    if opts.codec == "copy":
        if clip:
            raise RejectError(
                "a time range needs a re-encode: use --codec auto (default), h264 or vp9", "needs-reencode"
            )
        try:
            fmt.video_ext_for(info.container)
        except fmt.FormatError:
            raise RejectError(
                f"container {info.container.split(',')[0]} cannot be stored as-is with --codec copy "
                "(--codec auto, the default, remuxes it)",
                "needs-reencode",
            ) from None
        return "kept", "--codec copy"
    if clip:
        return "trimmed", f"time range {clip.start:g}-{clip.end:g}s"
    if opts.codec in ENCODERS:
        return "transcoded", f"--codec {opts.codec}"
    if opts.reshaping:
        return "transcoded", f"{', '.join(opts.reshaping)} re-encode"
    if info.codec not in opts.keep_codecs:
        readers = "DALI-CPU" if opts.dali_cpu else "NVDEC"
        return "transcoded", f"codec {info.codec} is not {readers}-decodable"
    if not opts.dali_cpu and not _nvdec_pixels(info):
        return "transcoded", f"pixel format {info.pix_fmt} of {info.codec} is not NVDEC-decodable"
    if stored_ext(info) is None:
        return (
            "remuxed",
            f"container {info.container.split(',')[0]}{f' ({info.brand})' if info.brand else ''}",
        )
    return "kept", "readable as it is"


def _bsf(codec: str) -> str | None:
    """MPEG-4 Part 2 from DivX/Xvid AVIs may pack a B-frame into its P-frame's packet, which NVDEC and
    a packet-counting reader get wrong: unpack it (a no-op for streams that are not packed)."""
    return "mpeg4_unpack_bframes" if codec == "mpeg4" else None


def _packets(container: av.container.InputContainer, codec: str) -> Iterator[av.Packet]:
    """The first video stream's packets, unpacked (`_bsf`), empty ones left out."""
    stream = container.streams.video[0]
    bsf = _bsf(codec)
    filt = av.bitstream.BitStreamFilterContext(bsf, stream) if bsf else None
    for packet in container.demux(stream):
        if packet.size:
            yield from filt.filter(packet) if filt else [packet]
    if filt:
        yield from filt.filter(None)


def _display_order(path: str, codec: str) -> list[int]:
    """Decode-order index of each displayed frame: tag packet k with pts=k, decode, read the tags back."""
    with av.open(path) as c:
        ctx = c.streams.video[0].codec_context
        order: list[int] = []
        for k, p in enumerate(_packets(c, codec)):
            p.pts = p.dts = k
            order += [f.pts for f in ctx.decode(p)]
        order += [f.pts for f in ctx.decode(None)]
    return order


def remux(path: str, ext: str, codec: str, order: list[int] | None = None, fps: float | None = None) -> bytes:
    """Copy the video packets into an mp4/webm in memory (bit-exact muxing). `order` (from
    `_display_order`, one entry per packet) rebuilds presentation timestamps at `fps` for containers that
    carry none (AVI): pts = display position, dts = decode position shifted so that dts <= pts."""
    rank = {k: j for j, k in enumerate(order)} if order and fps else None
    delay = max(k - j for k, j in rank.items()) if rank else 0
    tb = Fraction(1) / Fraction(fps).limit_denominator(1001) if rank and fps else None
    buf = io.BytesIO()
    with av.open(path, options={"fflags": "+genpts"}) as src:
        ist = src.streams.video[0]
        muxer = "webm" if ext == "webm" else "mp4"
        with av.open(buf, "w", format=muxer, options={"fflags": "+bitexact"}) as out:
            ost = out.add_stream_from_template(ist, opaque=True)
            for k, p in enumerate(_packets(src, codec)):
                if rank is not None:
                    p.time_base, p.pts, p.dts = tb, rank[k], k - delay
                p.stream = ost
                out.mux(p)
    return buf.getvalue()


def _remuxed(path: str, info: StreamInfo, src: Decoded) -> tuple[bytes, str] | str:
    """(bytes, ext) of a clean lossless remux, or the reason there is none (-> transcode)."""
    ext = "webm" if info.codec in WEBM_CODECS else "mp4"
    try:
        data = remux(path, ext, info.codec)
        got = inspect_stored(data)
        if got.problem and "presentation order" in got.problem and math.isfinite(info.fps):
            order = _display_order(path, info.codec)
            if sorted(order) != list(range(len(order))):
                return "remux: the decoder's display order does not cover every packet"
            data = remux(path, ext, info.codec, order, info.fps)
            got = inspect_stored(data)
    except (RejectError, av.FFmpegError, ValueError) as e:
        return f"remux failed: {e}"
    if got.problem:
        return f"remux: {got.problem}"
    if got.frames != src.frames:
        return f"remux decodes to {got.frames} frames, the source to {src.frames}"
    return data, ext


def _even(x: float) -> int:
    return max(2, round(x / 2) * 2)


def _shape(info: StreamInfo, opts: IngestOptions) -> tuple[float, float, int, int, float]:
    """(source fps, output fps, width, height, frame limit) of a re-encode."""
    src_fps = info.fps if info.fps and math.isfinite(info.fps) else 25.0
    out_fps = float(opts.fps or src_fps)
    w, h = info.width, info.height
    if opts.short_side:
        scale = opts.short_side / min(w, h)
        w, h = _even(w * scale), _even(h * scale)
    else:
        w, h = _even(w), _even(h)
    limit = float(opts.max_frames or math.inf)
    if opts.max_duration:
        limit = min(limit, math.floor(opts.max_duration * out_fps + 1e-6))
    return src_fps, out_fps, w, h, limit


def _encode_frames(path: str, tmp: Path, info: StreamInfo, opts: IngestOptions, clip: Clip | None) -> int:
    """Decode `path` (from its first frame), keep the clip's frames, resample/resize, encode to `tmp`.
    Returns the number of frames written; checks the source's completeness (or the clip's end)."""
    src_fps, out_fps, w, h, limit = _shape(info, opts)
    eps = 0.25 / src_fps
    written, seen, t0, rel = 0, 0, None, 0.0
    with (
        open_video(path) as container,
        VideoWriter(
            tmp, opts.reencode_codec, Fraction(out_fps).limit_denominator(1001), w, h, gop=opts.gop
        ) as writer,
    ):
        for frame in iter_frames(container):
            t = frame.time if frame.time is not None else seen / src_fps
            t0 = t if t0 is None else t0
            rel, seen = t - t0, seen + 1
            if clip and rel < clip.start - eps:
                continue
            if clip and rel >= clip.end - eps:
                break
            at = rel - clip.start if clip else rel
            # output frame i shows at i/out_fps: emit this source frame for every slot it covers
            while written < limit and (opts.fps is None or written / out_fps <= at + 0.5 / src_fps):
                rgb = frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="BILINEAR")
                writer.write_rgb(np.ascontiguousarray(rgb))
                written += 1
                if opts.fps is None:
                    break
        if clip and clip.end > rel + 1 / src_fps + eps:
            end = rel + 1 / src_fps
            raise RejectError(
                f"time range {clip.start:g}-{clip.end:g}s ends past the video ({end:.3f}s)", "bad-time-range"
            )
        if written == 0 and seen:
            raise RejectError(
                "no frame within the requested time range / --max-frames / --max-duration", "bad-time-range"
            )
    if not clip:
        check_complete(info, seen, rel + (t0 or 0.0))
    return written


def _reencode(
    path: str, info: StreamInfo, opts: IngestOptions, clip: Clip | None, workdir: str | os.PathLike | None
) -> tuple[bytes, str, dict[str, Any]]:
    _, out_fps, w, h, _ = _shape(info, opts)
    ext = ENCODERS[opts.reencode_codec][1]
    tmp_dir = Path(workdir) if workdir else Path(path).parent
    tag = hashlib.sha256(f"{path}#{clip}".encode()).hexdigest()[:12]
    tmp = tmp_dir / f".transcode-{os.getpid()}-{tag}.{ext}"
    try:
        written = _encode_frames(path, tmp, info, opts, clip)
        data = tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    got = inspect_stored(data, " (re-encoded)")
    if got.problem or got.frames != written:
        raise RejectError(
            f"error: the re-encode decodes to {got.frames} of {written} frames ({got.problem})", "error"
        )
    return (
        data,
        ext,
        {"codec": opts.reencode_codec, "frames": written, "fps": out_fps, "width": w, "height": h},
    )


def _keep_or_fall_back(
    path: str, info: StreamInfo, src: Decoded, action: str, opts: IngestOptions
) -> tuple[bytes, str] | str:
    """The source bytes (kept) or a lossless remux; a str says why neither is clean (-> transcode)."""
    if action == "remuxed":
        return _remuxed(path, info, src)
    if src.problem:
        if opts.codec == "copy":
            raise RejectError(
                f"{src.problem}: the loaders need one frame per packet in timestamp order "
                "(use --codec auto, the default, to remux or re-encode it)",
                "needs-reencode",
            )
        return src.problem
    return Path(path).read_bytes(), stored_ext(info) or fmt.video_ext_for(info.container)


def ingest_video(
    path: str | os.PathLike,
    opts: IngestOptions,
    clip: Clip | None = None,
    workdir: str | os.PathLike | None = None,
) -> Ingested:
    """Decide, store, gate and describe one input. Raises `RejectError` (reason + kind) for anything a shard
    must not contain."""
    path = str(path)
    with open_video(path) as container:
        info = stream_info(container)
        action, why = decide(info, opts, clip)
        src = decode_all(container) if action in ("kept", "remuxed") else None
    out: dict[str, Any]
    if src is not None:
        check_complete(info, src.frames, src.last_time)
        got = _keep_or_fall_back(path, info, src, action, opts)
        if isinstance(got, str):
            action, why = "transcoded", got
        else:
            data, ext = got
            out = {
                "codec": info.codec,
                "frames": src.frames,
                "fps": info.fps,
                "width": src.width,
                "height": src.height,
            }
    if action in ("transcoded", "trimmed"):
        data, ext, out = _reencode(path, info, opts, clip, workdir)
    fps = out["fps"]
    finite = bool(fps) and math.isfinite(fps)
    out["duration"] = round(out["frames"] / fps, 6) if finite else None
    out["fps"] = round(fps, 6) if finite else None
    out |= {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "ingest": action,
        "ingest_reason": why,
    }
    out |= info_json(info)
    if clip:
        out |= {"clip_start": clip.start, "clip_end": clip.end}
    audio = _sound(path, opts, clip, out) if opts.audio != "drop" else None
    return Ingested(data=data, ext=ext, meta=out, audio=audio)


def _sound(path: str, opts: IngestOptions, clip: Clip | None, meta: dict[str, Any]) -> bytes | None:
    """The stored video's sound (`data_shards/audio.py`), its facts into `meta["audio"]`. No usable sound:
    RejectError with `--audio keep`; with `--audio optional` None, and the reason in `meta["audio_missing"]`."""
    try:
        if not meta["duration"]:
            raise RejectError("audio needs the video's frame rate, which it does not declare", "audio-short")
        data, meta["audio"] = sound.extract(
            path, clip.start if clip else 0.0, meta["duration"], opts.audio_rate
        )
    except RejectError as e:
        if opts.audio == "keep":
            raise
        meta["audio"], meta["audio_missing"] = None, f"{e.kind}: {e}"
        return None
    return data
