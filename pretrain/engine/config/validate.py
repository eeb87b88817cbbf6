"""Validation of the engine's sections, one function per section; all of it runs before any process starts.

Each message names the key (`section.field`) and the fix. A stage validates its own sections in its
config's `validate` after calling the engine's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .schema import (
    CheckpointConfig,
    ConfigError,
    DeepSpeedSection,
    OptimConfig,
    TrackingConfig,
    TrainConfig,
)

if TYPE_CHECKING:
    from .schema import EngineConfig


def require(ok: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `ok`: the one-line form every section check uses."""
    if not ok:
        raise ConfigError(message)


def check_train(t: TrainConfig, world_size: int) -> None:
    require(
        (t.steps is None) != (t.epochs is None),
        "set exactly one of train.steps and train.epochs (e.g. train.steps=100)",
    )
    require(t.steps is None or t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    require(t.epochs is None or t.epochs > 0, f"train.epochs must be > 0, got {t.epochs}")
    require(
        t.stop_at is None or t.stop_at >= 1, f"train.stop_at must be >= 1 (a global step), got {t.stop_at}"
    )
    require(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    per_step = t.micro_batch_size * world_size
    require(
        t.global_batch_size % per_step == 0 and t.global_batch_size > 0,
        f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
        f"{t.micro_batch_size} × world size {world_size}; set train.global_batch_size to a multiple of "
        f"{per_step} (gradient accumulation = global / (micro × world))",
    )
    require(t.log_every >= 1, "train.log_every must be >= 1")
    for name in ("eval_every", "eval_batches", "visualize_every"):
        require(getattr(t, name) >= 0, f"train.{name} must be >= 0 (0 = off)")
    require(t.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite must be >= 1")


def check_optim(o: OptimConfig, t: TrainConfig) -> None:
    require(o.lr is None or o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    require(
        o.base_lr > 0 and o.base_batch_size >= 1, "optim.base_lr must be > 0 and optim.base_batch_size >= 1"
    )
    require(o.min_lr >= 0, "optim.min_lr must be >= 0")
    require(0 < o.layer_decay <= 1, f"optim.layer_decay must be in (0, 1], got {o.layer_decay}")
    require(
        o.warmup_steps is None or o.warmup_epochs is None,
        "set at most one of optim.warmup_steps and optim.warmup_epochs",
    )
    require(
        t.steps is None or o.warmup_steps is None or o.warmup_steps < t.steps,
        f"optim.warmup_steps={o.warmup_steps} >= train.steps={t.steps}: warmup must end before training does",
    )
    require(o.grad_clip >= 0 and o.weight_decay >= 0, "optim.grad_clip and optim.weight_decay must be >= 0")
    require(all(0 <= b < 1 for b in o.betas), f"optim.betas must be in [0, 1), got {list(o.betas)}")


def check_deepspeed(ds: DeepSpeedSection) -> None:
    require(ds.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds.zero_stage}")
    require(
        not (ds.bf16 and ds.fp16),
        "deepspeed.bf16 and deepspeed.fp16 are both true: pick one (or neither for fp32)",
    )
    require(
        ds.offload_optimizer == "none" or ds.zero_stage >= 1,
        "deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1",
    )


def check_checkpoint(ck: CheckpointConfig) -> None:
    require(ck.keep_last >= 1, "checkpoint.keep_last must be >= 1")
    require(ck.every >= 0, "checkpoint.every must be >= 0 (0 = only at the end and on preemption)")


def check_tracking(tr: TrackingConfig) -> None:
    require(
        not tr.register_as or (tr.enabled and tr.log_model),
        f"tracking.register_as={tr.register_as!r} needs tracking.enabled=true and tracking.log_model=true "
        "(the registered version is the run's logged model)",
    )


def validate_engine(cfg: EngineConfig, world_size: int) -> None:
    check_train(cfg.train, world_size)
    check_optim(cfg.optim, cfg.train)
    check_deepspeed(cfg.deepspeed)
    check_checkpoint(cfg.checkpoint)
    check_tracking(cfg.tracking)
