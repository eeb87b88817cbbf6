"""Deterministic video encoding shared by the synthetic set and the shard transcoder.

Same frames in, same bytes out, on every run and worker: single-threaded encoders, bit-exact
muxing, explicit timestamps, fully written frame buffers, and x264's mb-tree rate control off
(its lookahead reads memory that other encodes in the process left behind).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

# codec name -> (FFmpeg encoder, container extension, encoder options)
# the sound a video of that codec carries: (encoder, sample rate) -- AAC in mp4, Opus (48 kHz only) in webm
AUDIO_ENCODERS: dict[str, tuple[str, int]] = {"h264": ("aac", 16000), "vp9": ("libopus", 48000)}
ENCODERS: dict[str, tuple[str, str, dict[str, str]]] = {
    "h264": ("libx264", "mp4", {"crf": "20", "preset": "veryfast", "x264-params": "mbtree=0"}),
    "vp9": (
        "libvpx-vp9",
        "webm",
        {"crf": "30", "b": "0", "deadline": "good", "cpu-used": "5", "row-mt": "0"},
    ),
}


def rgb_to_yuv420p(rgb_HWC: np.ndarray) -> np.ndarray:
    """BT.601 limited-range planar yuv420p as [H*3/2, W] uint8 (done here so it is exactly repeatable)."""
    x = rgb_HWC.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
    cb = 128 - 37.797 * r - 74.203 * g + 112.0 * b
    cr = 128 + 112.0 * r - 93.786 * g - 18.214 * b
    h, w = y.shape

    def sub(c: np.ndarray) -> np.ndarray:
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)).reshape(h // 4, w)

    return np.clip(np.rint(np.concatenate([y, sub(cb), sub(cr)], axis=0)), 0, 255).astype(np.uint8)


def yuv_frame(yuv: np.ndarray) -> av.VideoFrame:
    """A yuv420p frame whose plane buffers are written whole, row padding included."""
    w, h = yuv.shape[1], yuv.shape[0] * 2 // 3
    frame = av.VideoFrame(w, h, "yuv420p")
    rows = [yuv[:h], yuv[h : h + h // 4].reshape(h // 2, w // 2), yuv[h + h // 4 :].reshape(h // 2, w // 2)]
    for plane, data in zip(frame.planes, rows):
        padded = np.zeros((data.shape[0], plane.line_size), np.uint8)
        padded[:, : data.shape[1]] = data
        plane.update(padded.tobytes() + bytes(plane.buffer_size - padded.size))
    return frame


class VideoWriter:
    """`with VideoWriter(path, "h264", fps, width, height) as w: w.write_rgb(frame_HWC)`."""

    def __init__(
        self,
        path: str | Path,
        codec: str,
        fps: float | Fraction,
        width: int,
        height: int,
        gop: int | None = None,
        audio: bool = False,
    ) -> None:
        """`audio`: the file also gets a mono sound track (`AUDIO_ENCODERS[codec]`), written whole with
        `write_audio` before closing."""
        if codec not in ENCODERS:
            raise ValueError(f"codec must be one of {sorted(ENCODERS)}, got {codec!r}")
        if width % 2 or height % 2:
            raise ValueError(f"yuv420p needs even width and height, got {width}x{height}")
        encoder, _, options = ENCODERS[codec]
        self.fps = Fraction(fps).limit_denominator(1001)
        self._container = av.open(str(path), mode="w", options={"fflags": "+bitexact"})
        self._stream = self._container.add_stream(encoder, rate=self.fps)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.flags |= av.codec.context.Flags.bitexact
        opts = {"threads": "1", **options}
        if gop:
            opts["g"] = str(gop)
        self._stream.options = opts
        self._n = 0
        self._audio = None
        if audio:
            enc, rate = AUDIO_ENCODERS[codec]
            self._audio = self._container.add_stream(enc, rate=rate, layout="mono")
            self._audio.codec_context.flags |= av.codec.context.Flags.bitexact

    @property
    def audio_rate(self) -> int:
        """Samples per second `write_audio` takes."""
        if self._audio is None:
            raise ValueError("this writer has no sound track (audio=False)")
        return int(self._audio.codec_context.sample_rate)

    def write_audio(self, wave: np.ndarray) -> None:
        """The whole sound track: mono float samples in [-1, 1] at `audio_rate`, from the first frame's time."""
        rate = self.audio_rate
        assert self._audio is not None
        chunk = self._audio.codec_context.frame_size or 1024
        x = np.asarray(wave, np.float32)
        for lo in range(0, len(x), chunk):
            frame = av.AudioFrame.from_ndarray(x[None, lo : lo + chunk], format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, lo, Fraction(1, rate)
            self._container.mux(self._audio.encode(frame))
        self._container.mux(self._audio.encode(None))

    def write_rgb(self, rgb_HWC: np.ndarray) -> None:
        frame = yuv_frame(rgb_to_yuv420p(rgb_HWC))
        frame.pts = self._n
        frame.time_base = 1 / self.fps
        self._n += 1
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._container.close()
