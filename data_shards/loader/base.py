"""`VideoLoader`: the part every backend shares (epoch plan, the per-sample loop, position, resume,
stats, skip budget).

A backend implements `_batches(plan)`, yielding `(batch_index, batch | None, skipped)` for batch
indices 0, 1, ... of the plan in order; `batch` holds CPU or device tensors, `skipped` lists
(shard, key, reason) of samples that failed. The per-sample loop is `collect`: read each sample's bytes,
plan its frames and views from the stored frame count (`SampleRef.frames`), hand them to the backend's
decode step, and count any failure as a skip -- backends only decode. Position is counted in samples
of the plan handed to the caller (whatever the backend prefetched), and saved as a *global* position in
the epoch's order (`EpochPlan.start`): a state taken when every rank has taken the same number of batches
(a training step boundary) continues the epoch on any number of ranks, with no sample repeated or left out.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from data_shards import format as fmt
from data_shards.audio import decode_member
from data_shards.loader.audio import clip_windows, draw_offset
from data_shards.loader.audio import features as audio_features
from data_shards.loader.cache import IO_STATS, SampleCache
from data_shards.loader.index import SampleRef, ShardReader, samples_digest
from data_shards.loader.sampling import (
    EpochPlan,
    SamplingSpec,
    VideoPlan,
    epoch_plan,
    frame_targets,
    plan_video,
    sample_rng,
)

log = logging.getLogger("data_shards.loader")

STATE_VERSION = 2
# Fields that fix the epoch's sample order: a resume with other values would not continue the same epoch.
# Rank, world size and batch size are not among them: the rest of the order is re-split on resume.
_ORDER_FIELDS = ("seed", "num_samples", "drop_last", "shuffle")


class LoaderError(RuntimeError):
    """The input pipeline cannot go on (too many undecodable samples, DALI decode failure, bad state)."""


Batch = dict[str, Any]
# A backend's decode step for one sample: (slot in the batch, ref, encoded bytes, plan); raises on failure.
DecodeFn = Callable[[int, SampleRef, bytes, VideoPlan], None]


@dataclass
class Collected:
    """One plan batch after the per-sample loop: the samples the backend took, in batch order, and the
    ones that failed (shard, key, reason)."""

    b: int
    idx: list[int] = field(default_factory=list)
    pad: list[bool] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    frame_labels: list[np.ndarray] = field(default_factory=list)  # segments: [V, T] per video
    audio: list[np.ndarray] = field(default_factory=list)  # SamplingSpec.audio: [V, S] per video
    offsets: list[list[float]] = field(default_factory=list)  # the sound's shift per view (seconds)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    io: dict[str, int] = field(default_factory=dict)  # object-storage counts (RemoteSamples.stats)


class VideoLoader:
    """One epoch of batches per iteration: {"video": float32 [B, C, T, H, W], "label": int64 [B],
    "key": list[str], "index": int64 [B] (global sample index), "epoch": int64 [B], "view": int64 [B]
    (clip number within its video), "labels": int64 [B, L] (the label set, -1 padded; L the split's
    largest set)}, plus "pad" (bool [B], padding duplicates) when drop_last is False, and "frame_label"
    (int64 [B, T], each sampled frame's class, 0 = background) for a segments set, and with `spec.audio`
    "audio" (the sound of each clip: float [B, S] waveform or [B, n_mels, steps] log-mel) and "audio_offset"
    (float [B], seconds the sound was shifted late by), "audio_shift" (int64 [B], its index in the spec's
    offsets; `loader/audio.py`). B counts clips; the
    V = K (train) or N x M (eval) clips of one video are consecutive, so a batch holds batch_size // V
    whole videos."""

    backend: str = "base"

    def __init__(
        self,
        refs: list[SampleRef],
        *,
        split: str,
        batch_size: int,
        spec: SamplingSpec,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: str | torch.device = "cpu",
        drop_last: bool | None = None,
        max_skip_fraction: float = 0.01,
        epoch: int = 0,
        reason: str = "",
        cache: SampleCache | None = None,
        prefetch_stride: int = 1,
        batches_per_step: int = 1,
        label_kind: str = "single",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if any(r.index != i for i, r in enumerate(refs)):
            raise ValueError("refs must be numbered 0..n-1 in order (SampleRef.index); see select_samples")
        self.refs = refs
        self.label_kind = label_kind  # format.LABEL_KINDS: "segments" adds "frame_label"
        self.max_labels = max((len(r.labels) for r in refs), default=1) or 1
        self.split = split
        self.spec = spec
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device)
        self.drop_last = spec.train if drop_last is None else bool(drop_last)
        self.max_skip_fraction = max_skip_fraction
        self.reason = reason
        self.reader = ShardReader(cache)
        self.prefetch_stride = prefetch_stride  # the next plan batch this process decodes is b + stride
        self.batches_per_step = max(1, int(batches_per_step))  # drop_last keeps whole steps (epoch_plan)
        self._owner_pid = os.getpid()
        self._digest: str | None = None
        v = spec.views_per_video
        self.videos_per_batch = max(1, batch_size // v)
        if batch_size % v:
            log.warning(
                "batch_size %d is not a multiple of %d clips per video: batches hold %d clips (%d videos)",
                batch_size,
                v,
                self.videos_per_batch * v,
                self.videos_per_batch,
            )
        self._epoch = epoch
        self._plan: EpochPlan | None = None  # the whole epoch's (what len counts)
        self._running: EpochPlan | None = None  # the plan the current (or last) iteration follows
        self._samples_done = 0  # samples of `_running` handed out on this rank
        self._resume_at = 0  # global position the next iteration starts from (load_state_dict)
        self.stats: dict[str, Any] = {
            "batches": 0,
            "clips": 0,
            "videos": 0,
            "skipped": 0,
            "skipped_keys": [],
            "decode_wait_s": 0.0,
            "iter_s": 0.0,
            **dict.fromkeys(IO_STATS, 0),
        }

    # ---------------------------------------------------------------------------------------- contract
    @property
    def num_samples(self) -> int:
        """Samples in the split (all ranks)."""
        return len(self.refs)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def samples_per_epoch(self) -> int:
        """Videos this rank reads per epoch (padding included)."""
        return len(self.plan().indices)

    def plan(self) -> EpochPlan:
        """This rank's plan for the whole current epoch."""
        if self._plan is None:
            self._plan = self._plan_from(0)
        return self._plan

    def _plan_from(self, start: int) -> EpochPlan:
        return epoch_plan(
            len(self.refs),
            seed=self.seed,
            epoch=self._epoch,
            rank=self.rank,
            world_size=self.world_size,
            shuffle=self.spec.train,
            drop_last=self.drop_last,
            videos_per_batch=self.videos_per_batch,
            start=start,
            batches_per_step=self.batches_per_step,
        )

    @property
    def position(self) -> int:
        """Samples of the current epoch's order that all ranks together have taken. Exact when every rank
        has taken as many batches as this one (the trainer saves at step boundaries, where they have)."""
        if self._running is None:
            return self._resume_at
        return self._running.start + self._samples_done * self.world_size

    def __len__(self) -> int:
        return self.plan().num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration reads; a pending resume position survives only for the
        epoch it was saved in."""
        if epoch != self._epoch:
            self._epoch, self._plan = int(epoch), None
            self._running, self._samples_done, self._resume_at = None, 0, 0

    def state_dict(self) -> dict[str, Any]:
        """Where the epoch stands, by global position: valid for any rank count on resume (see `position`).
        `world_size` and `videos_per_batch` record who wrote it; they need not match on resume."""
        return {
            "version": STATE_VERSION,
            "backend": self.backend,
            "epoch": self._epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "drop_last": self.drop_last,
            "shuffle": self.spec.train,
            "samples_digest": self.samples_digest,
            "skipped": self.stats["skipped"],
            "world_size": self.world_size,
            "videos_per_batch": self.videos_per_batch,
        }

    @property
    def samples_digest(self) -> str:
        """Fingerprint of the sample list (keys in order): resuming over other samples is refused."""
        if self._digest is None:
            self._digest = samples_digest(self.refs)
        return self._digest

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` was taken: the next iteration yields the rest of that epoch, re-split over
        this loader's ranks (the state may come from another number of ranks or another batch size)."""
        version = state.get("version")
        if version == 1:  # per-rank batch counts; every rank had taken the same number of samples
            position = int(state["samples_done"]) * int(state["world_size"])
        elif version == STATE_VERSION:
            position = int(state["position"])
        else:
            raise LoaderError(f"loader state version {version!r} is not 1 or {STATE_VERSION}")
        mine = self.state_dict()
        # samples_digest is checked when present (states saved before it existed lack it)
        fields = (*_ORDER_FIELDS, "samples_digest") if "samples_digest" in state else _ORDER_FIELDS
        for f in fields:
            if state.get(f) != mine[f]:
                raise LoaderError(
                    f"loader state field {f}={state.get(f)!r} differs from this loader's {mine[f]!r}: "
                    "resuming would not continue the same sample order (use the same seed, split, shards "
                    "and selection)"
                )
        self._epoch, self._plan = int(state["epoch"]), None
        self._running, self._samples_done, self._resume_at = None, 0, position
        self.stats["skipped"] = int(state.get("skipped", 0))

    # ---------------------------------------------------------------------------------------- iterate
    def __iter__(self) -> Iterator[Batch]:
        plan = self._plan_from(self._resume_at) if self._resume_at else self.plan()
        self._running, self._samples_done, self._resume_at = plan, 0, 0
        if plan.num_batches == 0:
            return
        t_begin, iter_base = time.perf_counter(), self.stats["iter_s"]
        gen = self._batches(plan)
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    b, batch, skipped = next(gen)
                except StopIteration:
                    break
                self.stats["decode_wait_s"] += time.perf_counter() - t0
                self._samples_done += len(plan.batch(b)[0])
                self._account_skips(skipped)
                if batch is None:
                    continue
                batch = self._to_device(batch)
                n = int(batch["label"].shape[0])
                self.stats["batches"] += 1
                self.stats["clips"] += n
                self.stats["videos"] += n // self.spec.views_per_video
                self.stats["iter_s"] = iter_base + (time.perf_counter() - t_begin)
                yield batch
        finally:
            self.stats["iter_s"] = iter_base + (time.perf_counter() - t_begin)
            gen.close()

    def _account_skips(self, skipped: list[tuple[str, str, str]]) -> None:
        if not skipped:
            return
        for shard, key, why in skipped:
            log.warning("skipped undecodable sample %s in %s: %s", key, shard, why)
            if len(self.stats["skipped_keys"]) < 100:
                self.stats["skipped_keys"].append(f"{shard}:{key}")
        self.stats["skipped"] += len(skipped)
        seen = self.stats["videos"] + self.stats["skipped"]
        budget = self.max_skip_fraction * max(seen, self.samples_per_epoch)
        if self.stats["skipped"] > budget:
            last = ", ".join(f"{s}:{k} ({w})" for s, k, w in skipped[:3])
            raise LoaderError(
                f"{self.stats['skipped']} undecodable samples out of {seen} seen exceed max_skip_fraction="
                f"{self.max_skip_fraction} (latest: {last}); run `python -m data_shards verify` on the shards"
            )

    def _to_device(self, batch: Batch) -> Batch:
        if self.device.type == "cpu":
            return batch
        nb = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=nb) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _batches(self, plan: EpochPlan) -> Iterator[tuple[int, Batch | None, list[tuple[str, str, str]]]]:
        """The backend: plan batches 0, 1, ... in order as (b, batch or None, skipped)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- helpers
    def _label_sets(self, idx: list[int]) -> torch.Tensor:
        """int64 [n, L]: each video's label set, -1 padded to the split's largest."""
        out = torch.full((len(idx), self.max_labels), -1, dtype=torch.int64)
        for row, i in enumerate(idx):
            got = self.refs[i].labels
            out[row, : len(got)] = torch.tensor(got, dtype=torch.int64)
        return out

    def collect(self, plan: EpochPlan, b: int, decode: DecodeFn) -> Collected:
        """The per-sample loop of plan batch `b`, shared by every backend: read the sample's bytes, plan
        it from its stored frame count and size with its own (seed, epoch, index) generator, and hand it to
        the backend's `decode`. Any failure leaves the sample out and is reported, never replaced."""
        idx, pad = plan.batch(b)
        out = Collected(b)
        ahead = b + self.prefetch_stride
        upcoming = plan.batch(ahead)[0].tolist() if ahead < plan.num_batches else []
        for wanted in (idx.tolist(), upcoming):  # this batch's reads first, then the next one's behind them
            self.reader.prefetch([self.refs[i] for i in wanted], self.spec.audio is not None)
        for i, p in zip(idx.tolist(), pad.tolist()):
            ref = self.refs[i]
            rng = sample_rng(self.seed, self._epoch, i) if self.spec.train else None
            try:
                data = self.reader.video_bytes(ref)
            except fmt.FormatError as e:  # a truncated tar: the sample is unreadable, like a corrupt one
                out.skipped.append((ref.shard, ref.key, f"{type(e).__name__}: {e}"))
                continue
            except OSError as e:  # the store after its retries: missing, denied, down -- stop, name it
                raise LoaderError(
                    f"{ref.shard}: cannot read sample {ref.key}: {type(e).__name__}: {e}"
                ) from e
            try:
                vplan = plan_video(ref.frames, ref.height, ref.width, self.spec, rng)
                decode(len(out.idx), ref, data, vplan)
                if self.spec.audio is not None:
                    self._sound(out, ref, vplan)
            except Exception as e:  # any container/decoder failure: counted, never replaced
                out.skipped.append((ref.shard, ref.key, f"{type(e).__name__}: {e}"))
                continue
            out.idx.append(i)
            out.pad.append(p)
            out.labels.append(ref.label)
            if self.label_kind == "segments":
                out.frame_labels.append(frame_targets(vplan, self.spec.frames, ref.fps, ref.segments))
        out.io = self.reader.remote.take_stats()
        if os.getpid() == self._owner_pid:  # decoded in this process: count here; a worker ships `io`
            self.add_io(out.io)
        return out

    def _sound(self, out: Collected, ref: SampleRef, vplan: VideoPlan) -> None:
        """The sample's sound windows (one per view) and their drawn shifts, into `out`."""
        spec = self.spec.audio
        assert spec is not None
        wave, _ = decode_member(self.reader.audio_bytes(ref), spec.rate)
        views = [v.clip for v in vplan.views]
        offsets = [draw_offset(spec, self.seed, self._epoch, ref.index)] * len(views)
        out.audio.append(clip_windows(wave, vplan.frames, views, ref.fps, spec, offsets))
        out.offsets.append(offsets)

    def add_io(self, io: dict[str, int]) -> None:
        """Object-storage counts of a batch (gets, bytes, cache hits, retries) into `stats`."""
        for k, v in io.items():
            self.stats[k] = self.stats.get(k, 0) + v

    def batch_meta(self, got: Collected) -> Batch:
        """label/key/view/pad of a collected batch."""
        out = self._batch_meta(got.idx, got.pad, got.labels)
        if self.spec.audio is not None:
            out |= self._sound_meta(got.audio, [o for v in got.offsets for o in v])
        if self.label_kind == "segments":
            t = self.spec.frames
            out["frame_label"] = torch.from_numpy(
                np.concatenate(got.frame_labels) if got.frame_labels else np.zeros((0, t), dtype=np.int64)
            )
        return out

    def _sound_meta(self, waves: list[np.ndarray], drawn: list[float]) -> Batch:
        """The batch's sound: the spec's feature of the windows ([V, S] per video) and the drawn shifts."""
        spec = self.spec.audio
        assert spec is not None
        wave = np.concatenate(waves) if waves else np.zeros((0, spec.samples), np.float32)
        index = spec.offsets.index if spec.offsets else (lambda o: 0)
        return {
            "audio": audio_features(torch.from_numpy(wave), spec),
            "audio_offset": torch.tensor(drawn, dtype=torch.float32),
            "audio_shift": torch.tensor([index(o) for o in drawn], dtype=torch.int64),
        }

    def _batch_meta(self, idx: list[int], pad: list[bool], labels: list[int]) -> Batch:
        """label/key/index/epoch/view/pad for videos `idx` (V consecutive clips each). `index` (the global
        sample index), `epoch` and `view` key a task's own per-sample random draws (masks, mixup), so they
        do not depend on the rank or micro-batch a clip lands in."""
        v = self.spec.views_per_video
        out: Batch = {
            "label": torch.tensor(labels, dtype=torch.int64).repeat_interleave(v),
            "key": [self.refs[i].key for i in idx for _ in range(v)],
            "index": torch.tensor(idx, dtype=torch.int64).repeat_interleave(v),
            "epoch": torch.full((len(idx) * v,), self._epoch, dtype=torch.int64),
            "view": torch.arange(v, dtype=torch.int64).repeat(len(idx)),
            "labels": self._label_sets(idx).repeat_interleave(v, dim=0),
        }
        if not self.drop_last:
            out["pad"] = torch.tensor(pad, dtype=torch.bool).repeat_interleave(v)
        return out
