"""Labelled synthetic motion clips for the demo and the tests.

Each clip shows striped shapes over a smooth, low-frequency background (about one colour cycle per
frame, like the large-scale structure of natural images). Its class is the *kind of motion*
(direction of travel, sense of rotation, growing or shrinking); any single frame is consistent
with every class, so a model has to use time to classify it. Everything is a pure function of
(seed, domain, video index): same seed and domain, same pixels, same bytes.

Label kinds: one motion per clip (default); `--multi-label`: each shape moves its own way and the clip's labels
are the set of motions on screen (1-3); `--segments`: longer videos whose shapes stand still, then move
one way, then another, with the moving stretches as labelled segments (`segments.csv`, seconds) and the still
ones as background, so a temporal model has to tell *when* each motion happens. `--audio` (any kind) adds a
sound track whose clicks happen exactly when the picture flashes, at irregular times: the sound is in sync
only at offset 0, so audio-visual synchronisation is learnable.

Domains (`--domain`, for domain-incremental learning) change how a clip looks, never what its class
means: the same index has the same motion and shapes in every domain, drawn over another background
family and palette at another speed. Domain 0 is the original look (its bytes are unchanged).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_shards.codec import AUDIO_ENCODERS, ENCODERS, VideoWriter

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
MIN_SEGMENT_FRAMES = 8  # the shortest still or moving stretch of a --segments video
SEGMENT_PACE_FRAMES = 24  # --segments shapes move as fast as in a clip of this many frames
# Looks of the same classes: 0 the original smooth pastel texture; 1 dark background, bright shapes;
# 2 diagonal two-colour stripes, faster motion; 3 sepia tones, coarser texture, slower motion.
DOMAINS: tuple[str, ...] = ("smooth", "night", "stripes", "sepia")


@dataclass(frozen=True)
class SynthSpec:
    videos: int = 64
    classes: int = 4
    frames: int = 32
    size: int = 64
    fps: int = 16
    codec: str = "h264"
    seed: int = 0
    domain: int = 0
    shuffle_labels: bool = False  # the label column permuted (seeded): a mislabelled batch
    multi_label: bool = False  # several shapes, each its own motion: labels = the set of motions
    segments: bool = False  # still / moving stretches: labelled segments + background
    audio: bool = False  # a sound track of clicks, each heard when the picture flashes (`render_sound`)
    audio_delay: float = 0.0  # seconds the clicks come after their flashes (< 0: before): out-of-sync clips

    def __post_init__(self) -> None:
        if self.multi_label and self.segments:
            raise ValueError("--multi-label and --segments are different label kinds: pick one")
        if self.segments and self.frames < 3 * MIN_SEGMENT_FRAMES:
            raise ValueError(f"--segments needs --frames >= {3 * MIN_SEGMENT_FRAMES}, got {self.frames}")
        if not 0 <= self.domain < len(DOMAINS):
            raise ValueError(
                f"--domain must be in 0..{len(DOMAINS) - 1} ({', '.join(DOMAINS)}), got {self.domain}"
            )
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
        if self.audio_delay and not self.audio:
            raise ValueError("--audio-delay shifts the sound: it needs --audio")


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


@dataclass(frozen=True)
class _Style:
    """How a domain draws a clip: background, a map of the shapes' colours, speed, a whole-frame tint."""

    background: np.ndarray  # float [S, S, 3] in [0, 1]
    colour: Callable[[np.ndarray], np.ndarray]
    speed: float = 1.0
    tint: Callable[[np.ndarray], np.ndarray] | None = None


def _sepia(img: np.ndarray) -> np.ndarray:
    grey = img @ np.array([0.299, 0.587, 0.114], np.float32)
    return grey[..., None] * np.array([1.0, 0.8, 0.55], np.float32)


def _style(domain: int, background: np.ndarray, rng: np.random.Generator, s: int) -> _Style:
    """Domain 0 keeps the original look; the others draw from their own generator (`rng`)."""
    if domain == 0:
        return _Style(background, lambda c: c)
    if domain == 1:  # night: dark background, bright shapes
        return _Style(0.03 + 0.12 * _texture(rng, s, 1.0), lambda c: 0.6 + 0.4 * c)
    if domain == 2:  # stripes: two pastel colours on a diagonal, darker shapes, faster
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        period, phase = s / rng.uniform(3, 5), rng.uniform(0, 2 * math.pi)
        a, b = (0.6 + 0.35 * rng.uniform(0, 1, 3).astype(np.float32) for _ in range(2))
        on = np.sin(2 * math.pi * (xx + yy) / period + phase)[..., None] > 0
        return _Style(np.where(on, a, b), lambda c: 0.1 + 0.45 * c, speed=1.5)
    return _Style(0.3 + 0.5 * _texture(rng, s, 2.5), lambda c: c, speed=0.7, tint=_sepia)  # 3: sepia


