"""The sound beside the picture: take a video's audio track out at build time, check it, store it, read it back.

Stored form (`--audio keep|optional`): the member `{key}.flac`, mono 16-bit FLAC at `--audio-rate` (16 kHz by
default), cut so that its first sample is at the time of the stored video's first frame (for a time range: the
range's start) and lasting as long as the stored video. A loader finds the sound of frame i at i / fps seconds
with no offset bookkeeping, whatever the source's container put first or the track's own rate was (FLAC is
lossless, so nothing is lost past the resampling). The `.json` metadata says what was done (`audio`: codec,
rate, samples, seconds, the source codec and rate, `covered`: the seconds of the video the source's sound
covers).

Validation: the source track is decoded to its end; undecodable sound, no audio stream, or sound covering less
of the video than `SHORT_TOLERANCE` allows is a `RejectError` (kinds `audio-undecodable`, `no-audio-stream`,
`audio-short`): `--audio keep` rejects the sample with it, `--audio optional` keeps the video without sound
and counts the reason.
"""

from __future__ import annotations

import hashlib
import io
import math
from typing import Any

import av
import numpy as np

from data_shards.probe import RejectError

AUDIO_MODES = ("drop", "keep", "optional")
DEFAULT_RATE = 16000
CODEC = "flac"


def short_tolerance(duration: float) -> float:
    """Seconds of a video its sound may leave uncovered: half a second, or 5 % of a long video."""
    return max(0.5, 0.05 * duration)


def _resampler(rate: int) -> av.AudioResampler:
    return av.AudioResampler(format="flt", layout="mono", rate=rate)


def _frames_to_array(frames: list[av.AudioFrame]) -> np.ndarray:
    parts = [f.to_ndarray().reshape(-1) for f in frames if f.samples]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def first_video_time(container: av.container.InputContainer) -> float:
    """Presentation time of the first decoded frame of the first video stream (0 without timestamps)."""
    for frame in container.decode(container.streams.video[0]):
        return float(frame.time) if frame.time is not None else 0.0
    return 0.0


