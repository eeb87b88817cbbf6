"""Continual-learning config: the fine-tuning config + a `continual` section, and the experiences it describes.

Two scenarios:
- class-incremental: one shard set (`data.shards`), its classes split into ordered groups
  (`continual.experiences: [[0, 1], [2, 3]]`, or `continual.classes_per_experience: 2` with a seeded order);
  the head grows with the classes seen, and no experience id is given at test time;
- domain-incremental: `data.shards` is domain 0 and `continual.domains` lists further shard sets with the same
  classes; the head covers every class from the start.
Everything here is checked before any process starts; errors name the `continual.*` key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from data_shards.format import FormatError, load_manifest
from finetune.config import FinetuneConfig, head_kind
from finetune.continual.strategies import STRATEGY_NAMES, Strategy, strategy
from pretrain.engine import ConfigError, require, resume_key
from pretrain.engine.config import grad_accum_steps


@dataclass
class ContinualSection:
    """Which strategy, which experiences, and the strategies' knobs (see README: Continual learning)."""

    # naive | joint | replay | ewc | mas | lwf | replay_lwf | peft_per_experience
    strategy: Literal[STRATEGY_NAMES] = resume_key("naive")  # type: ignore[valid-type]
    experiences: list[list[int]] | None = field(
        default=None, metadata={"resume": True}
    )  # class-id groups, in order
    classes_per_experience: int | None = resume_key(None)  # or: groups of this size in a seeded class order
    class_order_seed: int = resume_key(0)  # the class order of classes_per_experience
    domains: list[str] = field(
        default_factory=list, metadata={"resume": True}
    )  # shard sets after data.shards
    memory_size: int = resume_key(0)  # replay memory, in videos (shard references, never copies)
    # which videos the memory keeps: a uniform reservoir sample, or equal numbers per class
    memory_selection: Literal["reservoir", "class_balanced"] = resume_key("reservoir")
    replay_batch_size: int | None = resume_key(None)  # clips per micro-batch from memory; None: half
    ewc_lambda: float = resume_key(1000.0)  # ewc: weight of the Fisher-weighted pull to the old weights
    mas_lambda: float = resume_key(10.0)  # mas: weight of the sensitivity-weighted pull to the old weights
    importance_decay: float = resume_key(1.0)  # online EWC/MAS: old importance × this + the new one
    importance_samples: int = resume_key(64)  # videos per experience the importance is estimated on
    lwf_alpha: float = resume_key(1.0)  # lwf: weight of the distillation from the previous model
    lwf_temperature: float = resume_key(2.0)  # lwf: softmax temperature of that distillation
    peft_method: Literal["lora", "adapter"] = resume_key("lora")  # for peft_per_experience
    eval_split: str = "test"  # the split every experience's model is scored on (the accuracy matrix)
    # the modes: one set on the command line drops the config file's others (pretrain.engine load_config)
    ALTERNATIVES: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("domains", "experiences", "classes_per_experience"),
    )

    @property
    def rules(self) -> Strategy:
        """What the chosen strategy does (`strategies.STRATEGIES`)."""
        return strategy(self.strategy)

    def check(self) -> None:
        s = self.strategy
        require(self.memory_size >= 0, "continual.memory_size must be >= 0 (videos)")
        require(
            not self.rules.replays or self.memory_size > 0,
            f"continual.strategy={s} replays a memory: set continual.memory_size > 0 (videos)",
        )
        require(
            self.replay_batch_size is None or self.replay_batch_size >= 1,
            "continual.replay_batch_size must be >= 1",
        )
        for name in ("ewc_lambda", "mas_lambda", "lwf_alpha"):
            require(getattr(self, name) >= 0, f"continual.{name} must be >= 0")
        require(self.lwf_temperature > 0, "continual.lwf_temperature must be > 0")
        require(0 <= self.importance_decay <= 1, "continual.importance_decay must be in [0, 1]")
        require(self.importance_samples >= 1, "continual.importance_samples must be >= 1")


@dataclass(frozen=True)
class Experience:
    """One step of the stream: which shard set, which classes (global ids) it trains."""

    index: int
    shards: str
    classes: tuple[int, ...]
    name: str


@dataclass
class ContinualConfig(FinetuneConfig):
    continual: ContinualSection = field(default_factory=ContinualSection)

    def validate(self, world_size: int = 1) -> None:
        self.continual.check()
        require(
            self.data.shards is not None, "data.shards must name a shard set (domain-incremental: domain 0)"
        )
        super().validate(world_size)
        head = head_kind(self)
        require(
            head == "single_label",
            f"continual learning grows a single-label head; {self.data.shards} calls for model.head={head}",
        )
        s = self.continual.strategy
        require(
            not (self.deepspeed.fp16 and self.continual.rules.estimates_importance),
            f"continual.strategy={s} adds its penalty gradient outside the loss scaler: use bf16 or fp32",
        )
        experiences = plan_experiences(self)
        check_memory_fits(self, experiences)
        check_experiences_fill_a_step(self, experiences, world_size)
        if self.continual.rules.replays and self.continual.replay_batch_size is not None:
            require(
                self.continual.replay_batch_size < self.train.micro_batch_size,
                f"continual.replay_batch_size={self.continual.replay_batch_size} must be smaller than "
                f"train.micro_batch_size={self.train.micro_batch_size} (the rest is the current experience)",
            )


def _classes(shards: str, key: str) -> list[str]:
    try:
        classes = load_manifest(shards).classes
    except FormatError as e:
        raise ConfigError(f"{key}={shards}: {e}") from e
    require(bool(classes), f"{key}={shards}: the shard set has no classes (unlabelled shards)")
    return list(classes or [])


