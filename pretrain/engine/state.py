"""`TrainState`: the loop's counters, the part of a checkpoint the engine itself owns; `mix_seed`: the
independent RNG streams derived from (seed, rank, step, ...) that make resume exact; `keyed_rng`: torch's
global generators seeded from such a key for one block (dropout and drop-path of one micro-batch)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TrainState:
    """Where training stands. `samples` counts clips of completed steps over all ranks (the global batch
    times the step), `nonfinite` the optimizer steps skipped because some rank saw a non-finite loss."""

    step: int = 0
    epoch: int = 0
    samples: int = 0
    nonfinite: int = 0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, int(state[f.name]))


def mix_seed(*values: int) -> int:
    """A 63-bit seed from small integers (seed, rank, step, purpose) without collisions between them (FNV-1a
    over 64-bit words): one stream per rank and step, so a resumed step draws what the uninterrupted one drew."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


@contextlib.contextmanager
def keyed_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with torch's global generators (CPU, and `device`'s when it is a GPU) seeded with `seed`,
    and restore them after: what the block draws (dropout, drop-path) depends on `seed`, not on how far a
    per-rank stream has run. Activation checkpointing's recomputation replays the state it saved inside."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
