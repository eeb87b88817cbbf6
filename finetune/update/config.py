"""`UPDATE.yaml`: what one round of the update loop takes. Loaded like every tubelet config (strict keys,
`key=value` overrides, errors naming the key); see finetune/configs/update.yaml. Its `finetune.config`, the
round's fine-tune, defaults to finetune/configs/tiny_cpu_update.yaml."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from data_shards import storage
from pretrain.engine import ConfigError, require

# strategies that need nothing but the previous model and the memory (EWC/MAS need importance files,
# peft_per_experience one head per experience: neither fits a model that moves through rounds)
UPDATE_STRATEGIES = ("naive", "replay", "lwf", "replay_lwf")


@dataclass
class BuildSection:
    """How the batch is sharded (`data_shards build` options)."""

    val_fraction: float = 0.0  # --val-fraction
    test_fraction: float = 0.25  # --test-fraction: the batch's test videos, for the gate
    shard_samples: int = 64  # --shard-samples
    format: str = "auto"  # --format
    videos: str | None = None  # where the videos are, when not beside the annotations (--videos)
    workers: int | None = None  # local Ray CPUs (None: all cores); 0: in the round's process, without Ray


@dataclass
class FinetuneSection:
    """The continual fine-tune of a round: a ContinualConfig YAML plus overrides (`key=value`)."""

    config: str = "finetune/configs/tiny_cpu_update.yaml"  # a continual fine-tune YAML
    overrides: list[str] = field(default_factory=list)  # key=value on that YAML
    ranks: int = 1  # processes (torchrun --nproc-per-node)


@dataclass
class GateSection:
    """The rules a challenger must pass to be promoted (every number is a fraction, top-1 in [0, 1]).

    - new-set top-1 ≥ champion's + `min_gain_new` (the batch just added);
    - on every older set: top-1 ≥ champion's − `max_drop_old` (no forgetting beyond ε);
    - every class with test videos: recall ≥ `min_class_recall`;
    - new-set top-1 ≥ `min_top1` (the only rule of a first round, which has no champion)."""

    min_gain_new: float = 0.0  # new-set top-1 must beat the champion's by this
    max_drop_old: float = 0.02  # no older set's top-1 may drop more than this
    min_class_recall: float = 0.0  # every class with test videos
    min_top1: float = 0.0  # new-set top-1 (a first round's only rule)

    def check(self) -> None:
        for k in ("max_drop_old", "min_class_recall", "min_top1"):
            v = getattr(self, k)
            require(0.0 <= v <= 1.0, f"gate.{k}={v} must be in [0, 1] (a fraction of videos)")
        require(-1.0 <= self.min_gain_new <= 1.0, f"gate.min_gain_new={self.min_gain_new} must be in [-1, 1]")


@dataclass
class UpdateConfig:
    model: str = ""  # the registered model's name
    videos: str = (
        ""  # the batch: anything `data_shards build` reads (manifest, folder, data set), local or URL
    )
    work_dir: str = "runs/update"  # local: round state, the lock, the fine-tune runs
    shards_root: str | None = None  # where shard sets go (local or URL); default WORK_DIR/shards
    round: str | None = None  # the round's name; default: a hash of the batch's location
    init: str | None = (
        None  # the first round's starting point (no champion yet): a model/run/HF dir, or scratch
    )
    tracking_uri: str | None = None  # default $MLFLOW_TRACKING_URI, else sqlite:///WORK_DIR/mlflow.db
    experiment: str = "tubelet-update"  # the MLflow experiment of the round's runs
    lock_wait_s: float = 0.0  # a concurrent round: wait this long for the lock, then refuse
    build: BuildSection = field(default_factory=BuildSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    gate: GateSection = field(default_factory=GateSection)

    def validate(self) -> None:
        require(bool(self.model), "model must name the registered model (e.g. model=tubelet-demo)")
        require(bool(self.videos), "videos must name the batch of new videos (a manifest or a folder)")
        require(not storage.is_url(self.work_dir), f"work_dir={self.work_dir} must be a local folder")
        require(self.finetune.ranks >= 1, "finetune.ranks must be >= 1")
        require(
            Path(self.finetune.config).is_file(),
            f"finetune.config={self.finetune.config}: no such file"
            + (f" in {Path.cwd()} (a relative path is read from the current folder: run from the tubelet "
               "checkout, or give an absolute path)" if not Path(self.finetune.config).is_absolute() else ""),
        )  # fmt: skip
        require(
            0.0 < self.build.test_fraction < 1.0,
            "build.test_fraction must be in (0, 1): the gate compares models on the batch's test split",
        )
        require(
            self.build.workers is None or self.build.workers >= 0,
            "build.workers must be 0 (build in the round's process) or more, or null (all cores)",
        )
        require(self.lock_wait_s >= 0, "lock_wait_s must be >= 0")
        self.gate.check()
        # checked now, not after the batch is sharded: a missing init, a typo in the fine-tune's overrides
        require(
            self.init is None
            or storage.is_url(self.init)
            or self.init.startswith("models:/")
            or Path(self.init).exists(),
            f"init={self.init}: no such file or folder",
        )
        from finetune.continual.config import ContinualConfig
        from pretrain.engine import load_config

        try:
            load_config(ContinualConfig, self.finetune.config, list(self.finetune.overrides))
        except ConfigError as e:
            raise ConfigError(f"finetune.overrides {list(self.finetune.overrides)}: {e}") from None
        if self.round is not None:
            bad = set(self.round) - set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
            require(
                not bad and self.round not in ("", ".", ".."), f"round={self.round!r}: use [A-Za-z0-9._-]"
            )

    @property
    def round_name(self) -> str:
        """Stable for one batch: re-running the same command resumes the same round."""
        if self.round:
            return self.round
        assert self.videos is not None
        where = self.videos if storage.is_url(self.videos) else str(Path(self.videos).resolve())
        return "round-" + hashlib.sha256(where.encode()).hexdigest()[:10]

    @property
    def shards_location(self) -> str:
        return self.shards_root or str(Path(self.work_dir) / "shards")

    def store(self) -> str:
        """The one MLflow store of the whole round: runs, evaluations and model versions."""
        import os

        return (
            self.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(Path(self.work_dir) / 'mlflow.db').resolve()}"
        )


def check_strategy(strategy: str) -> None:
    """The strategies a round can run (the rest need state a registered model does not carry)."""
    if strategy not in UPDATE_STRATEGIES:
        raise ConfigError(
            f"continual.strategy={strategy} is not available to the update loop: use one of {UPDATE_STRATEGIES}"
        )
