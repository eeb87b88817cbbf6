"""The continual-learning strategies: one table of what each one does, read by the config, the task and the
driver (which ask a `Strategy` what it needs, never compare its name).

A strategy is a combination of a few mechanisms the package implements once each: a replay memory of shard
references (`memory.py`), an importance-weighted quadratic penalty (EWC / MAS, `regularize.py`), distillation
from the previous experience's model (LwF), training on every class seen so far (joint, the upper bound),
and one PEFT method plus head per experience (task-incremental). A new strategy that combines them is one
entry in `STRATEGIES`; a new mechanism is a flag here and its code where the others live.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Strategy:
    """What a strategy adds to plain fine-tuning on each experience in turn (`naive`)."""

    name: str
    replays: bool = False  # a replay batch from the memory in every micro-batch
    penalty: Literal["ewc", "mas"] | None = None  # importance-weighted pull towards the previous weights
    distills: bool = False  # LwF: the previous experience's model as a teacher on the old classes
    joint: bool = False  # trains on every class seen so far (the upper bound, not continual)
    per_experience: bool = (
        False  # one PEFT method + head per experience from the base model (task-incremental)
    )

    @property
    def estimates_importance(self) -> bool:
        """EWC / MAS: parameter importance is estimated after each experience."""
        return self.penalty is not None


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("naive"),
        Strategy("joint", joint=True),
        Strategy("replay", replays=True),
        Strategy("ewc", penalty="ewc"),
        Strategy("mas", penalty="mas"),
        Strategy("lwf", distills=True),
        Strategy("replay_lwf", replays=True, distills=True),
        Strategy("peft_per_experience", per_experience=True),
    )
}
STRATEGY_NAMES = tuple(STRATEGIES)


def strategy(name: str) -> Strategy:
    """The strategy called `name` (the config's Literal already refused unknown names)."""
    return STRATEGIES[name]
