"""Labelled synthetic motion clips for the demo and the tests.

Each clip shows striped shapes over a smooth, low-frequency background (about one colour cycle per
frame, like the large-scale structure of natural images). Its class is the *kind of motion*
(direction of travel, sense of rotation, growing or shrinking); any single frame is consistent
with every class, so a model has to use time to classify it. Everything is a pure function of
(seed, video index): same seed, same pixels, same bytes.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_shards.codec import ENCODERS, VideoWriter

# Ordered so that the first K make a sensible K-class problem (4 = the four directions).
MOTIONS: tuple[str, ...] = (
    "move_right",
    "move_left",
    "move_down",
    "move_up",
    "rotate_cw",
    "rotate_ccw",
    "grow",
    "shrink",
    "move_down_right",
    "move_up_left",
)

CODECS = tuple(ENCODERS)


@dataclass(frozen=True)
class SynthSpec:
    videos: int = 64
    classes: int = 4
    frames: int = 32
    size: int = 64
    fps: int = 16
    codec: str = "h264"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.classes <= len(MOTIONS):
            raise ValueError(f"--classes must be between 2 and {len(MOTIONS)}, got {self.classes}")
        if self.size < 16 or self.size % 2:
            raise ValueError(f"--size must be an even number >= 16 (yuv420p), got {self.size}")
        if self.frames < 2:
            raise ValueError(f"--frames must be >= 2, got {self.frames}")
        if self.codec not in CODECS:
            raise ValueError(f"--codec must be one of {sorted(CODECS)}, got {self.codec!r}")
        if self.videos < 1:
            raise ValueError(f"--videos must be >= 1, got {self.videos}")


def _texture(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Smooth coloured noise [size, size, 3] in [0, 1]: a few random sinusoid gratings per channel."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.zeros((size, size, 3), np.float32)
    for c in range(3):
        for _ in range(3):
            fx, fy = rng.uniform(-scale, scale, 2)
            out[..., c] += np.sin(2 * math.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * math.pi))
    out = (out - out.min()) / (np.ptp(out) + 1e-6)
    return out


def render_clip(index: int, spec: SynthSpec) -> tuple[np.ndarray, str]:
    """Frames uint8 [T, H, W, 3] and the motion name of video `index`."""
    rng = np.random.default_rng([spec.seed, index])
    label = int(rng.integers(spec.classes))
    motion = MOTIONS[label]
    s, t_n = spec.size, spec.frames
    # smooth: masked background patches are predictable from their neighbours, so a masked autoencoder's
    # loss is dominated by where the moving shapes are, i.e. by the motion (4.0 made it unpredictable noise)
    background = 0.35 + 0.3 * _texture(rng, s, 1.0)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    shapes = []
    for _ in range(int(rng.integers(1, 3))):
        shapes.append(
            dict(
                kind=int(rng.integers(3)),  # circle, square, diamond
                cx=rng.uniform(0, s),
                cy=rng.uniform(0, s),
                radius=rng.uniform(0.12, 0.2) * s,
                angle=rng.uniform(0, 2 * math.pi),
                speed=rng.uniform(0.6, 1.2) * s / t_n,  # about one frame width per clip
                spin=rng.uniform(1.5, 3.0) * math.pi / t_n,
                color=rng.uniform(0.0, 1.0, 3).astype(np.float32),
                stripes=rng.uniform(0.3, 0.6),
            )
        )
    direction = {
        "move_right": (1, 0),
        "move_left": (-1, 0),
        "move_down": (0, 1),
        "move_up": (0, -1),
        "move_down_right": (0.7071, 0.7071),
        "move_up_left": (-0.7071, -0.7071),
    }.get(motion, (0, 0))
    frames = np.empty((t_n, s, s, 3), np.uint8)
    for t in range(t_n):
        img = background.copy()
        for sh in shapes:
            cx = sh["cx"] + direction[0] * sh["speed"] * t
            cy = sh["cy"] + direction[1] * sh["speed"] * t
            angle = sh["angle"] + {"rotate_cw": 1, "rotate_ccw": -1}.get(motion, 0) * sh["spin"] * t
            growth = {"grow": 1, "shrink": -1}.get(motion, 0)
            radius = sh["radius"] * (1 + growth * 0.6 * (t / (t_n - 1) - 0.5))
            # torus distance so shapes wrap around instead of leaving the frame
            dx = (xx - cx + s / 2) % s - s / 2
            dy = (yy - cy + s / 2) % s - s / 2
            u = (math.cos(angle) * dx + math.sin(angle) * dy) / radius
            v = (-math.sin(angle) * dx + math.cos(angle) * dy) / radius
            inside = [u * u + v * v < 1, np.maximum(abs(u), abs(v)) < 0.85, abs(u) + abs(v) < 1.1][sh["kind"]]
            pattern = 0.55 + 0.45 * np.sign(np.sin(u * math.pi / sh["stripes"]))[..., None]
            img = np.where(inside[..., None], sh["color"] * pattern, img)
        frames[t] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return frames, motion


def encode_clip(frames_THWC: np.ndarray, path: str | Path, codec: str, fps: int) -> None:
    with VideoWriter(path, codec, fps, frames_THWC.shape[2], frames_THWC.shape[1]) as writer:
        for rgb in frames_THWC:
            writer.write_rgb(rgb)


def write_synthetic_set(out: str | Path, spec: SynthSpec) -> Path:
    """Write `spec.videos` clips under `out/videos/` and `out/labels.csv` (path,label); returns the CSV."""
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    ext = ENCODERS[spec.codec][1]
    rows = []
    for i in range(spec.videos):
        frames, motion = render_clip(i, spec)
        rel = f"videos/{i:06d}_{motion}.{ext}"
        encode_clip(frames, out / rel, spec.codec, spec.fps)
        rows.append((rel, motion))
    csv_path = out / "labels.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return csv_path
