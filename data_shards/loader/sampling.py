"""Sample order, rank split, temporal sampling and augmentation parameters: shared by every backend.

Backends only *execute* what this module decides (which frames to decode, which box to crop, whether to
flip), so DALI, PyAV and the synthetic backend cannot drift apart. Every random draw comes from a
generator seeded by (seed, epoch, sample index): independent of worker count, rank count, prefetching
and resume position.

Geometry: each view is an integer source box (y0, x0, h, w) resized to size x size (bilinear, antialiased
when shrinking) and optionally mirrored. Train = VideoMAE multi-scale crop (square-ish boxes from
`scales` x short side, on a 13-point grid) + flip. Eval = short side resized to `size`, then M crops
(1: center; 3: both ends and center of the long side), i.e. a min(H, W) square box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data_shards.loader.audio import AudioSpec

SHORT_VIDEO_POLICIES = ("repeat", "pad_last")


@dataclass
class SamplingSpec:
    """How to cut clips, shared by all backends (re-exported as `data_shards.loader.SamplingSpec`).

    Train: one random temporal window of `frames` frames `stride` apart per video, decoded once, and
    `clips_per_video` (K) independently augmented views of it (multi-scale crop + flip), VideoMAE V2's
    repeated augmentation. Eval: `eval_clips` (N) uniformly spaced windows x `eval_crops` (M) crops.
    Short videos (< (frames-1)*stride+1 frames) loop ("repeat") or hold the last frame ("pad_last").
    """

    frames: int = 16
    stride: int = 4
    size: int = 224
    clips_per_video: int = 1
    train: bool = True
    eval_clips: int = 1
    eval_crops: int = 1
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scales: tuple[float, ...] = (1, 0.875, 0.75, 0.66)
    flip: bool = True
    short_video: str = "repeat"
    audio: AudioSpec | None = None  # the sound beside each clip (`loader/audio.py`); None: no "audio"

    def __post_init__(self) -> None:
        for name in ("frames", "stride", "size", "clips_per_video", "eval_clips"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SamplingSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_crops not in (1, 3):
            raise ValueError(f"SamplingSpec.eval_crops must be 1 or 3, got {self.eval_crops}")
        if self.short_video not in SHORT_VIDEO_POLICIES:
            raise ValueError(
                f"SamplingSpec.short_video must be one of {SHORT_VIDEO_POLICIES}, got {self.short_video!r}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("SamplingSpec.mean and .std need 3 values (RGB)")

    @property
    def views_per_video(self) -> int:
        """Clips one decoded video yields: K in train, N x M in eval."""
        return self.clips_per_video if self.train else self.eval_clips * self.eval_crops

    @property
    def temporal_clips(self) -> int:
        return 1 if self.train else self.eval_clips


@dataclass(frozen=True)
class View:
    """One output clip of a video: temporal clip `clip` of the decoded frames, source box, mirror."""

    clip: int
    y0: int
    x0: int
    h: int
    w: int
    flip: bool


@dataclass(frozen=True)
class VideoPlan:
    """What to decode (`frames`, [C*T] indices, C temporal clips of T) and which views to cut."""

    frames: np.ndarray
    views: tuple[View, ...]


# ------------------------------------------------------------------------------------ order and ranks


@dataclass(frozen=True)
class EpochPlan:
    """This rank's samples for one epoch, in order, and whether each one is a padding duplicate.

    `start` is the global position in the epoch's order where the plan begins (0, or where a resumed run
    continues); after every rank took `n` of its samples, all ranks together have taken the order's
    positions [start, start + n * world_size), a prefix, whatever the number of ranks."""

    indices: np.ndarray  # int64 [n] global sample indices
    pad: np.ndarray  # bool [n]
    videos_per_batch: int
    num_batches: int
    start: int = 0

    def batch(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        lo = b * self.videos_per_batch
        return self.indices[lo : lo + self.videos_per_batch], self.pad[lo : lo + self.videos_per_batch]


def epoch_order(num_samples: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's global sample order: a permutation per (seed, epoch), the same on every rank."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_samples).astype(np.int64)


def epoch_plan(
    num_samples: int,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    shuffle: bool,
    drop_last: bool,
    videos_per_batch: int,
    start: int = 0,
    batches_per_step: int = 1,
) -> EpochPlan:
    """Deterministic order for (seed, epoch), identical on every rank, then split across ranks.

    drop_last=True: every rank gets the same number of full batches, a multiple of `batches_per_step` (the
    gradient-accumulation steps of a training step), so an epoch is whole global batches whatever splits them
    (the samples left over are the tail of the shuffled order, so they change every epoch).
    drop_last=False: the order is padded with its own first samples up to a multiple of world (marked
    `pad`), every rank gets ceil(N / world) samples and a partial last batch.
    The order is cut into batches of `videos_per_batch` consecutive samples, dealt to the ranks in turn
    (rank r takes batches r, r + world, ...; a partial last round is cut into `world` equal parts), so
    the samples all ranks have taken after the same number of batches are a prefix of the order, and a
    micro-batch holds the same samples whether the ranks or the accumulation steps split a step: 2 ranks x
    micro 4 and 1 rank x micro 4 x 2 accumulation steps read the same micro-batches. `start` skips that
    prefix (a resume, possibly on another number of ranks) and splits the rest the same way: on the same
    world size, at a batch boundary, the plan is the tail of the full epoch's plan, batch for batch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if num_samples < 1:
        raise ValueError("no samples")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    order = epoch_order(num_samples, seed=seed, epoch=epoch, shuffle=shuffle)
    rest = order[min(start, num_samples) :]
    pad = np.zeros(len(rest), dtype=bool)
    if drop_last:
        unit = world_size * videos_per_batch * max(1, batches_per_step)
        usable = (len(rest) // unit) * unit
        rest, pad = rest[:usable], pad[:usable]
    else:
        extra = -len(rest) % world_size
        rest = np.concatenate([rest, order[np.arange(extra) % num_samples]])
        pad = np.concatenate([pad, np.ones(extra, dtype=bool)])
    mine = _deal(len(rest), rank, world_size, videos_per_batch, keep_partial=not drop_last)
    nb = math.ceil(len(mine) / videos_per_batch)
    return EpochPlan(rest[mine], pad[mine], videos_per_batch, nb, start)


def _deal(n: int, rank: int, world_size: int, per_batch: int, *, keep_partial: bool) -> np.ndarray:
    """Positions in [0, n) of rank `rank`'s samples: whole rounds of `world_size` batches of `per_batch`
    consecutive positions, batch r of each round to rank r; the partial last round (n is a multiple of
    `world_size` there) in `world_size` equal consecutive parts when `keep_partial`, else dropped."""
    rounds, rnd = divmod(n, world_size * per_batch)
    full = np.arange(rounds * world_size * per_batch, dtype=np.int64).reshape(rounds, world_size, per_batch)
    mine = full[:, rank].reshape(-1)
    if keep_partial and rnd:
        share = rnd // world_size
        lo = rounds * world_size * per_batch + rank * share
        mine = np.concatenate([mine, np.arange(lo, lo + share, dtype=np.int64)])
    return mine


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index, 0xC11B])


