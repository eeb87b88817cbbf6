"""What a task supplies to the engine. The engine never looks inside a batch or a model output.

A task owns the model architecture, the loss, evaluation, and anything task-random (e.g. the mask
generator, whose state it checkpoints through `state_dict`). Pretraining: `pretrain.task.MaskedVideoTask`;
fine-tuning: `finetune.task.ClassificationTask` on the same `engine.run`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class StepOutput:
    """`loss` is what gets back-propagated; `metrics` (floats) are averaged over ranks and logged."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalOutcome:
    """What the optional `Task.after_evaluate(model, metrics, step)` hook returns to the engine.

    `stop`: end training now (early stopping); the run finishes normally (final checkpoint, export).
    `metrics`: extra values to log at this step (e.g. the best val score so far).
    `artifacts`: files or directories rank 0 logs to the tracker (e.g. the best model directory).
    """

    stop: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class TaskContext:
    """Handed to `Task.setup` once the process group exists."""

    rank: int
    world_size: int
    device: torch.device
    seed: int
    run_dir: Path


@runtime_checkable
class Task(Protocol):
    def setup(self, ctx: TaskContext) -> None:
        """Seed task-side generators from (seed, rank); called before `build_model`."""

    def build_model(self) -> nn.Module:
        """The bare module (architecture + anything applied from outside, e.g. activation checkpointing).

        Optional hooks the engine uses for optimizer groups: `no_weight_decay()`, `layer_index(name)`,
        `num_layers_for_lr_decay`.
        """

    def sampling_spec(self, split: str, train: bool) -> Any:
        """The loader's `SamplingSpec` for a split (frames, size, augmentation): the task knows the shapes."""

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        """Forward one micro-batch through `model` (the DeepSpeed engine) and return the loss."""

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Metrics over this rank's share of the val split; returned as sums or means *per rank*
        (the engine averages them over ranks, weighted by `count` when the task returns one)."""

    def visualize(self, model: nn.Module, batch: dict[str, Any], out_dir: Path | None) -> list[Path]:
        """Collective (every rank runs the forward, ZeRO-3 needs it); files written only when `out_dir`."""

    def flops_per_sample(self) -> float:
        """Analytic training FLOPs (forward + backward) per sample, for MFU."""

    def state_dict(self) -> dict[str, Any]:
        """Per-rank task state that must survive a resume (e.g. the mask generator)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def export(self, model: nn.Module, out_dir: Path, extra: dict[str, Any]) -> Path:
        """Write the deployable model directory from a module holding consolidated fp32 weights."""

    # Optional hooks (looked up with getattr, so existing tasks need not define them):
    #   after_evaluate(model, metrics, step) -> EvalOutcome   collective, after every evaluation; metrics
    #       are the rank-averaged ones just logged. Keeps a best model, decides early stopping.
    #   tracking_params() -> dict[str, Any]                    extra run parameters to log at the start
    #       (e.g. trainable parameter counts of a PEFT method).
