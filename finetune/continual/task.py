"""One experience of continual learning as an engine task: the fine-tuning task plus what the strategy adds.

- the head covers the classes seen so far, in the order they arrived (class-incremental: it grows, the old
  rows copied from the previous experience's model), every class (domain-incremental), or only this
  experience's classes (`peft_per_experience`, task-incremental);
- the training data: this experience's classes (or every seen one for `joint`), plus a replay batch from the
  memory in every micro-batch (`replay`, `replay_lwf`);
- the loss: cross-entropy, plus the EWC/MAS penalty (gradient injected per module, ZeRO-3-safe: see
  regularize.py) or LwF distillation from the previous experience's model on the old classes' logits.
Training itself is the engine's: this is an ordinary `Task`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_shards.format import load_manifest
from data_shards.loader import VideoLoader, build_loader
from finetune.config import classifier_config
from finetune.continual.config import ContinualConfig, Experience
from finetune.continual.memory import ReplayLoader, ReplayMemory
from finetune.continual.regularize import (
    IMPORTANCE_FILE,
    QuadraticPenalty,
    distillation_loss,
    load_importance,
)
from finetune.task import ClassificationTask
from pretrain.data import make_loader
from pretrain.engine import Loader, StepOutput, TaskContext
from pretrain.sources import Source


def head_classes(cfg: ContinualConfig, plan: list[Experience], k: int) -> list[int]:
    """Global class ids of experience k's head, in head order."""
    if cfg.continual.rules.per_experience or cfg.continual.domains:
        return list(plan[k].classes)
    return [c for e in plan[: k + 1] for c in e.classes]


def training_classes(cfg: ContinualConfig, plan: list[Experience], k: int) -> list[int]:
    """Classes whose videos experience k trains on (`joint`: every class seen so far)."""
    if cfg.continual.rules.joint and not cfg.continual.domains:
        return [c for e in plan[: k + 1] for c in e.classes]
    return list(plan[k].classes)