def decode_track(
    container: av.container.InputContainer, rate: int
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """The first audio stream decoded to its end, mono float32 at `rate`: (samples, time of the first sample,
    what the source was). RejectError when there is none or it does not decode."""
    if not container.streams.audio:
        raise RejectError("no audio stream", "no-audio-stream")
    stream = container.streams.audio[0]
    source = {
        "source_codec": stream.codec_context.name,
        "source_rate": int(stream.codec_context.sample_rate or 0),
    }
    resampler, out, start = _resampler(rate), [], None
    try:
        for frame in container.decode(stream):
            if start is None and frame.time is not None:
                start = float(frame.time)
            out += resampler.resample(frame)
        out += resampler.resample(None)
    except av.FFmpegError as e:
        raise RejectError(f"audio undecodable: {e}", "audio-undecodable") from None
    wave = _frames_to_array(out)
    if not len(wave):
        raise RejectError("audio undecodable: no sample decoded", "audio-undecodable")
    return wave, start or 0.0, source


def encode_flac(wave: np.ndarray, rate: int) -> bytes:
    """Mono float samples in [-1, 1] → FLAC bytes (16-bit), deterministic (bit-exact muxing)."""
    pcm = np.clip(np.round(wave * 32767.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    with av.open(buf, "w", format="flac", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(CODEC, rate=rate, layout="mono")
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for lo in range(0, len(pcm), 4096):
            frame = av.AudioFrame.from_ndarray(pcm[None, lo : lo + 4096], format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, lo
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def decode_member(data: bytes, rate: int | None = None) -> tuple[np.ndarray, int]:
    """A stored `.flac` member → (mono float32 samples, rate); resampled when `rate` differs."""
    with av.open(io.BytesIO(data)) as c:
        if not c.streams.audio:
            raise ValueError("the audio member holds no audio stream")
        native = int(c.streams.audio[0].codec_context.sample_rate)
        want = rate or native
        resampler = _resampler(want)
        frames = [f2 for f in c.decode(audio=0) for f2 in resampler.resample(f)]
        frames += resampler.resample(None)
    return _frames_to_array(frames), want


def aligned(src: str | bytes, rate: int) -> tuple[np.ndarray, float, dict[str, Any]]:
    """A file's (path or bytes) sound, mono at `rate`: (samples, time of the first one relative to the first
    video frame, what the source track was). RejectError when it has no usable sound."""

    def opened() -> av.container.InputContainer:
        return av.open(io.BytesIO(src) if isinstance(src, bytes) else src)

    with opened() as c:
        t0 = first_video_time(c) if c.streams.video else 0.0
    with opened() as c:
        wave, a0, source = decode_track(c, rate)
    return wave, a0 - t0, source


def extract(path: str, start: float, duration: float, rate: int) -> tuple[bytes, dict[str, Any]]:
    """The source's sound from `start` (seconds after its first video frame) for `duration` seconds, as the
    stored FLAC and its metadata. RejectError when there is no usable sound for it."""
    try:
        wave, lead, source = aligned(path, rate)
    except RejectError as e:
        if e.kind == "no-audio-stream":  # what the build's options make of it
            raise RejectError(f"{e} (--audio keep needs one; --audio optional keeps the video)", e.kind) from None
        raise
    n = max(1, round(duration * rate))
    first = round((lead - start) * rate)  # where the source's first sample lands in the stored window
    out = np.zeros(n, np.float32)
    lo, hi = max(first, 0), min(first + len(wave), n)
    if hi > lo:
        out[lo:hi] = wave[lo - first : hi - first]
    covered = max(0, hi - lo) / rate
    if covered < duration - short_tolerance(duration):
        raise RejectError(
            f"audio short: the sound covers {covered:.2f}s of the {duration:.2f}s video", "audio-short"
        )
    data = encode_flac(out, rate)
    check_member(data, n, rate)
    meta = {
        "codec": CODEC,
        "rate": rate,
        "samples": n,
        "seconds": round(n / rate, 6),
        "covered": round(covered, 3),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return data, meta | source


def from_first_frame(src: str | bytes, rate: int) -> np.ndarray:
    """A file's sound with sample 0 at its first video frame (zeros before the sound starts): what a stored
    member holds, for a file that never went through a build (predict, serve)."""
    wave, lead, _ = aligned(src, rate)
    first = round(lead * rate)
    if first >= 0:
        return np.concatenate([np.zeros(first, np.float32), wave])
    return wave[-first:]


def check_member(data: bytes, samples: int, rate: int) -> None:
    """The gate: the stored FLAC decodes to exactly the samples its metadata records."""
    try:
        got, _ = decode_member(data)
    except (av.FFmpegError, ValueError) as e:
        raise RejectError(f"audio undecodable after encoding: {e}", "audio-undecodable") from None
    if len(got) != samples:
        raise RejectError(f"audio member decodes to {len(got)} of {samples} samples", "audio-undecodable")


def audio_problem(data: bytes | None, meta: dict[str, Any]) -> str | None:
    """What `verify` says about a sample's sound: None when the member agrees with its metadata."""
    info = meta.get("audio")
    if info is None:
        return "an audio member without `audio` metadata" if data is not None else None
    if data is None:
        return "metadata describes audio but the sample has no .flac member"
    try:
        got, rate = decode_member(data)
    except (av.FFmpegError, ValueError) as e:
        return f"audio does not decode: {e}"
    if rate != info.get("rate") or len(got) != info.get("samples"):
        return f"audio decodes to {len(got)} samples at {rate} Hz, metadata says {info.get('samples')} at {info.get('rate')}"
    duration = meta.get("duration")
    if (
        isinstance(duration, (int, float))
        and math.isfinite(duration)
        and abs(len(got) / rate - duration) > 0.05
    ):
        return f"audio lasts {len(got) / rate:.2f}s, the video {duration:.2f}s"
    return None
