"""`TrainState`: the loop's counters, the part of a checkpoint the engine itself owns; `mix_seed`: the
independent RNG streams derived from (seed, rank, step, ...) that make resume exact."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


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
