"""AdamW parameter groups (no weight decay, layer-wise LR decay), a step the trainer can veto, and the
per-step warmup + cosine learning rate (a pure function of the step: nothing to checkpoint).

The model tells us what it knows through three optional hooks, none of them about pixels:
`no_weight_decay() -> set[str]`, `layer_index(name) -> int`, `num_layers_for_lr_decay: int`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .config import EngineConfig, peak_lr

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "module.")


def clean_param_name(name: str) -> str:
    """Drop wrapper segments (activation checkpointing, compile) so names match the bare model's."""
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Groups keyed by (decay?, layer id): 1-D params, biases and `model.no_weight_decay()` get wd 0;
    with `layer_decay < 1`, `lr_scale = layer_decay ** (num_layers - 1 - layer_id)`: the VideoMAE / BEiT rule,
    layer ids 0 (embeddings) .. num_layers - 1 (head and final norm, at the full learning rate).
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
                "lr_scale": layer_decay ** (num_layers - 1 - layer) if use_layers else 1.0,
                "layer_id": layer,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


class VetoableAdamW(torch.optim.AdamW):
    """AdamW whose update the trainer can veto for one optimizer step (some rank saw a non-finite loss).

    DeepSpeed's ZeRO optimizers call this `step` on their fp32 partitions (per sub-group under ZeRO-3), then
    copy the partitions back to the model: a vetoed step leaves weights and Adam moments exactly as they
    were, at every ZeRO stage, and DeepSpeed still clears the gradients.
    """

    vetoed = False

    def step(self, closure: Any = None) -> Any:
        return None if self.vetoed else super().step(closure)

    @contextmanager
    def veto(self, skip: bool) -> Iterator[None]:
        self.vetoed = skip
        try:
            yield
        finally:
            self.vetoed = False


def build_optimizer(model: nn.Module, cfg: EngineConfig, device: torch.device) -> VetoableAdamW:
    """torch AdamW (fused on CUDA): passed to DeepSpeed as a client optimizer, so nothing gets compiled."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.layer_decay)
    for g in groups:
        g.pop("names")
    fused = (device.type == "cuda") if o.fused is None else o.fused
    return VetoableAdamW(groups, lr=peak_lr(cfg), betas=tuple(o.betas), eps=o.eps, fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """`lr` times each group's `lr_scale` (layer-wise decay) into every parameter group."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def lr_at(step: int, peak: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 to `peak` over `warmup` steps, then cosine from `peak` to `min_lr` at `total`.
    A floor above the peak (a searched or hand-set lr below the config's min_lr) holds the lr at the peak:
    the schedule never climbs past it (it went up to min_lr, 600x the peak in one run)."""
    min_lr = min(min_lr, peak)
    if warmup > 0 and step < warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))
