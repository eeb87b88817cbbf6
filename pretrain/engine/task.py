"""The seam between the engine and a stage: `Task`. The engine never looks inside a batch or a model output.

A task owns the model architecture, its initial weights, its data (the loaders), the loss, evaluation, and
anything task-random (e.g. the mask generator, checkpointed through `state_dict`). Pretraining:
`pretrain.task.MaskedVideoTask`; fine-tuning: `finetune.task.ClassificationTask`. Every hook below has a
default, so the engine calls them unconditionally; a task overrides what it needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from .tracking import Tracker

Batch = dict[str, Any]


@dataclass
class StepOutput:
    """`loss` is back-propagated. `metrics` are scalar tensors (or floats) averaged over micro-batches and
    ranks and logged as `train/<name>`; return the same keys on every call (NaN = not measured this time)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


@dataclass
class EvalOutcome:
    """What `Task.after_evaluate` returns to the engine.

    `stop`: end training now (early stopping); the run finishes normally (final checkpoint, export).
    `metrics`: extra values to log at this step (e.g. the best val score so far).
    `artifacts`: files or directories rank 0 logs to the tracker (e.g. the best model directory).
    """

    stop: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class TaskContext:
    """Handed to `Task.setup` once the process group exists (and to the loader hooks)."""

    rank: int
    world_size: int
    device: torch.device
    seed: int
    run_dir: Path

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Loader(Protocol):
    """What the engine needs of a loader: each iteration yields one whole epoch of micro-batches, except the
    first iteration after `load_state_dict`, which yields the rest of the saved epoch.

    `state_dict()` is taken at a step boundary (every rank has taken the same number of micro-batches) and
    must say where the epoch stands *globally*, not per rank: on a resume with another number of ranks, every
    rank is handed rank 0's state and must take its share of the rest of the epoch (the shard loaders keep
    the global sample position in the epoch's order: no sample repeated or skipped). On the same ranks, each
    rank gets its own state back."""

    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...  # micro-batches per (whole) epoch on this rank
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Task:
    """Base class: override `build_model`, `train_loader`, `loss` and `export`; the rest are optional."""

    ctx: TaskContext

    def setup(self, ctx: TaskContext) -> None:
        """Called once the process group exists, before `build_model`: seed task-side generators."""
        self.ctx = ctx

    def build_model(self) -> nn.Module:
        """The bare module: architecture (+ anything applied from outside, e.g. PEFT, activation
        checkpointing), freshly initialised. No weights are read here (see `init_weights`).

        Optional hooks on the module, used for optimizer groups: `no_weight_decay()`, `layer_index(name)`,
        `num_layers_for_lr_decay`."""
        raise NotImplementedError

    def init_weights(self, model: nn.Module) -> None:
        """Load starting weights (e.g. a pretrained encoder) into a fresh `build_model()`. Not called on
        resume or export, where the checkpoint supplies every weight."""

    def train_loader(self, ctx: TaskContext, epoch: int) -> Loader:
        """This rank's training loader, positioned at the start of `epoch` (the engine then only calls
        `set_epoch`, `state_dict` and `load_state_dict` on it)."""
        raise NotImplementedError

    def val_loader(self, ctx: TaskContext) -> Loader | None:
        """This rank's evaluation loader, or None: no evaluation."""
        return None

    def loss(self, model: nn.Module, batch: Batch) -> StepOutput:
        """Forward one micro-batch through `model` (the DeepSpeed engine) and return the loss."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        """Metrics over this rank's share of the val split (the engine averages them over ranks)."""
        return {}

    def after_evaluate(self, model: nn.Module, metrics: dict[str, float], step: int) -> EvalOutcome:
        """Collective, after every evaluation, with the rank-averaged metrics: keep a best model, decide
        early stopping."""
        return EvalOutcome()

    def visualize(self, model: nn.Module, batch: Batch, out_dir: Path | None) -> list[Path]:
        """Collective (ZeRO-3 forwards); files written only where `out_dir` is given (rank 0)."""
        return []

    def flops_per_sample(self) -> float:
        """Analytic training FLOPs (forward + backward) per sample, for MFU; NaN when unknown."""
        return math.nan

    def tokens_per_sample(self) -> float:
        return math.nan

    def tracking_params(self) -> dict[str, Any]:
        """Extra run parameters logged at the start (e.g. trainable parameter counts of a PEFT method)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Per-rank task state that must survive a resume (e.g. the mask generator)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned: this rank's, or rank 0's when the world size changed since the
        checkpoint (then `reseed` follows)."""

    def reseed(self, step: int) -> None:
        """After a resume on another number of ranks: per-rank random streams (e.g. the mask generator) cannot
        continue, the ranks that held them are gone; start fresh ones from (seed, `ctx.rank`, `step`), so
        ranks differ from each other and from the streams the run started with."""

    def export(self, model: nn.Module, out_dir: Path, extra: dict[str, Any]) -> Path:
        """Write the deployable model directory from a module holding consolidated fp32 weights."""
        raise NotImplementedError

    def log_model(self, model_dir: Path, tracker: Tracker) -> None:
        """Rank 0, at the end of a completed run: record the exported model directory with the tracker. The
        default logs it as plain files (artifact `model`); a task that can describe its model to MLflow
        (a flavor, a signature) overrides this and honours `tracking.register_as`."""
        tracker.log_artifact(model_dir, "model")