def class_groups(c: ContinualSection, num_classes: int) -> list[list[int]]:
    """The class-incremental groups: `continual.experiences`, or a seeded order cut every N classes."""
    require(
        (c.experiences is None) != (c.classes_per_experience is None),
        "class-incremental: set exactly one of continual.experiences ([[0,1],[2,3]]) and "
        "continual.classes_per_experience (e.g. add continual.classes_per_experience=null or "
        "continual.experiences=null)",
    )
    if c.experiences is None:
        n = c.classes_per_experience or 0
        require(
            n >= 1 and num_classes % n == 0,
            f"continual.classes_per_experience={n} must divide the {num_classes} classes of data.shards",
        )
        order = np.random.default_rng(c.class_order_seed).permutation(num_classes).tolist()
        return [order[i : i + n] for i in range(0, num_classes, n)]
    groups = [list(g) for g in c.experiences]
    for i, g in enumerate(groups):
        require(bool(g), f"continual.experiences[{i}] is empty: every experience needs at least one class")
        bad = [x for x in g if not 0 <= x < num_classes]
        require(
            not bad,
            f"continual.experiences[{i}] has unknown class ids {bad}: data.shards has classes 0..{num_classes - 1}",
        )
    flat = [x for g in groups for x in g]
    repeated = sorted({x for x in flat if flat.count(x) > 1})
    require(
        not repeated,
        f"continual.experiences repeats class ids {repeated}: each class belongs to one experience",
    )
    return groups


def plan_experiences(cfg: ContinualConfig) -> list[Experience]:
    """The ordered experiences of this config (class- or domain-incremental)."""
    c, shards = cfg.continual, str(cfg.data.shards)
    classes = _classes(shards, "data.shards")
    if c.domains:
        require(
            c.experiences is None and c.classes_per_experience is None,
            "continual.domains (domain-incremental) excludes continual.experiences / classes_per_experience: "
            "set one mode (domain-incremental: add continual.experiences=null "
            "continual.classes_per_experience=null; class-incremental: continual.domains=[])",
        )
        out = []
        for k, folder in enumerate([shards, *c.domains]):
            key = "data.shards" if k == 0 else f"continual.domains[{k - 1}]"
            theirs = _classes(folder, key)
            require(
                theirs == classes,
                f"{key}={folder} has classes {theirs}, data.shards has {classes}: domains must share classes",
            )
            out.append(Experience(k, folder, tuple(range(len(classes))), f"domain {k}: {Path(folder).name}"))
        return out
    groups = class_groups(c, len(classes))
    return [
        Experience(k, shards, tuple(g), f"exp {k}: " + ", ".join(classes[i] for i in g))
        for k, g in enumerate(groups)
    ]


def train_videos(cfg: ContinualConfig, exp: Experience) -> int:
    """Training videos of an experience, from the manifest (per-class counts of the train split)."""
    info = load_manifest(exp.shards).splits.get(cfg.data.train_split)
    require(info is not None, f"{exp.shards}: no {cfg.data.train_split!r} split")
    assert info is not None
    if len(exp.classes) == len(load_manifest(exp.shards).classes or []):
        return info.samples
    names = load_manifest(exp.shards).classes or []
    return sum(info.per_class.get(names[i], 0) for i in exp.classes)


def check_memory_fits(cfg: ContinualConfig, experiences: list[Experience]) -> None:
    """Every experience has training videos, and the memory is smaller than all the training data."""
    counts = [train_videos(cfg, e) for e in experiences]
    empty = [e.name for e, n in zip(experiences, counts) if n == 0]
    require(not empty, f"experiences without training videos in split {cfg.data.train_split!r}: {empty}")
    total = sum(counts)
    m = cfg.continual.memory_size
    require(
        m <= total or not cfg.continual.rules.replays,  # a strategy without replay keeps no memory
        f"continual.memory_size={m} is larger than all the training data ({total} videos over "
        f"{len(experiences)} experiences): lower it",
    )


def check_experiences_fill_a_step(
    cfg: ContinualConfig, experiences: list[Experience], world_size: int
) -> None:
    """Every experience's train loader gives at least one optimizer step per epoch (the engine's
    `Schedule.plan` would otherwise fail only once that experience starts, after the earlier ones trained).

    A step takes `world × accumulation` micro-batches, remainders dropped; with replay, an experience after
    the first reads only `micro − replay_batch_size` of each micro-batch's clips from its own videos.
    """
    micro, accum = cfg.train.micro_batch_size, grad_accum_steps(cfg, world_size)
    c = cfg.continual
    replay = (c.replay_batch_size or micro // 2) if c.rules.replays else 0
    counts = [train_videos(cfg, e) for e in experiences]
    for k, e in enumerate(experiences):
        n = sum(counts[: k + 1]) if c.rules.joint and not c.domains else counts[k]
        own = micro - (replay if k > 0 else 0)
        need = world_size * accum * own
        if n >= need:
            continue
        per = f"{world_size} rank(s) × {accum} micro-batch(es) × {own} clips"
        if own < micro:
            per += f" of its own (train.micro_batch_size={micro} − continual.replay_batch_size={replay})"
        raise ConfigError(
            f"{e.name} has {n} training videos in split {cfg.data.train_split!r}, fewer than one optimizer "
            f"step needs ({need} = {per}): lower train.global_batch_size={cfg.train.global_batch_size} "
            f"(and train.micro_batch_size), or give the experience more videos"
        )