def _shapes(rng: np.random.Generator, s: int, t_n: int) -> list[dict]:
    return [
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
        for _ in range(int(rng.integers(1, 3)))
    ]


_DIRECTION = {
    "move_right": (1, 0),
    "move_left": (-1, 0),
    "move_down": (0, 1),
    "move_up": (0, -1),
    "move_down_right": (0.7071, 0.7071),
    "move_up_left": (-0.7071, -0.7071),
}


def _paint(
    img: np.ndarray, sh: dict, at: tuple[float, float, float, float], style: _Style, grid: tuple
) -> np.ndarray:
    """One striped shape at (cx, cy, angle, radius) drawn over `img`."""
    yy, xx, s = grid
    cx, cy, angle, radius = at
    # torus distance so shapes wrap around instead of leaving the frame
    dx = (xx - cx + s / 2) % s - s / 2
    dy = (yy - cy + s / 2) % s - s / 2
    u = (math.cos(angle) * dx + math.sin(angle) * dy) / radius
    v = (-math.sin(angle) * dx + math.cos(angle) * dy) / radius
    inside = [u * u + v * v < 1, np.maximum(abs(u), abs(v)) < 0.85, abs(u) + abs(v) < 1.1][sh["kind"]]
    pattern = 0.55 + 0.45 * np.sign(np.sin(u * math.pi / sh["stripes"]))[..., None]
    return np.where(inside[..., None], style.colour(sh["color"]) * pattern, img)


def _finish(img: np.ndarray, style: _Style) -> np.ndarray:
    if style.tint is not None:
        img = style.tint(img)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def _draw(motion: str, shapes: list[dict], style: _Style, s: int, t_n: int) -> np.ndarray:
    """Every shape moves with its own `motion` key, else `motion`, for the whole clip."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    frames = np.empty((t_n, s, s, 3), np.uint8)
    for t in range(t_n):
        img = style.background.copy()
        for sh in shapes:
            m = sh.get("motion", motion)
            direction = _DIRECTION.get(m, (0, 0))
            speed = sh["speed"] if style.speed == 1.0 else sh["speed"] * style.speed
            cx = sh["cx"] + direction[0] * speed * t
            cy = sh["cy"] + direction[1] * speed * t
            angle = sh["angle"] + {"rotate_cw": 1, "rotate_ccw": -1}.get(m, 0) * sh["spin"] * t
            growth = {"grow": 1, "shrink": -1}.get(m, 0)
            radius = sh["radius"] * (1 + growth * 0.6 * (t / (t_n - 1) - 0.5))
            img = _paint(img, sh, (cx, cy, angle, radius), style, (yy, xx, s))
        frames[t] = _finish(img, style)
    return frames


def _draw_timeline(timeline: list[str | None], shapes: list[dict], style: _Style, s: int) -> np.ndarray:
    """Frames whose motion changes over time: frame t moves every shape by `timeline[t]` (None: still)."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    frames = np.empty((len(timeline), s, s, 3), np.uint8)
    state = [[sh["cx"], sh["cy"], sh["angle"], sh["radius"]] for sh in shapes]
    for t, m in enumerate(timeline):
        img = style.background.copy()
        for sh, st in zip(shapes, state):
            if m is not None and t:
                direction = _DIRECTION.get(m, (0, 0))
                st[0] += direction[0] * sh["speed"] * style.speed
                st[1] += direction[1] * sh["speed"] * style.speed
                st[2] += {"rotate_cw": 1, "rotate_ccw": -1}.get(m, 0) * sh["spin"]
                growth = {"grow": 1.04, "shrink": 1 / 1.04}.get(m, 1.0)
                st[3] = float(np.clip(st[3] * growth, 0.08 * s, 0.3 * s))
            img = _paint(img, sh, tuple(st), style, (yy, xx, s))
        frames[t] = _finish(img, style)
    return frames


