"""Stage 2 of a build: everything decidable without decoding, and the shard plan.

Labels (class order), splits (from the input, else a hash of the id), keys, duplicate ids; then, once the
videos are validated, which sample goes into which shard. All pure functions of their inputs, so the
output never depends on worker count or scheduling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from data_shards.format import BACKGROUND, UNLABELED, FormatError, canonical_split, sample_key, shard_name
from data_shards.inputs import InputItem, Inputs, Reject


@dataclass(frozen=True)
class PlannedSample:
    """An input with its key, integer label and split decided; it still has to pass validation."""

    item: InputItem
    key: str
    label: int
    split: str
    labels: tuple[int, ...] | None = None  # multi-label: the sorted class indices
    segments: tuple[tuple[float, float, int], ...] | None = None  # segments: (start, end, class)

    def label_meta(self) -> dict[str, Any]:
        """What a shard's `.json` carries beyond `label` (format.py: label kinds)."""
        out: dict[str, Any] = {}
        if self.labels is not None:
            out["labels"] = list(self.labels)
        if self.segments is not None:
            out["segments"] = [list(s) for s in self.segments]
        return out


@dataclass
class Plan:
    samples: list[PlannedSample]
    rejects: list[Reject] = field(default_factory=list)
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    kind: str = "single"  # format.LABEL_KINDS


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


def _class_list(inputs: Inputs, classes: list[str] | None) -> list[str] | None:
    """Class order: `classes` (--classes), else the data set's own (UCF101 classInd, SSv2 labels.json,
    Charades), else sorted names; a segments set has `background` first (class 0: no segment)."""
    items = inputs.items
    if not classes and inputs.labelled:
        if inputs.classes:
            classes = inputs.classes
        elif inputs.kind == "segments":
            classes = class_order(s.label for i in items for s in i.segments or ())
        else:
            classes = class_order(n for i in items for n in (i.labels or (i.label,)) if n)
    if inputs.kind == "segments":
        classes = [BACKGROUND, *(c for c in classes or [] if c != BACKGROUND)]
    return list(classes) if classes else None


def _labels(it: InputItem, inputs: Inputs, index: dict[str, int]) -> PlannedSample | tuple[str, str, str]:
    """The item's labels as indices, or (reason, kind, where) of its reject."""
    if inputs.kind == "segments":
        segs = []
        for s in it.segments or ():
            if not (0 <= s.start < s.end):
                return f"segment {s.start:g}-{s.end:g}s: end is not after start", "bad-segment", s.where
            if s.label not in index or s.label == BACKGROUND:
                return f"segment label {s.label!r} is not a class", "unknown-label", s.where
            segs.append((s.start, s.end, index[s.label]))
        segs.sort()
        return PlannedSample(it, "", _dominant(segs), "", segments=tuple(segs))
    names = it.labels if inputs.kind == "multi" else ((it.label,) if it.label else ())
    if inputs.labelled and not names:
        return ("empty label set" if inputs.kind == "multi" else "missing label"), "missing-label", it.where
    unknown = [n for n in names or () if n not in index]
    if inputs.labelled and unknown:
        return f"unknown label {unknown[0]!r} (not in --classes)", "unknown-label", it.where
    if not inputs.labelled:
        return PlannedSample(it, "", UNLABELED, "")
    ids = tuple(sorted(index[n] for n in names or ()))
    return PlannedSample(it, "", ids[0], "", labels=ids if inputs.kind == "multi" else None)


def _dominant(segs: list[tuple[float, float, int]]) -> int:
    """The class covering the most time (background, 0, with no segment): a segments sample's `label`."""
    total: dict[int, float] = defaultdict(float)
    for start, end, c in segs:
        total[c] += end - start
    return max(sorted(total), key=lambda c: total[c]) if total else 0


def plan_inputs(inputs: Inputs, classes: list[str] | None, val_fraction: float, test_fraction: float) -> Plan:
    """Labels, splits, keys and duplicate checks (`_class_list` for the class order)."""
    items = inputs.items
    splitter = _Splitter.for_items(items, val_fraction, test_fraction)
    plan = Plan(
        samples=[], classes=_class_list(inputs, classes), notes=splitter.notes(items), kind=inputs.kind
    )
    index = {c: i for i, c in enumerate(plan.classes or [])}
    seen: dict[str, str] = {}
    for it in items:
        if it.id in seen:
            plan.rejects.append(
                _reject(it, f"duplicate id (first at {seen[it.id]})", "duplicate-id", splitter)
            )
            continue
        seen[it.id] = it.where
        got = _labels(it, inputs, index)
        if isinstance(got, tuple):
            reason, kind, where = got
            plan.rejects.append(_reject(dataclasses.replace(it, where=where), reason, kind, splitter))
            continue
        try:
            split = splitter(it)
        except FormatError as e:
            plan.rejects.append(Reject(it.where, it.path, str(e), it.id, "bad-split"))
            continue
        plan.samples.append(dataclasses.replace(got, key=sample_key(it.id), split=split))
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