class ContinualTask(ClassificationTask):
    """Experience `k` of `plan` under `cfg.continual.strategy`; `previous` = experience k−1's run directory."""

    def __init__(
        self,
        cfg: ContinualConfig,
        plan: list[Experience],
        k: int,
        memory: ReplayMemory,
        previous: Path | None,
    ) -> None:
        self.plan, self.k, self.memory, self.previous = plan, k, memory, previous
        self.rules = cfg.continual.rules
        names = load_manifest(plan[k].shards).classes or []
        self.classes = head_classes(cfg, plan, k)  # global class ids, in head order
        base = classifier_config(cfg)
        clf_cfg = dataclasses.replace(
            base, num_classes=len(self.classes), class_names=[names[c] for c in self.classes]
        )
        super().__init__(cfg, clf_cfg)
        self.cfg: ContinualConfig = cfg
        self.label_map = torch.full((len(names),), -1, dtype=torch.int64)
        self.label_map[self.classes] = torch.arange(len(self.classes))
        self.penalty: QuadraticPenalty | None = None
        self.teacher: nn.Module | None = None

    # -- model --------------------------------------------------------------------------------------
    def setup(self, ctx: TaskContext) -> None:
        super().setup(ctx)
        self.label_map = self.label_map.to(ctx.device)
        if self.rules.distills and self.previous is not None:
            from finetune.model_dir import load_finetuned

            self.teacher = load_finetuned(self.previous / "model", map_location=str(ctx.device))

    def build_model(self) -> nn.Module:
        """The classifier; with EWC/MAS after the first experience, the penalty's hooks (once: the training
        model, built before DeepSpeed wraps it)."""
        model = super().build_model()
        if self.rules.estimates_importance and self.previous is not None and self.penalty is None:
            importance, anchor = load_importance(self.previous / IMPORTANCE_FILE)
            c = self.cfg.continual
            lam = c.ewc_lambda if self.rules.penalty == "ewc" else c.mas_lambda
            t = self.cfg.train
            accum = t.global_batch_size // (t.micro_batch_size * self.ctx.world_size)
            self.penalty = QuadraticPenalty(importance, anchor, lam, grad_scale=1.0 / accum)
            self.penalty.attach(model)
        return model

    def load_init(self, model: nn.Module, src: Source) -> dict[str, Any]:
        """The previous experience's model; a grown head keeps the old classes' rows (they come first)."""
        report = super().load_init(model, src)
        old_w, old_b = src.state_dict.get("head.weight"), src.state_dict.get("head.bias")
        grown = old_w is not None and old_w.shape[0] < model.head.weight.shape[0]
        if grown and not self.rules.per_experience:
            n = model.keep_head_rows(old_w, old_b)
            report["head_reinitialised"] = [
                f"head grown {n} → {model.head.weight.shape[0]} classes (old rows kept)"
            ]
        return report

    def head_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return self.label_map.to(labels.device)[labels]

    # -- data ---------------------------------------------------------------------------------------
    def train_loader(self, ctx: TaskContext, epoch: int) -> Loader:
        d, micro = self.cfg.data, self.cfg.train.micro_batch_size
        labels = training_classes(self.cfg, self.plan, self.k)
        select = {} if self.cfg.continual.domains else {"labels": labels}
        if not self.rules.replays or not self.memory.items:
            return make_loader(d, d.train_split, self.sampling_spec(True), ctx, micro, epoch=epoch, **select)
        r = self.cfg.continual.replay_batch_size or micro // 2
        current = make_loader(
            d, d.train_split, self.sampling_spec(True), ctx, micro - r, epoch=epoch, **select
        )
        return ReplayLoader(current, self.memory_loader(ctx, r))

    def memory_loader(self, ctx: TaskContext, batch_size: int) -> VideoLoader:
        """The memory's videos as an ordinary shard loader (its own seed: an independent order)."""
        d = self.cfg.data
        folders = sorted({it.shards for it in self.memory.items})
        return build_loader(
            folders if len(folders) > 1 else folders[0],
            d.train_split,
            batch_size=batch_size,
            spec=self.sampling_spec(True),
            backend=d.backend,
            rank=ctx.rank,
            world_size=ctx.world_size,
            seed=ctx.seed + 7919,
            device=ctx.device,
            num_workers=d.num_workers,
            drop_last=True,
            max_skip_fraction=d.max_skip_fraction,
            keys=[it.ref for it in self.memory.items],
        )

    def val_loader(self, ctx: TaskContext) -> VideoLoader | None:
        d = self.cfg.data
        if not d.val_split or d.val_split not in load_manifest(self.plan[self.k].shards).splits:
            return None
        select = {} if self.cfg.continual.domains else {"labels": self.classes}
        return make_loader(
            d, d.val_split, self.sampling_spec(False), ctx, self.cfg.train.micro_batch_size, **select
        )

    # -- loss ---------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        """Cross-entropy + the strategy's term: `penalty` (EWC/MAS, its gradient injected by the hooks) or
        `distill` (LwF). Both are logged; the penalty's value is added to the reported loss."""
        logits, targets, labels, video, lam = self.forward(model, batch)
        ce = self.head.loss(logits, targets)
        nan = logits.new_tensor(float("nan"))
        metrics: dict[str, Any] = {"ce": ce.detach(), "penalty": nan, "distill": nan}
        loss = ce
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(video.float())
            distill = distillation_loss(logits, teacher_logits, self.cfg.continual.lwf_temperature)
            loss = loss + self.cfg.continual.lwf_alpha * distill
            metrics["distill"] = distill.detach()
        if self.penalty is not None:
            value = torch.as_tensor(self.penalty.take(), device=logits.device, dtype=torch.float32)
            loss = loss + value.detach()  # the gradient arrived through the hooks
            metrics["penalty"] = value.detach()
        acc = self.head.accuracy(logits, labels) if lam == 1.0 else nan
        return StepOutput(loss, {**metrics, "acc": acc.detach()})

    def registered_dir(self, model_dir: Path) -> Path:
        """The experience's final model: the one the next experience starts from and evaluation reads."""
        return model_dir

    def model_extra(self) -> dict[str, Any]:
        extra = super().model_extra()
        extra["continual"] = {"strategy": self.rules.name, "experience": self.k, "classes": self.classes}
        return extra