def clip_motion(index: int, spec: SynthSpec) -> str:
    """The class (motion name) of video `index`: the same in every domain."""
    return MOTIONS[int(np.random.default_rng([spec.seed, index]).integers(spec.classes))]


def render_clip(index: int, spec: SynthSpec) -> tuple[np.ndarray, str]:
    """Frames uint8 [T, H, W, 3] and the motion name of video `index`."""
    rng = np.random.default_rng([spec.seed, index])
    motion = MOTIONS[int(rng.integers(spec.classes))]
    s, t_n = spec.size, spec.frames
    # smooth: masked background patches are predictable from their neighbours, so a masked autoencoder's
    # loss is dominated by where the moving shapes are, i.e. by the motion (4.0 made it unpredictable noise)
    background = 0.35 + 0.3 * _texture(rng, s, 1.0)
    shapes = _shapes(rng, s, t_n)
    style = _style(spec.domain, background, np.random.default_rng([spec.seed, index, 0xD0, spec.domain]), s)
    return _draw(motion, shapes, style, s, t_n), motion


def encode_clip(
    frames_THWC: np.ndarray, path: str | Path, codec: str, fps: int, sound: np.ndarray | None = None
) -> None:
    """Encode the frames; `sound` (mono, at the codec's `AUDIO_ENCODERS` rate) is muxed as its sound track."""
    h, w = frames_THWC.shape[1], frames_THWC.shape[2]
    with VideoWriter(path, codec, fps, w, h, audio=sound is not None) as writer:
        for rgb in frames_THWC:
            writer.write_rgb(rgb)
        if sound is not None:
            writer.write_audio(sound)


def render_multi_label(index: int, spec: SynthSpec) -> tuple[np.ndarray, list[str]]:
    """Frames and the sorted set of motions of a `--multi-label` video: 1-3 shapes, each its own motion."""
    rng = np.random.default_rng([spec.seed, index, 0x3A1])
    s, t_n = spec.size, spec.frames
    background = 0.35 + 0.3 * _texture(rng, s, 1.0)
    shapes = [
        {**sh, "motion": MOTIONS[int(rng.integers(spec.classes))]}
        for sh in _shapes(rng, s, t_n) + _shapes(rng, s, t_n)[: int(rng.integers(0, 2))]
    ]
    style = _style(spec.domain, background, np.random.default_rng([spec.seed, index, 0xD0, spec.domain]), s)
    frames = _draw(MOTIONS[0], shapes, style, s, t_n)
    return frames, sorted({sh["motion"] for sh in shapes}, key=MOTIONS.index)


def render_segments(index: int, spec: SynthSpec) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
    """Frames and the segments (first frame, end frame, motion) of a `--segments` video: 2-3 stretches,
    each still (background) or one motion, neighbours different, at least one moving."""
    rng = np.random.default_rng([spec.seed, index, 0x5E6])
    s, t_n = spec.size, spec.frames
    parts = int(rng.integers(2, 4))
    free = t_n - parts * MIN_SEGMENT_FRAMES
    cuts = np.sort(rng.integers(0, free + 1, parts - 1))
    bounds = [0, *(c + (i + 1) * MIN_SEGMENT_FRAMES for i, c in enumerate(cuts)), t_n]
    kinds: list[str | None] = []
    for _ in range(parts):
        choices = [None, *MOTIONS[: spec.classes]]
        if kinds:
            choices.remove(kinds[-1])
        kinds.append(choices[int(rng.integers(len(choices)))])
    if all(k is None for k in kinds):
        kinds[int(rng.integers(parts))] = MOTIONS[int(rng.integers(spec.classes))]
    timeline = [kinds[i] for i in range(parts) for _ in range(bounds[i], bounds[i + 1])]
    background = 0.35 + 0.3 * _texture(rng, s, 1.0)
    style = _style(spec.domain, background, np.random.default_rng([spec.seed, index, 0xD0, spec.domain]), s)
    # speeds as in a 24-frame clip (about a frame width per 24 frames), whatever the video's length
    frames = _draw_timeline(timeline, _shapes(rng, s, SEGMENT_PACE_FRAMES), style, s)
    segments = [(bounds[i], bounds[i + 1], k) for i, k in enumerate(kinds) if k is not None]
    return frames, segments


SOUND_GAP_S = (0.3, 0.8)  # seconds between two events (uniform): irregular, so no shift looks in sync


