"""Synthetic backend: random normalized clips made on the device, to measure compute without I/O.

Same plan, batch layout, position and state_dict as the real backends; labels are `index % classes`
(in the refs, so a `labels=` selection works here too) and keys `synthetic-{index:08d}`. A video's clips
are a pure function of (seed, epoch, sample index), like every random draw of the real backends, so they do
not depend on the batch a sample lands in (rank count, batch size, resume position). With `spec.audio` each
clip also gets random sound of the right shape, and the sync task's shift drawn like the real backends'.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from data_shards.loader.audio import draw_offset
from data_shards.loader.base import Batch, VideoLoader
from data_shards.loader.index import SampleRef
from data_shards.loader.sampling import EpochPlan


def synthetic_refs(n: int, num_classes: int) -> list[SampleRef]:
    c = max(1, num_classes)
    return [SampleRef(i, "<synthetic>", f"synthetic-{i:08d}", "none", 0, 0, 0, 0, 0, i % c) for i in range(n)]


class SyntheticLoader(VideoLoader):
    backend = "synthetic"

    def _batches(self, plan: EpochPlan) -> Iterator[tuple[int, Batch | None, list]]:
        s = self.spec
        gen = torch.Generator(device=self.device)
        shape = (s.views_per_video, 3, s.frames, s.size, s.size)
        for b in range(plan.num_batches):
            idx, pad = plan.batch(b)
            clips, sounds, drawn = [], [], []
            for i in idx.tolist():
                gen.manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
                clips.append(torch.randn(shape, generator=gen, device=self.device))
                if s.audio is not None:
                    wave = torch.randn(
                        (s.views_per_video, s.audio.samples), generator=gen, device=self.device
                    )
                    sounds.append(0.1 * wave.cpu().numpy())
                    drawn += [draw_offset(s.audio, self.seed, self.epoch, i)] * s.views_per_video
            video = torch.cat(clips)
            labels = [self.refs[i].label for i in idx.tolist()]
            meta = self._batch_meta(idx.tolist(), pad.tolist(), labels)
            sound = self._sound_meta(sounds, drawn) if s.audio is not None else {}
            yield b, {"video": video, **meta, **sound}, []