# ------------------------------------------------------------------------------------------ temporal


def apply_short_policy(idx: np.ndarray, n: int, policy: str) -> np.ndarray:
    """Map raw frame indices into [0, n): loop ("repeat") or hold the last frame ("pad_last")."""
    if policy == "repeat":
        return idx % n
    if policy == "pad_last":
        return np.minimum(idx, n - 1)
    raise ValueError(f"short_video must be one of {SHORT_VIDEO_POLICIES}, got {policy!r}")


def temporal_starts(
    n: int, frames: int, stride: int, clips: int, rng: np.random.Generator | None
) -> list[int]:
    """Train (rng given): one uniform random start. Eval: `clips` starts spaced uniformly over the video."""
    span = (frames - 1) * stride + 1
    room = max(n - span, 0)
    if rng is not None:
        return [int(rng.integers(0, room + 1))]
    if clips == 1:
        return [room // 2]
    return [round(room * j / (clips - 1)) for j in range(clips)]


# ------------------------------------------------------------------------------------------- spatial


def multiscale_box(
    h: int, w: int, size: int, scales: tuple[float, ...], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """VideoMAE-style multi-scale crop: side lengths from `scales` x short side (aspect distortion of at
    most one scale step), placed on a fixed 13-point grid. Returns (y0, x0, bh, bw)."""
    base = min(h, w)
    sides = [int(base * s) for s in scales]
    sides = [size if abs(s - size) < 3 else s for s in sides]
    sides = [max(1, min(s, base)) for s in sides]
    pairs = [(sh, sw) for i, sh in enumerate(sides) for j, sw in enumerate(sides) if abs(i - j) <= 1]
    bh, bw = pairs[int(rng.integers(len(pairs)))]
    bh, bw = min(bh, h), min(bw, w)
    sy, sx = (h - bh) / 4, (w - bw) / 4
    grid = [
        (0, 0),
        (0, 4),
        (4, 0),
        (4, 4),
        (2, 2),
        (2, 0),
        (2, 4),
        (4, 2),
        (0, 2),
        (1, 1),
        (1, 3),
        (3, 1),
        (3, 3),
    ]
    gy, gx = grid[int(rng.integers(len(grid)))]
    return int(gy * sy), int(gx * sx), bh, bw


def eval_boxes(h: int, w: int, crops: int) -> list[tuple[int, int, int, int]]:
    """Short side -> size, then 1 (center) or 3 (start/center/end of the long side) square crops."""
    side = min(h, w)
    if crops not in (1, 3):
        raise ValueError(f"eval_crops must be 1 or 3, got {crops}")
    fractions = [0.5] if crops == 1 else [0.0, 0.5, 1.0]
    boxes = []
    for f in fractions:
        off_y, off_x = round((h - side) * f), round((w - side) * f)
        boxes.append((off_y, off_x, side, side))
    return boxes


def plan_video(n: int, h: int, w: int, spec: SamplingSpec, rng: np.random.Generator | None) -> VideoPlan:
    """Frames to decode and views to cut for a video of n frames of h x w (rng: train mode)."""
    train = spec.train
    n_clips = 1 if train else spec.eval_clips
    starts = temporal_starts(n, spec.frames, spec.stride, n_clips, rng if train else None)
    raw = np.concatenate([s + np.arange(spec.frames) * spec.stride for s in starts]).astype(np.int64)
    frames = apply_short_policy(raw, max(n, 1), spec.short_video)
    views: list[View] = []
    if train:
        assert rng is not None
        for _ in range(spec.clips_per_video):
            y0, x0, bh, bw = multiscale_box(h, w, spec.size, tuple(spec.scales), rng)
            flip = bool(spec.flip and rng.random() < 0.5)
            views.append(View(0, y0, x0, bh, bw, flip))
    else:
        boxes = eval_boxes(h, w, spec.eval_crops)
        for j in range(n_clips):
            for y0, x0, bh, bw in boxes:
                views.append(View(j, y0, x0, bh, bw, False))
    return VideoPlan(frames, tuple(views))


def frame_targets(
    plan: VideoPlan, frames: int, fps: float, segments: tuple[tuple[float, float, int], ...]
) -> np.ndarray:
    """The class of every sampled frame of every view, int64 [V, T]: the segment whose [start, end) holds
    the frame's time (index / fps; the later-starting one where segments overlap), background (0) elsewhere.
    A video without a known frame rate has no time axis: all background."""
    t_s = plan.frames.astype(np.float64) / fps if fps > 0 else np.full(len(plan.frames), -1.0)
    per_frame = np.zeros(len(plan.frames), dtype=np.int64)
    for start, end, c in sorted(segments):
        per_frame[(t_s >= start) & (t_s < end)] = c
    return np.stack([per_frame[v.clip * frames : (v.clip + 1) * frames] for v in plan.views])


# ------------------------------------------------------------------------------------------- apply


def views_out(
    plan: VideoPlan, spec: SamplingSpec, out: torch.Tensor | None, contiguous: bool = False
) -> torch.Tensor:
    """Where a video's views go: `out` (e.g. its rows of the batch), checked to be float32 [V, 3, T, S, S]
    (and `contiguous` when the writer needs it), or a new tensor."""
    shape = (len(plan.views), 3, spec.frames, spec.size, spec.size)
    if out is None:
        return torch.empty(shape, dtype=torch.float32)
    if tuple(out.shape) != shape or out.dtype != torch.float32 or (contiguous and not out.is_contiguous()):
        need = f"{'contiguous ' if contiguous else ''}float32 {shape}"
        raise ValueError(f"out must be {need}, got {out.dtype} {tuple(out.shape)}")
    return out


def views_from_frames(
    frames_FHWC: np.ndarray | torch.Tensor,
    plan: VideoPlan,
    spec: SamplingSpec,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The torch twin of the DALI graph: uint8 decoded frames [C*T, H, W, 3] -> float [V, 3, T, S, S].

    `out` (float [V, 3, T, S, S], e.g. this video's rows of the batch) is written in place if given."""
    x = torch.as_tensor(frames_FHWC)
    t, size = spec.frames, spec.size
    out_VCTHW = views_out(plan, spec, out)
    for k, v in enumerate(plan.views):
        clip_THWC = x[v.clip * t : (v.clip + 1) * t, v.y0 : v.y0 + v.h, v.x0 : v.x0 + v.w]
        clip_TCHW = clip_THWC.permute(0, 3, 1, 2)  # channels-last view: torch's fast uint8 resize path
        if (v.h, v.w) != (size, size):
            # uint8 in, uint8 out (rounded), like DALI's resize of the decoder's uint8 frames
            clip_TCHW = F.interpolate(
                clip_TCHW, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        if v.flip:
            clip_TCHW = clip_TCHW.flip(-1)
        out_VCTHW[k].copy_(clip_TCHW.permute(1, 0, 2, 3))  # uint8 -> float, planar CTHW, one pass
    return normalize_(out_VCTHW, spec)


def normalize_(out_VCTHW: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """0..255 views [V, 3, T, S, S] -> (x / 255 - mean) / std, in place over all views: two contiguous
    vectorized passes (per-channel strided ops cost 2x)."""
    scale = torch.tensor([1.0 / (s * 255.0) for s in spec.std]).view(1, 3, 1, 1, 1)
    return out_VCTHW.mul_(scale).add_(-torch.tensor(spec.mean).view(1, 3, 1, 1, 1) * 255.0 * scale)
