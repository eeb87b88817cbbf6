"""The promotion gate: a pure function from the two models' scores to a decision with every number.

Scores are `{set name: {"top1": float, "n": int, "recall": {class: float}}}` on the same test splits (every
catalogued set's, old and new). A first round has no champion: only the absolute floors apply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from finetune.update.config import GateSection

Scores = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Check:
    rule: str  # which rule (the config key it reads)
    target: str  # the set or class it looked at
    value: float  # the challenger's number
    threshold: float  # what it had to reach
    passed: bool

    def describe(self) -> str:
        mark = "pass" if self.passed else "FAIL"
        return f"[{mark}] {self.rule} on {self.target}: {self.value:.4f} (needs >= {self.threshold:.4f})"


@dataclass(frozen=True)
class Decision:
    promote: bool
    checks: list[Check]
    new_set: str

    def to_json(self) -> dict[str, Any]:
        return {"promote": self.promote, "new_set": self.new_set, "checks": [asdict(c) for c in self.checks]}


def decide(gate: GateSection, new_set: str, challenger: Scores, champion: Scores | None) -> Decision:
    """Apply every rule; promote only when all pass (a rule with nothing to look at is not a pass by
    default: a new set without test videos fails `min_top1`)."""
    new = challenger[new_set]
    checks = [
        Check("gate.min_top1", new_set, _num(new["top1"]), gate.min_top1, _ge(new["top1"], gate.min_top1))
    ]
    if champion is not None:
        need = _num(champion[new_set]["top1"]) + gate.min_gain_new
        checks.append(Check("gate.min_gain_new", new_set, _num(new["top1"]), need, _ge(new["top1"], need)))
        for name, theirs in champion.items():
            if name == new_set:
                continue
            need = _num(theirs["top1"]) - gate.max_drop_old
            ours = challenger[name]["top1"]
            checks.append(Check("gate.max_drop_old", name, _num(ours), need, _ge(ours, need)))
    if gate.min_class_recall > 0:
        for name, s in challenger.items():
            for cls, recall in sorted(s.get("recall", {}).items()):
                checks.append(
                    Check(
                        "gate.min_class_recall",
                        f"{name}/{cls}",
                        recall,
                        gate.min_class_recall,
                        recall >= gate.min_class_recall,
                    )
                )
    return Decision(all(c.passed for c in checks), checks, new_set)


def _num(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def _ge(v: float | None, threshold: float) -> bool:
    """NaN (no test videos) never passes."""
    return v is not None and v == v and v >= threshold - 1e-12
