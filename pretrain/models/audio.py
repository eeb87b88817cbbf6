"""The ears of an audio-visual model: a small log-mel encoder and the fusion that sets it beside the video
encoder's per-time-step features (SyncNet / AVTS style: is the sound in step with the picture, and by how much
is it off).

`AudioBranch(cfg, video_dim)(video_BTD, audio_BMF) -> feat_BD`: the video features per time step [B, T', D]
(any classifier's temporal features) and the clip's log-mel [B, n_mels, steps] are brought to `cfg.steps` time
steps of `cfg.dim` channels each over the same window, then correlated per channel at every lag up to
`cfg.max_lag` steps (SyncNet's offset search, done inside the network: the lag where picture and sound agree
is what the task asks). The correlations and both streams' pooled features become one clip feature of the
video width, which the classifier's linear head turns into logits. `modality="audio"` replaces the picture
by zeros: the audio-only baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MODALITIES = ("both", "audio")


@dataclass
class AudioBranchConfig:
    n_mels: int = 64
    channels: tuple[int, ...] = (16, 32, 64)  # the log-mel CNN (stride 2 per layer in time and frequency)
    dim: int = 64  # channels per time step of both streams
    steps: int = 16  # time steps over the window
    max_lag: int = 8  # lags (in steps) the streams are correlated at, both ways
    modality: str = "both"  # both | audio (baseline: the video features are not used)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"audio modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.n_mels < 8 or self.dim < 1 or self.steps < 1 or not self.channels:
            raise ValueError(
                f"audio branch: n_mels >= 8, dim >= 1, steps >= 1 and channels needed, got {self}"
            )

    @classmethod
    def for_classifier(
        cls, audio: AudioBranchConfig | dict | None, temporal: bool
    ) -> AudioBranchConfig | None:
        """A classifier config's `audio` field: rebuilt from its config.json dict, and refused with a
        temporal head (an audio-visual model scores whole clips)."""
        if isinstance(audio, dict):
            audio = cls(**{k: tuple(v) if k == "channels" else v for k, v in audio.items()})
        if audio is not None and temporal:
            raise ValueError("an audio-visual model scores whole clips: temporal=True does not apply")
        return audio


class AudioBranch(nn.Module):
    """Log-mel CNN + per-time-step fusion with the video features (see the module docstring)."""

    def __init__(self, cfg: AudioBranchConfig, video_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c_in = 1
        for c in cfg.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        self.ears = nn.Sequential(*layers)
        self.audio_proj = _step_mlp(c_in, cfg.dim)
        self.video_proj = _step_mlp(video_dim, cfg.dim)
        lags = 2 * cfg.max_lag + 1
        self.out = nn.Sequential(
            nn.Linear(cfg.dim * (lags + 2), video_dim), nn.GELU(), nn.LayerNorm(video_dim)
        )

    def forward(self, video_BTD: torch.Tensor, audio_BMF: torch.Tensor) -> torch.Tensor:
        if audio_BMF.ndim != 3 or audio_BMF.shape[1] != self.cfg.n_mels:
            raise ValueError(
                f"audio must be log-mel [B, {self.cfg.n_mels}, steps], got {tuple(audio_BMF.shape)} "
                "(data: the loader's audio feature logmel)"
            )
        # normalise each clip's log-mel (loudness differs between recordings, timing is what matters)
        x = audio_BMF - audio_BMF.mean(dim=(1, 2), keepdim=True)
        x = x / x.std(dim=(1, 2), keepdim=True).clamp_min(1e-3)
        dtype = self.out[0].weight.dtype
        a = self.ears(x.unsqueeze(1).to(dtype)).mean(dim=2)  # [B, C, F']
        a = self.audio_proj(F.interpolate(a, size=self.cfg.steps, mode="linear", align_corners=False))
        v = video_BTD.transpose(1, 2)  # [B, D, T']
        if self.cfg.modality == "audio":
            v = torch.zeros_like(v)
        v = self.video_proj(F.interpolate(v, size=self.cfg.steps, mode="linear", align_corners=False))
        corr = lagged_correlation(_changes(v), _changes(a), self.cfg.max_lag)
        return self.out(torch.cat([corr.flatten(1), v.mean(2), a.mean(2)], dim=1))


def _changes(x_BCS: torch.Tensor) -> torch.Tensor:
    """What varies over the window: each channel minus its mean over time, unit norm per step. A clip's
    static look (and a recording's constant hum) says nothing about when things happen."""
    return F.normalize(x_BCS - x_BCS.mean(dim=2, keepdim=True), dim=1)


def _step_mlp(c_in: int, c_out: int) -> nn.Module:
    """Per time step features (a width-3 temporal convolution, then a 1x1)."""
    return nn.Sequential(nn.Conv1d(c_in, c_out, 3, padding=1), nn.GELU(), nn.Conv1d(c_out, c_out, 1))


def lagged_correlation(v_BCS: torch.Tensor, a_BCS: torch.Tensor, max_lag: int) -> torch.Tensor:
    """Per channel, the mean product of the video at step s and the sound at step s + k, for k in
    [-max_lag, max_lag]: [B, C, 2 * max_lag + 1] (k > 0: the sound comes later)."""
    s = v_BCS.shape[2]
    out = []
    for k in range(-max_lag, max_lag + 1):
        lo, hi = max(0, -k), min(s, s - k)
        out.append((v_BCS[:, :, lo:hi] * a_BCS[:, :, lo + k : hi + k]).mean(2) * s)
    return torch.stack(out, dim=2)
