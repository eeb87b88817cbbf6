"""DALI backend: `fn.decoders.video` (NVDEC with device="mixed", libavcodec VP9/MJPEG with "cpu") fed
by `fn.external_source`, then crop + resize + flip + normalize in the DALI graph.

Why external_source and not `fn.readers.webdataset`: the reader owns the order (its shuffle buffer,
contiguous `shard_id/num_shards` ranges) and `decoders.video` has no checkpointing, so neither an exact
mid-epoch resume nor the global per-(seed, epoch) shuffle shared with the PyAV backend is possible
through it. Feeding the encoded bytes ourselves (read via the `.idx` offsets from an mmap of the tar,
the same index the reader would use) makes order, rank split, resume, keys and augmentation parameters
identical across backends: `sampling.py` decides, DALI executes. Keys never travel through the graph:
the global sample index does, and maps back to the key, label and shard on the Python side.

Graph per video: decode the C*T planned frames once (`frames=`, a per-sample argument) -> for each of
the V views: slice its temporal clip, `resize` with a per-sample ROI (an ROI with x0 > x1 mirrors, so
crop + flip + resize is one op, bilinear, antialiased) -> `crop_mirror_normalize` to float CFHW.

The per-sample loop is the base class's (`VideoLoader.collect`): frames are planned from the stored
frame count (`SampleRef.frames`), the same numbers the PyAV backend plans from.

Failures: a video whose container cannot even be opened on the Python side (garbage bytes) is skipped and
counted (like PyAV) before DALI sees it; a failure inside the DALI graph breaks the pipeline, so it is
fatal and the error names the shard(s) and key(s) of the batch, with the ones PyAV cannot decode either.
"""

from __future__ import annotations

import collections
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import torch

from data_shards.loader.base import Batch, Collected, LoaderError, VideoLoader
from data_shards.loader.index import SampleRef
from data_shards.loader.sampling import EpochPlan, VideoPlan


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def _check_container(data: bytes) -> None:
    """Open the container header and find a video stream (no decoding): garbage bytes would otherwise
    reach `decoders.video` and break the whole pipeline."""
    with av.open(io.BytesIO(data)) as c:
        if not c.streams.video:
            raise ValueError("no video stream")


@dataclass
class _Fed:
    """One plan batch as handed to DALI (or skipped entirely when `fed` is False)."""

    got: Collected
    fed: bool


class _Arrays:
    """The external_source arrays of one batch; called as the base loop's decode step for each sample."""

    def __init__(self, n_views: int) -> None:
        self.enc: list[np.ndarray] = []
        self.frames: list[np.ndarray] = []
        self.index: list[np.ndarray] = []
        self.rs: list[list[np.ndarray]] = [[] for _ in range(n_views)]
        self.re: list[list[np.ndarray]] = [[] for _ in range(n_views)]

    def __call__(self, slot: int, ref: SampleRef, data: bytes, vplan: VideoPlan) -> None:
        _check_container(data)
        self.enc.append(np.frombuffer(data, np.uint8))
        self.frames.append(vplan.frames.astype(np.int32))
        self.index.append(np.array([ref.index], np.int64))
        for k, v in enumerate(vplan.views):
            x0, x1 = (v.x0 + v.w, v.x0) if v.flip else (v.x0, v.x0 + v.w)
            self.rs[k].append(np.array([v.y0, x0], np.float32))
            self.re[k].append(np.array([v.y0 + v.h, x1], np.float32))

    def outputs(self) -> tuple[list[np.ndarray], ...]:
        return (self.enc, self.frames, self.index, *self.rs, *self.re)


class _Source:
    """external_source callback: plan batch -> (encoded, frames, roi_start/end per view, index)."""

    def __init__(self, loader: DaliLoader, plan: EpochPlan, fifo: collections.deque) -> None:
        self.loader, self.plan, self.next_b, self.fifo = loader, plan, 0, fifo

    def __call__(self) -> tuple[list[np.ndarray], ...]:
        while self.next_b < self.plan.num_batches:
            b = self.next_b
            self.next_b += 1
            arrays = _Arrays(self.loader.spec.views_per_video)
            got = self.loader.collect(self.plan, b, arrays)
            self.fifo.append(_Fed(got, fed=bool(arrays.enc)))
            if arrays.enc:
                return arrays.outputs()
        raise StopIteration


