"""AdamW parameter groups (no weight decay, layer-wise LR decay) and the per-step warmup + cosine schedule.

The model tells us what it knows through three optional hooks, none of them about pixels:
`no_weight_decay() -> set[str]`, `layer_index(name) -> int`, `num_layers_for_lr_decay: int`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from .config import EngineConfig, peak_lr

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "module.")


def clean_param_name(name: str) -> str:
    """Drop wrapper segments (activation checkpointing, compile) so names match the bare model's."""
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Groups keyed by (decay?, layer id): 1-D params, biases and `model.no_weight_decay()` get wd 0;
    with `layer_decay < 1`, `lr_scale = layer_decay ** (num_layers - layer_id)` (VideoMAE / BEiT rule).
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    use_layers = layer_decay < 1.0 and hasattr(model, "layer_index")
    num_layers = int(getattr(model, "num_layers_for_lr_decay", 1))
    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    for raw_name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = clean_param_name(raw_name)
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        layer = model.layer_index(name) if use_layers else num_layers
        key = (no_decay, layer)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers - layer) if use_layers else 1.0,
                "layer_id": layer,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: EngineConfig, device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW (fused on CUDA): passed to DeepSpeed as a client optimizer, so nothing gets compiled."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.layer_decay)
    for g in groups:
        g.pop("names")
    fused = (device.type == "cuda") if o.fused is None else o.fused
    return torch.optim.AdamW(groups, lr=peak_lr(cfg), betas=tuple(o.betas), eps=o.eps, fused=fused or None)


def lr_at(step: int, peak: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 to `peak` over `warmup` steps, then cosine from `peak` to `min_lr` at `total`."""
    if warmup > 0 and step < warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(LRScheduler):
    """`lr_at` per optimizer step, times each group's `lr_scale`; state is just the step count."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, peak: float, warmup: int, total: int, min_lr: float
    ) -> None:
        self.peak, self.warmup, self.total, self.min_lr = peak, warmup, total, min_lr
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        value = lr_at(self.last_epoch, self.peak, self.warmup, self.total, self.min_lr)
        return [value * g.get("lr_scale", 1.0) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        # Only the position: the shape (peak, warmup, total) comes from the *current* config, so a resume
        # may lengthen the run (train.steps) and the cosine stretches accordingly.
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch = int(state["last_epoch"])
        for g, lr in zip(self.optimizer.param_groups, self.get_lr()):
            g["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]