def sound_events(index: int, spec: SynthSpec) -> list[float]:
    """The times (seconds) of video `index`'s events: irregular gaps, the first within the first gap."""
    rng = np.random.default_rng([spec.seed, index, 0xA0D])
    length, t, out = spec.frames / spec.fps, float(rng.uniform(0.0, SOUND_GAP_S[1])), []
    while t < length:
        out.append(round(t, 4))
        t += float(rng.uniform(*SOUND_GAP_S))
    return out


def render_sound(index: int, spec: SynthSpec, frames_THWC: np.ndarray, rate: int) -> np.ndarray:
    """Tie sound to the picture: at each event (`sound_events`) the frame showing it and the next one
    flash (brightened towards white), and a click is heard (a 60 ms decaying 800 Hz tone over faint noise).
    Brightens `frames_THWC` in place; returns the mono sound track at `rate`, as long as the video (the clicks
    `spec.audio_delay` seconds after their flashes)."""
    rng = np.random.default_rng([spec.seed, index, 0xA0E])
    n = round(spec.frames / spec.fps * rate)
    wave = 0.01 * rng.standard_normal(n).astype(np.float32)
    burst_t = np.arange(round(0.06 * rate)) / rate
    burst = (0.6 * np.sin(2 * np.pi * 800 * burst_t) * np.exp(-burst_t / 0.015)).astype(np.float32)
    for t in sound_events(index, spec):
        f = int(t * spec.fps)
        for k in (f, f + 1):
            if k < len(frames_THWC):
                frames_THWC[k] = (frames_THWC[k].astype(np.uint16) + 255) // 2
        lo = round((t + spec.audio_delay) * rate)
        if lo < 0:
            continue
        part = burst[: max(0, n - lo)]
        wave[lo : lo + len(part)] += part
    return np.clip(wave, -1.0, 1.0)


SYNTH_RECORD = ".synth.json"  # in a folder synth wrote: the spec it was written with


def _check_out(out: Path) -> None:
    """synth replaces `labels.csv` and same-named videos: refuse a folder holding anything it did not write
    (a user's own labelled videos) rather than overwrite their labels. Its own folders it re-writes."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder")
    if not out.is_dir() or (out / SYNTH_RECORD).is_file():
        return
    found = sorted(p.name for p in out.iterdir())
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ValueError(
            f"--out {out}: holds files synth did not write ({shown}); it would replace labels.csv and "
            "videos/ there: give a new or empty folder"
        )


def write_synthetic_set(out: str | Path, spec: SynthSpec) -> Path:
    """Write `spec.videos` clips under `out/videos/` and their labels: `labels.csv` (path,label; a `a;b`
    set with `multi_label`) or `segments.csv` (path,segment_start,segment_end,label in seconds); returns it."""
    out = Path(out)
    _check_out(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / SYNTH_RECORD).write_text(json.dumps(dataclasses.asdict(spec), sort_keys=True) + "\n")
    ext = ENCODERS[spec.codec][1]
    rows: list[tuple] = []
    prefix = f"d{spec.domain}_" if spec.domain else ""  # distinct ids (and shard keys) per domain
    for i in range(spec.videos):
        if spec.segments:
            frames, segs = render_segments(i, spec)
            rel = f"videos/{prefix}{i:06d}.{ext}"
            rows += [(rel, f"{a / spec.fps:g}", f"{b / spec.fps:g}", m) for a, b, m in segs]
        elif spec.multi_label:
            frames, motions = render_multi_label(i, spec)
            rel = f"videos/{prefix}{i:06d}_{'+'.join(motions)}.{ext}"
            rows.append((rel, ";".join(motions)))
        else:
            frames, motion = render_clip(i, spec)
            rel = f"videos/{prefix}{i:06d}_{motion}.{ext}"
            rows.append((rel, motion))
        sound = render_sound(i, spec, frames, AUDIO_ENCODERS[spec.codec][1]) if spec.audio else None
        encode_clip(frames, out / rel, spec.codec, spec.fps, sound)
    if spec.shuffle_labels:
        order = np.random.default_rng([spec.seed, 0x5A1]).permutation(len(rows))
        rows = [(*rows[i][:-1], rows[j][-1]) for i, j in enumerate(order)]
    header = ["path", "segment_start", "segment_end", "label"] if spec.segments else ["path", "label"]
    csv_path = out / ("segments.csv" if spec.segments else "labels.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return csv_path
