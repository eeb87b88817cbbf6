"""Synthetic backend: random normalized clips made on the device, to measure compute without I/O.

Same plan, batch layout, position and state_dict as the real backends; labels are `index % classes`
and keys `synthetic-{index:08d}`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from data_shards.loader.base import Batch, VideoLoader
from data_shards.loader.index import SampleRef
from data_shards.loader.sampling import EpochPlan


def synthetic_refs(n: int) -> list[SampleRef]:
    return [SampleRef(i, "<synthetic>", f"synthetic-{i:08d}", "none", 0, 0, 0) for i in range(n)]


class SyntheticLoader(VideoLoader):
    backend = "synthetic"

    def __init__(self, refs: list[SampleRef], *, num_classes: int = 10, **kw: Any) -> None:
        super().__init__(refs, **kw)
        self.num_classes = max(1, num_classes)

    def _batches(self, plan: EpochPlan, start: int) -> Iterator[tuple[int, Batch | None, list]]:
        s = self.spec
        gen = torch.Generator(device=self.device)
        for b in range(start, plan.num_batches):
            idx, pad = plan.batch(b)
            gen.manual_seed(hash((self.seed, self.epoch, b)) & 0x7FFFFFFF)
            n = len(idx) * s.views_per_video
            video = torch.randn((n, 3, s.frames, s.size, s.size), generator=gen, device=self.device)
            labels = [int(i) % self.num_classes for i in idx.tolist()]
            yield b, {"video": video, **self._batch_meta(idx.tolist(), pad.tolist(), labels)}, []
