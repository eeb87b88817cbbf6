"""The lineage a registered model carries (`lineage.json` in its model directory): the dataset catalog
(every shard set it was trained on, append-only, with its manifest hash), the global class order (old ids
never move: a new class goes to the end), the replay memory (shard references) and the rounds that made it.

Round N+1 reads it from the champion, so the catalog, the class order and the memory continue where round
N left them, on any machine that can read the shard sets (local paths or URLs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_shards import storage
from data_shards.format import MANIFEST_NAME, load_manifest

LINEAGE_FILE = "lineage.json"


@dataclass(frozen=True)
class ShardSet:
    """One catalogued batch: where its shards are, what its manifest was when catalogued, its classes."""

    name: str
    shards: str
    manifest_sha256: str
    classes: tuple[str, ...]  # the labels its videos carry
    round: str

    @classmethod
    def of(cls, name: str, shards: str, round_name: str) -> ShardSet:
        m = load_manifest(shards)
        present = {c for s in m.splits.values() for c in (s.per_class or {})} if m.classes else set()
        labels = tuple(c for c in (m.classes or []) if c in present) or tuple(m.classes or [])
        return cls(name, shards, manifest_sha256(shards), labels, round_name)

    def check(self) -> None:
        """The set is still what was catalogued (a rebuilt or edited set would make old scores meaningless)."""
        now = manifest_sha256(self.shards)
        if now != self.manifest_sha256:
            raise ValueError(
                f"catalogued shard set {self.name!r} at {self.shards} changed since it was catalogued "
                f"(manifest sha256 {now[:12]} != {self.manifest_sha256[:12]}): restore it, or start a new model"
            )


def manifest_sha256(shards: str) -> str:
    return hashlib.sha256(storage.read_bytes(storage.join(shards, MANIFEST_NAME))).hexdigest()


@dataclass
class Lineage:
    classes: list[str] = field(default_factory=list)
    sets: list[ShardSet] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)  # ReplayMemory.to_json()
    rounds: list[str] = field(default_factory=list)

    @classmethod
    def of_model(cls, model_dir: Path) -> Lineage:
        """The model's lineage; a model from outside the loop (a plain fine-tune) starts an empty catalog
        with its own classes."""
        path = model_dir / LINEAGE_FILE
        if path.is_file():
            data = json.loads(path.read_text())
            sets = [ShardSet(**{**s, "classes": tuple(s["classes"])}) for s in data.pop("sets")]
            return cls(**data, sets=sets)
        config = json.loads((model_dir / "config.json").read_text())
        names = config.get("config", {}).get("class_names") or config.get("class_names") or []
        return cls(classes=list(names))

    def save(self, model_dir: Path) -> None:
        (model_dir / LINEAGE_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    def class_order(self, batch_labels: list[str]) -> list[str]:
        """The global class order after this batch: the known classes, then the new ones sorted."""
        known = set(self.classes)
        return [*self.classes, *sorted({c for c in batch_labels if c not in known})]

    def with_set(self, new: ShardSet, classes: list[str], memory: dict[str, Any]) -> Lineage:
        """The next lineage (append-only: a set of the same name must be the same set)."""
        for s in self.sets:
            if s.name == new.name and s.manifest_sha256 != new.manifest_sha256:
                raise ValueError(f"the catalog already holds a different shard set named {new.name!r}")
        sets = self.sets if any(s.name == new.name for s in self.sets) else [*self.sets, new]
        rounds = self.rounds if new.round in self.rounds else [*self.rounds, new.round]
        return Lineage(list(classes), list(sets), memory, rounds)
