"""Replay: a bounded memory of *shard references* (shard set, key, label), never copies of videos, and the
loader that mixes a memory batch into every micro-batch of the current experience.

The memory is updated once per experience, after it, from that experience's training samples in a seeded
order: a pure function of (seed, experiences so far), identical on every rank, saved as JSON with the run's
state, so a resumed run has the same memory. The replay batches come from an ordinary shard loader over the
memory's keys: the same decoding, augmentation, rank split and resumable position as any training data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from pretrain.engine import Batch, Loader


@dataclass(frozen=True)
class MemoryItem:
    shards: str  # the shard set (folder) the sample lives in
    ref: str  # "<tar>:<key>": unique across shard sets (domain-incremental memories span several)
    label: int


@dataclass
class ReplayMemory:
    """At most `size` items. `reservoir`: every training video seen so far had the same chance to be kept
    (Vitter's algorithm R over the stream of experiences); `class_balanced`: an equal share per class seen."""

    size: int
    selection: Literal["reservoir", "class_balanced"] = "reservoir"
    seed: int = 0
    items: list[MemoryItem] = dataclasses.field(default_factory=list)
    seen: int = 0  # videos offered to the memory so far (reservoir's n)

    def update(self, candidates: list[MemoryItem], experience: int) -> None:
        """Offer an experience's training samples (the full split, the same list on every rank)."""
        rng = np.random.default_rng([self.seed, experience, 0x4E4])
        offered = [candidates[i] for i in rng.permutation(len(candidates))]
        if self.selection == "reservoir":
            self._reservoir(offered, rng)
        else:
            self._balanced(offered)

    def _reservoir(self, offered: list[MemoryItem], rng: np.random.Generator) -> None:
        for item in offered:
            self.seen += 1
            if len(self.items) < self.size:
                self.items.append(item)
            else:
                j = int(rng.integers(self.seen))
                if j < self.size:
                    self.items[j] = item

    def _balanced(self, offered: list[MemoryItem]) -> None:
        """Old items first, then the new ones, each class cut to its quota (size // classes, the remainder
        to the lowest class ids)."""
        self.seen += len(offered)
        by_class: dict[int, list[MemoryItem]] = {}
        for item in [*self.items, *offered]:
            by_class.setdefault(item.label, []).append(item)
        labels = sorted(by_class)
        base, extra = divmod(self.size, len(labels))
        self.items = [it for i, c in enumerate(labels) for it in by_class[c][: base + (i < extra)]]

    def per_class(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for it in self.items:
            out[it.label] = out.get(it.label, 0) + 1
        return dict(sorted(out.items()))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReplayMemory:
        items = [MemoryItem(**it) for it in data.pop("items")]
        return cls(**data, items=items)


def concat_batches(a: Batch, b: Batch) -> Batch:
    """One micro-batch from two: tensors concatenated along the batch, key lists joined."""
    out: Batch = {}
    for k in a:
        out[k] = a[k] + b[k] if isinstance(a[k], list) else torch.cat([a[k], b[k]])
    return out


class ReplayLoader:
    """Every micro-batch = one batch of the current experience + one batch from the memory.

    The epoch is the current experience's; the memory loader cycles through its own epochs. Both positions
    are in `state_dict`, so a resumed run draws the same replay batches."""

    def __init__(self, current: Loader, memory: Loader) -> None:
        if len(memory) < 1:
            raise ValueError(
                "the replay memory gives no full batch on this rank: lower continual.replay_batch_size"
            )
        self.current, self.memory = current, memory
        self._memory_epoch = 0
        self._memory_iter: Iterator[Batch] | None = None

    def __len__(self) -> int:
        return len(self.current)

    def set_epoch(self, epoch: int) -> None:
        self.current.set_epoch(epoch)

    def _next_memory(self) -> Batch:
        while True:
            if self._memory_iter is None:
                self.memory.set_epoch(self._memory_epoch)
                self._memory_iter = iter(self.memory)
            try:
                return next(self._memory_iter)
            except StopIteration:
                self._memory_iter = None
                self._memory_epoch += 1

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.current:
            yield concat_batches(batch, self._next_memory())

    def state_dict(self) -> dict[str, Any]:
        return {
            "current": self.current.state_dict(),
            "memory": self.memory.state_dict(),
            "memory_epoch": self._memory_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current.load_state_dict(state["current"])
        self._memory_epoch = int(state["memory_epoch"])
        self.memory.set_epoch(self._memory_epoch)
        self.memory.load_state_dict(state["memory"])
        self._memory_iter = None
