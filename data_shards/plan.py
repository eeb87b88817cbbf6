"""Stage 2 of a build: everything decidable without decoding, and the shard plan.

Labels (class order), splits (from the input, else a hash of the id), keys, duplicate ids; then, once the
videos are validated, which sample goes into which shard. All pure functions of their inputs, so the
output never depends on worker count or scheduling.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from data_shards.format import UNLABELED, FormatError, canonical_split, sample_key, shard_name
from data_shards.inputs import InputItem, Inputs, Reject


@dataclass(frozen=True)
class PlannedSample:
    """An input with its key, integer label and split decided; it still has to pass validation."""

    item: InputItem
    key: str
    label: int
    split: str


@dataclass
class Plan:
    samples: list[PlannedSample]
    rejects: list[Reject] = field(default_factory=list)
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ShardEntry:
    """An accepted sample on its way into a shard (crosses the Ray boundary to the writer task)."""

    key: str
    path: str  # the source file (stored as-is with codec copy)
    ext: str
    label: int
    split: str
    meta: dict[str, Any]


def class_order(labels: Iterable[str]) -> list[str]:
    """Sorted label names; numerically when every label is an integer (so "10" comes after "9")."""
    names = set(labels)
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def hash_split(video_id: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from the id alone, so adding videos never moves existing ones."""
    u = int(hashlib.sha256(video_id.encode("utf-8")).hexdigest()[:12], 16) / float(1 << 48)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _known_split(name: str) -> str | None:
    try:
        return canonical_split(name)
    except FormatError:
        return None


@dataclass(frozen=True)
class _Splitter:
    """Splits: an item's own split, else a hash of its group. When the source names splits but has no val
    (test) split, `--val-fraction` (`--test-fraction`) carves one out of its train items by the same hash."""

    val_fraction: float
    test_fraction: float
    carve_val: float
    carve_test: float

    @classmethod
    def for_items(cls, items: list[InputItem], val_fraction: float, test_fraction: float) -> _Splitter:
        named = {_known_split(it.split) for it in items if it.split}
        carve_val = val_fraction if "val" not in named else 0.0
        carve_test = test_fraction if "test" not in named else 0.0
        return cls(val_fraction, test_fraction, carve_val, carve_test)

    def notes(self, items: list[InputItem]) -> list[str]:
        if not any(it.split for it in items):
            return []
        asked = (("val", self.val_fraction, self.carve_val), ("test", self.test_fraction, self.carve_test))
        return [
            f"--{name}-fraction {value:g} ignored: the source has its own {name} split"
            for name, value, carved in asked
            if value and not carved
        ]

    def __call__(self, it: InputItem) -> str:
        group = it.group or it.id
        if not it.split:
            return hash_split(group, self.val_fraction, self.test_fraction)
        split = canonical_split(it.split)
        if split == "train" and (self.carve_val or self.carve_test):
            return hash_split(group, self.carve_val, self.carve_test)
        return split


def _reject(it: InputItem, reason: str, kind: str, splitter: _Splitter) -> Reject:
    try:
        split: str | None = splitter(it)
    except FormatError:
        split = None
    return Reject(it.where, it.path, reason, it.id, kind, split)


def plan_inputs(inputs: Inputs, classes: list[str] | None, val_fraction: float, test_fraction: float) -> Plan:
    """Labels, splits, keys and duplicate checks. Class order: `classes` (--classes), else the data set's
    own (UCF101 classInd, SSv2 labels.json), else sorted names."""
    items = inputs.items
    if not classes and inputs.labelled:
        classes = inputs.classes or class_order(i.label for i in items if i.label)
    splitter = _Splitter.for_items(items, val_fraction, test_fraction)
    plan = Plan(samples=[], classes=list(classes) if classes else None, notes=splitter.notes(items))
    index = {c: i for i, c in enumerate(plan.classes or [])}
    seen: dict[str, str] = {}
    for it in items:
        if it.id in seen:
            plan.rejects.append(
                _reject(it, f"duplicate id (first at {seen[it.id]})", "duplicate-id", splitter)
            )
            continue
        seen[it.id] = it.where
        if inputs.labelled and not it.label:
            plan.rejects.append(_reject(it, "missing label", "missing-label", splitter))
            continue
        if inputs.labelled and it.label not in index:
            plan.rejects.append(
                _reject(it, f"unknown label {it.label!r} (not in --classes)", "unknown-label", splitter)
            )
            continue
        try:
            split = splitter(it)
        except FormatError as e:
            plan.rejects.append(Reject(it.where, it.path, str(e), it.id, "bad-split"))
            continue
        label = index[it.label] if inputs.labelled and it.label else UNLABELED
        plan.samples.append(PlannedSample(item=it, key=sample_key(it.id), label=label, split=split))
    keys = Counter(p.key for p in plan.samples)
    clash = [k for k, c in keys.items() if c > 1]
    if clash:  # a 96-bit hash collision: astronomically unlikely, but never silent
        raise RuntimeError(f"sample key collision for {clash}; rename one of the inputs")
    return plan


def assign_shards(
    entries: list[ShardEntry], shard_samples: int, shard_bytes: int | None
) -> dict[str, list[ShardEntry]]:
    """Deterministic shard plan: per split, samples sorted by key, cut by count and/or bytes."""
    by_split: dict[str, list[ShardEntry]] = defaultdict(list)
    for e in entries:
        by_split[e.split].append(e)
    plan: dict[str, list[ShardEntry]] = {}
    for split in sorted(by_split):
        number, current, size = 0, [], 0
        for e in sorted(by_split[split], key=lambda e: e.key):
            nbytes = e.meta["bytes"]
            full = len(current) >= shard_samples or (shard_bytes and current and size + nbytes > shard_bytes)
            if full:
                plan[shard_name(split, number)] = current
                number, current, size = number + 1, [], 0
            current.append(e)
            size += nbytes
        if current:
            plan[shard_name(split, number)] = current
    return plan


def plan_digest(entries: list[ShardEntry]) -> str:
    """What a shard must contain; a shard on disk whose recorded digest matches is kept on a re-run."""
    sig = [(e.key, e.ext, e.label, e.meta) for e in entries]
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()
