"""Pieces the CNN backbones share: the norm-layer choice, torchvision's init, stage bookkeeping, checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

NORMS = ("batch", "group")


def group_count(channels: int, max_groups: int) -> int:
    """Largest divisor of ``channels`` not above ``max_groups``.

    R(2+1)D's factorised mid widths (45, 144, 230, ...) are rarely multiples of 32, so a fixed group count
    would not divide them; this keeps groups as close to ``max_groups`` as the width allows.
    """
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def norm_layer(kind: str, channels: int, dims: int, max_groups: int = 32) -> nn.Module:
    """BatchNorm{1,2,3}d (torchvision's choice) or GroupNorm (rank-independent statistics, no running stats)."""
    if kind == "batch":
        return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](channels)
    if kind == "group":
        return nn.GroupNorm(group_count(channels, max_groups), channels)
    raise ValueError(f"norm={kind!r}: use one of {NORMS}")


def init_conv_net(module: nn.Module) -> None:
    """torchvision's ResNet init: He-normal (fan_out) convs, unit norms with zero bias."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def stage_layer_index(name: str, stages: Sequence[tuple[str, ...]]) -> int:
    """Index of the first stage whose prefixes ``name`` starts with; ``len(stages)`` for anything else."""
    for i, prefixes in enumerate(stages):
        if name.startswith(prefixes):
            return i
    return len(stages)


class StagedNet:
    """The engine's optimizer hooks of a network cut into stages (``stage_prefixes()``, input to output, names
    relative to the module): one layer id per stage for layer-wise LR decay, one more for whatever follows
    (a head), and no weight-decay exemption beyond the engine's rule for 1-D parameters (norms, biases)."""

    def stage_prefixes(self) -> list[tuple[str, ...]]:
        raise NotImplementedError

    @property
    def num_layers_for_lr_decay(self) -> int:
        return len(self.stage_prefixes()) + 1

    def layer_index(self, param_name: str) -> int:
        return stage_layer_index(param_name, self.stage_prefixes())

    def no_weight_decay(self) -> set[str]:
        return set()


def check_resnet_fields(cfg: Any) -> None:
    """Validation shared by the CNN configs (widths/depths/norm/geometry)."""
    widths, depths = tuple(cfg.widths), tuple(cfg.depths)
    if not widths or len(widths) != len(depths):
        raise ValueError(f"widths {widths} and depths {depths} must be non-empty and of equal length")
    if min(widths) < 1 or min(depths) < 1:
        raise ValueError(f"widths {widths} and depths {depths} must be positive")
    if cfg.norm not in NORMS:
        raise ValueError(f"norm={cfg.norm!r}: use one of {NORMS}")
    if cfg.norm_groups < 1:
        raise ValueError(f"norm_groups={cfg.norm_groups} must be >= 1")
    if cfg.img_size < 1 or cfg.num_frames < 1 or cfg.in_chans < 1:
        raise ValueError(
            f"img_size={cfg.img_size}, num_frames={cfg.num_frames}, in_chans={cfg.in_chans} must be >= 1"
        )


def check_video_input(x_BCTHW: torch.Tensor, cfg: Any) -> None:
    """The loaders produce exactly the configured geometry; anything else is a wiring error, said loudly."""
    want = (cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size)
    if x_BCTHW.ndim != 5 or tuple(x_BCTHW.shape[1:]) != want:
        raise ValueError(
            f"expected video [B, C, T, H, W] with (C, T, H, W) = {want}, got {tuple(x_BCTHW.shape)}"
        )
