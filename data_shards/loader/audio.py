"""The sound of a sampled clip: the window of a sample's `.flac` member that goes with its frames, and log-mel
features of it. Every backend gets it the same way (`VideoLoader.collect`, on the same keys, order and resume
as the pixels: DALI decodes the video, this decodes the sound).

A view's window is `AudioSpec.seconds` long, centred on the middle of the view's sampled frames (frame i is at
i / fps, the member's sample 0 at frame 0); where it runs past the sound it is zero. With `offsets` (the
audio-visual sync task) each view's sound is shifted by one of them, drawn per (seed, epoch, sample, view)
like every other random draw (one per video: its views share it, as every view of a real file shares the
file's offset): offset o > 0 means the sound is *late* by o seconds (the window is taken o earlier, so what
is heard now happened o ago); `audio_offset` in the batch says which was drawn, `audio_shift` its index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

AUDIO_FEATURES = ("waveform", "logmel")


@dataclass(frozen=True)
class AudioSpec:
    """What sound a loader returns beside each clip (`SamplingSpec.audio`)."""

    rate: int = 16000
    seconds: float = 1.0
    feature: str = "logmel"  # waveform: float [B, S]; logmel: float [B, n_mels, frames] (25 ms / 10 ms)
    n_mels: int = 64
    offsets: tuple[float, ...] = ()  # seconds the sound is shifted by (one drawn per clip); () = in sync
    sync_prob: float = 0.5  # with offsets including 0: the share of clips left in sync

    def __post_init__(self) -> None:
        if self.feature not in AUDIO_FEATURES:
            raise ValueError(f"audio feature must be one of {AUDIO_FEATURES}, got {self.feature!r}")
        if self.rate < 4000 or self.seconds <= 0 or self.n_mels < 8:
            raise ValueError(f"audio rate >= 4000, seconds > 0 and n_mels >= 8, got {self}")
        if not 0.0 <= self.sync_prob <= 1.0:
            raise ValueError(f"audio sync_prob must be in [0, 1], got {self.sync_prob}")

    @property
    def samples(self) -> int:
        return round(self.seconds * self.rate)

    @property
    def hop(self) -> int:
        return self.rate // 100

    @property
    def n_fft(self) -> int:
        return 1 << math.ceil(math.log2(self.rate * 0.025))

    @property
    def steps(self) -> int:
        """Log-mel frames per window."""
        return self.samples // self.hop + 1


def draw_offset(spec: AudioSpec, seed: int, epoch: int, index: int) -> float:
    """The shift of one video's sound, a pure function of (seed, epoch, sample)."""
    if not spec.offsets:
        return 0.0
    rng = np.random.default_rng([seed, epoch, index, 0xA5])
    shifted = [o for o in spec.offsets if o != 0.0]
    if 0.0 in spec.offsets and (not shifted or rng.random() < spec.sync_prob):
        return 0.0
    return float(shifted[int(rng.integers(len(shifted)))])


def window(wave: np.ndarray, rate: int, centre_s: float, spec: AudioSpec, offset: float) -> np.ndarray:
    """`spec.seconds` of `wave` (at `rate` = spec.rate) centred on `centre_s`, shifted late by `offset`."""
    n = spec.samples
    first = round((centre_s - spec.seconds / 2 - offset) * rate)
    out = np.zeros(n, np.float32)
    lo, hi = max(first, 0), min(first + n, len(wave))
    if hi > lo:
        out[lo - first : hi - first] = wave[lo:hi]
    return out


def clip_windows(
    wave: np.ndarray, frames: np.ndarray, views: list[int], fps: float, spec: AudioSpec, offsets: list[float]
) -> np.ndarray:
    """float32 [V, S]: each view's window; `frames` [C*T] the sampled frame indices, `views` each view's clip."""
    if fps <= 0:
        raise ValueError("the video's frame rate is unknown: its sound cannot be aligned")
    t = len(frames) // max(1, max(views) + 1)
    out = np.empty((len(views), spec.samples), np.float32)
    for k, (clip, offset) in enumerate(zip(views, offsets)):
        part = frames[clip * t : (clip + 1) * t]
        centre = (float(part.min()) + float(part.max()) + 1.0) / 2.0 / fps
        out[k] = window(wave, spec.rate, centre, spec, offset)
    return out


def _mel_filters(spec: AudioSpec) -> torch.Tensor:
    """HTK mel filterbank [n_fft // 2 + 1, n_mels] (triangles between 0 Hz and Nyquist)."""

    def mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    bins = spec.n_fft // 2 + 1
    freqs = np.linspace(0, spec.rate / 2, bins)
    edges = 700.0 * (10 ** (np.linspace(0, mel(np.array(spec.rate / 2)), spec.n_mels + 2) / 2595.0) - 1.0)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up, down = (freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)
    return torch.from_numpy(np.maximum(0.0, np.minimum(up, down)).T.astype(np.float32))


def log_mel(wave_BS: torch.Tensor, spec: AudioSpec) -> torch.Tensor:
    """float [B, n_mels, steps]: log(mel power + 1e-6) of 25 ms Hann windows every 10 ms (centred)."""
    win = round(spec.rate * 0.025)
    stft = torch.stft(
        wave_BS.float(),
        n_fft=spec.n_fft,
        hop_length=spec.hop,
        win_length=win,
        window=torch.hann_window(win),
        center=True,
        return_complex=True,
    )
    power = stft.abs().pow(2)  # [B, bins, steps]
    mel = torch.einsum("bfs,fm->bms", power, _mel_filters(spec))
    return torch.log(mel + 1e-6)


def features(wave_BS: torch.Tensor, spec: AudioSpec) -> torch.Tensor:
    """What the batch's "audio" holds: the waveform itself, or its log-mel."""
    return wave_BS if spec.feature == "waveform" else log_mel(wave_BS, spec)
