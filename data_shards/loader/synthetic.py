"""Synthetic backend: random normalized clips made on the device, to measure compute without I/O.

Same plan, batch layout, position and state_dict as the real backends; labels are `index % classes`
(in the refs, so a `labels=` selection works here too) and keys `synthetic-{index:08d}`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from data_shards.loader.base import Batch, VideoLoader
from data_shards.loader.index import SampleRef
from data_shards.loader.sampling import EpochPlan


def synthetic_refs(n: int, num_classes: int) -> list[SampleRef]:
    c = max(1, num_classes)
    return [SampleRef(i, "<synthetic>", f"synthetic-{i:08d}", "none", 0, 0, 0, 0, 0, i % c) for i in range(n)]


class SyntheticLoader(VideoLoader):
    backend = "synthetic"

    def _batches(self, plan: EpochPlan, start: int) -> Iterator[tuple[int, Batch | None, list]]:
        s = self.spec
        gen = torch.Generator(device=self.device)
        for b in range(start, plan.num_batches):
            idx, pad = plan.batch(b)
            gen.manual_seed(hash((self.seed, self.epoch, b)) & 0x7FFFFFFF)
            n = len(idx) * s.views_per_video
            video = torch.randn((n, 3, s.frames, s.size, s.size), generator=gen, device=self.device)
            labels = [self.refs[i].label for i in idx.tolist()]
            yield b, {"video": video, **self._batch_meta(idx.tolist(), pad.tolist(), labels)}, []