class DaliLoader(VideoLoader):
    backend = "dali"

    def __init__(
        self,
        refs: list[SampleRef],
        *,
        dali_device: str = "cpu",
        num_threads: int = 2,
        prefetch: int = 2,
        **kw: Any,
    ) -> None:
        super().__init__(refs, **kw)
        if dali_device not in ("cpu", "mixed"):
            raise ValueError(f"dali_device must be 'cpu' or 'mixed', got {dali_device!r}")
        self.dali_device = dali_device
        self.backend = f"dali-{dali_device}"
        self.num_threads, self.prefetch = num_threads, prefetch

    def _pipeline(self, source: _Source) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        spec = self.spec
        v_n, t = spec.views_per_video, spec.frames
        device_id = None
        if self.dali_device == "mixed":
            device_id = (
                self.device.index if self.device.type == "cuda" and self.device.index is not None else 0
            )
        mean = [m * 255.0 for m in spec.mean]
        std = [s * 255.0 for s in spec.std]

        @pipeline_def(
            batch_size=self.videos_per_batch,
            num_threads=self.num_threads,
            device_id=device_id,
            prefetch_queue_depth=self.prefetch,
            exec_dynamic=True,
        )
        def graph() -> tuple[Any, ...]:
            dtypes = [types.UINT8, types.INT32, types.INT64] + [types.FLOAT] * (2 * v_n)
            enc, frames, index, *rois = fn.external_source(
                source=source, num_outputs=3 + 2 * v_n, batch=True, dtype=dtypes, ndim=[1] * (3 + 2 * v_n)
            )
            video = fn.decoders.video(enc, device=self.dali_device, frames=frames)  # FHWC uint8
            views = []
            for k in range(v_n):
                j = 0 if spec.train else k // spec.eval_crops
                clip = video if spec.temporal_clips == 1 else video[j * t : (j + 1) * t]
                clip = fn.resize(
                    clip,
                    roi_start=rois[k],
                    roi_end=rois[v_n + k],
                    size=[spec.size, spec.size],
                    interp_type=types.INTERP_LINEAR,
                    antialias=True,
                )
                views.append(
                    fn.crop_mirror_normalize(
                        clip, mean=mean, std=std, output_layout="CFHW", dtype=types.FLOAT
                    )
                )
            return (index, *views)

        pipe = graph()
        pipe.build()
        return pipe

    def _batches(self, plan: EpochPlan) -> Iterator[tuple[int, Batch | None, list]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        fifo: collections.deque[_Fed] = collections.deque()
        v_n = self.spec.views_per_video
        names = ["index", *(f"view{k}" for k in range(v_n))]
        pipe = self._pipeline(_Source(self, plan, fifo))
        it = DALIGenericIterator(
            [pipe],
            names,
            size=-1,
            auto_reset=False,
            last_batch_policy=LastBatchPolicy.PARTIAL,
            prepare_first_batch=False,
        )
        try:
            while True:
                try:
                    out = next(it)[0]
                except StopIteration:
                    break
                except Exception as e:
                    raise self._decode_error(fifo, e) from e
                while fifo and not fifo[0].fed:
                    e = fifo.popleft().got
                    yield e.b, None, e.skipped
                entry = fifo.popleft().got
                order = out["index"].view(-1).tolist()
                if order != entry.idx:
                    raise LoaderError(f"DALI output order {order} does not match the fed batch {entry.idx}")
                video = torch.stack([out[f"view{k}"] for k in range(v_n)], 1).flatten(0, 1)
                yield entry.b, {"video": video, **self.batch_meta(entry)}, entry.skipped
            while fifo:
                e = fifo.popleft().got
                yield e.b, None, e.skipped
        finally:
            del it, pipe

    def _decode_error(self, fifo: collections.deque, e: Exception) -> LoaderError:
        from data_shards.loader.pyav import decode_frames

        entries = [x.got for x in fifo if x.fed]
        if not entries:
            return LoaderError(f"DALI pipeline failed before any batch was fed: {e}")
        named, bad = [], []
        for i in entries[0].idx:
            ref = self.refs[i]
            named.append(ref.ref)
            try:
                decode_frames(self.reader.video_bytes(ref), np.arange(ref.frames))
            except Exception:
                bad.append(ref.ref)
        noise = ("Critical error", "no longer valid", "traceback", "File ", "encountered:", "C++ context")
        lines = [x.strip() for x in str(e).splitlines() if x.strip() and not any(n in x for n in noise)]
        detail = " | ".join(lines[:3])[:500] or type(e).__name__
        return LoaderError(
            f"DALI ({self.backend}) failed to decode a batch of {len(named)} samples: {named}; "
            f"undecodable by PyAV too: {bad or 'none'}; DALI said: {detail}"
        )
