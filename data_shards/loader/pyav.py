"""PyAV backend: any codec, decoded on CPU in torch DataLoader workers.

Each DataLoader item is one whole *plan batch* (a map-style dataset over batch indices), so batch
composition and order depend only on (seed, epoch, rank), never on the worker count, and a resume is a
sampler that starts at batch k. A video that fails to decode is left out of its batch and reported
(shard, key, reason) to the main process, which counts it against `max_skip_fraction`.

Colour conversion is done here, not by swscale: yuv420p with bilinear (centre-sited) chroma
upsampling and BT.601 limited-range coefficients, rounded to uint8 -- the same as DALI's decoder, so
both backends agree to a fraction of a grey level.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from data_shards.loader.base import Batch, VideoLoader
from data_shards.loader.index import SampleRef, ShardReader
from data_shards.loader.sampling import (
    EpochPlan,
    SamplingSpec,
    plan_video,
    probe_video,
    sample_rng,
    views_from_frames,
)


def yuv420p_to_rgb(y_FHW: torch.Tensor, u_Fhw: torch.Tensor, v_Fhw: torch.Tensor) -> torch.Tensor:
    """uint8 planes -> uint8 [F, H, W, 3]: bilinear chroma upsampling, BT.601 limited range."""
    f, h, w = y_FHW.shape
    uv = F.interpolate(
        torch.stack([u_Fhw, v_Fhw], 1).float(), size=(h, w), mode="bilinear", align_corners=False
    )
    uv.sub_(128.0).mul_(255.0 / 224.0)
    u, v = uv[:, 0], uv[:, 1]
    y = y_FHW.float().sub_(16.0).mul_(255.0 / 219.0)
    rgb = torch.empty((f, h, w, 3), dtype=torch.float32)
    torch.add(y, v, alpha=1.402, out=rgb[..., 0])
    torch.add(y, u, alpha=-0.344136, out=rgb[..., 1]).add_(v, alpha=-0.714136)
    torch.add(y, u, alpha=1.772, out=rgb[..., 2])
    return rgb.round_().clamp_(0, 255).to(torch.uint8)


def decode_frames(data: bytes, indices: np.ndarray) -> np.ndarray:
    """Decode frames `indices` (any order, repeats allowed) -> uint8 [len(indices), H, W, 3].

    Decodes sequentially up to the largest index (one thread: workers parallelize) and converts only
    the frames it keeps.
    """
    wanted = set(int(i) for i in indices)
    last = max(wanted)
    kept: dict[int, Any] = {}
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                kept[i] = frame
            if i >= last:
                break
        missing = wanted - set(kept)
        if missing:
            raise ValueError(
                f"video ends before frame {min(missing)} (decoded {len(kept)} of {len(wanted)} wanted)"
            )
        order = sorted(kept)
        if all(kept[i].format.name == "yuv420p" for i in order):
            h, w = kept[order[0]].height, kept[order[0]].width
            planes = np.stack([kept[i].to_ndarray() for i in order])  # [F, H*3/2, W]
            y = torch.from_numpy(planes[:, :h])
            u = torch.from_numpy(planes[:, h : h + h // 4].reshape(-1, h // 2, w // 2))
            v = torch.from_numpy(planes[:, h + h // 4 :].reshape(-1, h // 2, w // 2))
            rgb = yuv420p_to_rgb(y, u, v).numpy()
        else:
            rgb = np.stack([kept[i].to_ndarray(format="rgb24") for i in order])
    pos = {i: p for p, i in enumerate(order)}
    return rgb[[pos[int(i)] for i in indices]]


def decode_views(data: bytes, spec: SamplingSpec, rng: np.random.Generator | None) -> torch.Tensor:
    """One video's bytes -> float [V, 3, T, S, S] (probe, plan, decode once, cut V views)."""
    n, h, w = probe_video(data)
    vplan = plan_video(n, h, w, spec, rng)
    return views_from_frames(decode_frames(data, vplan.frames), vplan, spec)


class _PlanBatches(Dataset):
    """Item b = plan batch b, decoded and collated (corrupt videos left out and reported)."""

    def __init__(self, loader: PyAVLoader, plan: EpochPlan) -> None:
        self.refs: list[SampleRef] = loader.refs
        self.spec, self.seed, self.epoch, self.plan = loader.spec, loader.seed, loader.epoch, plan
        self.meta = loader._batch_meta
        self.reader = ShardReader()

    def __len__(self) -> int:
        return self.plan.num_batches

    def __getitem__(self, b: int) -> tuple[int, Batch | None, list[tuple[str, str, str]]]:
        idx, pad = self.plan.batch(b)
        clips, ok_idx, ok_pad, labels, skipped = [], [], [], [], []
        for i, p in zip(idx.tolist(), pad.tolist()):
            ref = self.refs[i]
            try:
                label = self.reader.label(ref)
                rng = sample_rng(self.seed, self.epoch, i) if self.spec.train else None
                clips.append(decode_views(self.reader.video_bytes(ref), self.spec, rng))
            except Exception as e:  # any decoder/container failure: counted, never replaced
                skipped.append((ref.shard, ref.key, f"{type(e).__name__}: {e}"))
                continue
            ok_idx.append(i)
            ok_pad.append(p)
            labels.append(label)
        if not clips:
            return b, None, skipped
        batch = {"video": torch.cat(clips), **self.meta(ok_idx, ok_pad, labels)}
        return b, batch, skipped


def _identity(x: Any) -> Any:
    return x


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class PyAVLoader(VideoLoader):
    backend = "pyav"

    def __init__(self, refs: list[SampleRef], *, num_workers: int = 2, **kw: Any) -> None:
        super().__init__(refs, **kw)
        self.num_workers = num_workers

    def _batches(self, plan: EpochPlan, start: int) -> Iterator[tuple[int, Batch | None, list]]:
        ds = _PlanBatches(self, plan)
        dl = DataLoader(
            ds,
            batch_size=None,
            sampler=range(start, plan.num_batches),
            num_workers=self.num_workers,
            collate_fn=_identity,
            worker_init_fn=_worker_init if self.num_workers else None,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if self.num_workers else None,
        )
        it = iter(dl)
        try:
            yield from it
        finally:
            del it
