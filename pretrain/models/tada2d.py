"""TAda2D (Huang et al., ICLR 2022): a 2-D ResNet whose block convolutions are temporally adaptive.

Frames are folded into the batch (``(b t) c h w``) and every layer is a 2-D layer with torchvision ``resnet``
names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``...), except that the 3×3 block
convolutions are :class:`TAdaConv2d` (their shared kernel at ``<name>.conv.weight``, their route at
``<name>.route.*``): both 3×3 convs of a basic block, the 3×3 conv of a bottleneck (the paper's choice for
ResNet-50). As in the paper's TAda2D block, each TAda conv's norm is followed by a temporal feature aggregation:
``bn(y) + agg(avgpool_t(y))`` (average over ``temporal_aggregation`` neighbouring frames, ``agg`` a norm whose
scale and shift start at zero). At initialisation every calibration is 1 and every aggregation 0, so a TAda2D
is exactly its 2-D ResNet applied to each frame; ImageNet 2-D weights load with
``torchvision_io.tada2d_from_resnet_state_dict``. Time is modelled by the calibrations and the aggregations
(no temporal downsampling); the features are the average over time and space.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ._cnn import StagedNet, check_resnet_fields, check_video_input, init_conv_net, norm_layer
from .dynamic_conv import TAdaConv2d

BLOCKS = ("basic", "bottleneck")


@dataclass
class TAda2DConfig:
    """Block type, stage widths/depths, geometry and the route's shape. Defaults: TAda2D-18 at 16×112."""

    block: str = "basic"  # basic (ResNet-18/34) | bottleneck (ResNet-50: 1×1, TAda 3×3, 1×1 ×4)
    widths: tuple[int, ...] = (64, 128, 256, 512)  # stage widths (bottleneck: the 3×3 width; output × 4)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    img_size: int = 112
    num_frames: int = 16
    in_chans: int = 3
    norm: str = "batch"  # batch | group (per-sample statistics)
    norm_groups: int = 32
    zero_init_residual: bool = False  # zero each block's last norm (torchvision's option)
    route_reduction: int = 4  # route hidden width = c_in // route_reduction (at least 4)
    route_kernel: int = 3  # temporal kernel of the route's 1-D convs (odd)
    temporal_aggregation: int = 3  # frames averaged by the aggregation after each TAda conv (odd); 0 = none
    preset: str | None = None  # informational: which TADA2D_PRESETS entry this came from

    def __post_init__(self) -> None:
        check_resnet_fields(self)
        if self.block not in BLOCKS:
            raise ValueError(f"block={self.block!r}: use one of {BLOCKS}")
        if self.route_reduction < 1 or self.route_kernel < 1 or self.route_kernel % 2 == 0:
            raise ValueError(
                f"route_reduction={self.route_reduction} must be >= 1 and route_kernel={self.route_kernel} odd"
            )
        if self.temporal_aggregation < 0 or (
            self.temporal_aggregation and self.temporal_aggregation % 2 == 0
        ):
            raise ValueError(f"temporal_aggregation={self.temporal_aggregation} must be odd, or 0 (none)")

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def feature_dim(self) -> int:
        return self.widths[-1] * self.expansion

    @property
    def num_stages(self) -> int:
        return len(self.widths)

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> TAda2DConfig:
        """A copy of ``TADA2D_PRESETS[name]`` with ``overrides`` applied."""
        if name not in TADA2D_PRESETS:
            raise KeyError(f"unknown TAda2D preset {name!r}; choose from {sorted(TADA2D_PRESETS)}")
        return dataclasses.replace(TADA2D_PRESETS[name], **overrides)


# Parameter counts are asserted in tests/models/test_dynamic_cnn.py.
TADA2D_PRESETS: dict[str, TAda2DConfig] = {
    # CPU size: about R(2+1)D-tiny's parameter count, for 8 frames × 32².
    "tiny": TAda2DConfig(
        widths=(24, 32, 48, 64), depths=(1, 1, 1, 1), img_size=32, num_frames=8, preset="tiny"
    ),
    # ResNet-18 frames at the video ResNets' geometry; ResNet-50 frames at the paper's 8 × 224².
    "18": TAda2DConfig(preset="18"),
    "50": TAda2DConfig(block="bottleneck", depths=(3, 4, 6, 3), img_size=224, num_frames=8, preset="50"),
}


class TAdaBasicBlock(nn.Module):
    """Two TAda 3×3 convs with a residual: ``(x_NCHW, frames) -> y_NCHW``."""

    def __init__(
        self, c_in: int, planes: int, stride: int, norm: partial[nn.Module], cfg: TAda2DConfig
    ) -> None:
        super().__init__()
        route_norm = partial(norm_layer, cfg.norm, dims=1, max_groups=cfg.norm_groups)
        tada = partial(
            TAdaConv2d, norm=route_norm, reduction=cfg.route_reduction, route_kernel=cfg.route_kernel
        )
        self.conv1 = tada(c_in, planes, 3, stride)
        self.bn1 = norm(planes)
        self.agg1 = TemporalAggregation(planes, cfg.temporal_aggregation, norm)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = tada(planes, planes, 3, 1)
        self.bn2 = norm(planes)
        self.agg2 = TemporalAggregation(planes, cfg.temporal_aggregation, norm)
        self.downsample = _downsample(c_in, planes, stride, norm)

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x_NCHW: torch.Tensor, frames: int) -> torch.Tensor:
        residual = x_NCHW if self.downsample is None else self.downsample(x_NCHW)
        y = self.conv1(x_NCHW, frames)
        y = self.relu(self.bn1(y) + self.agg1(y, frames))
        y = self.conv2(y, frames)
        return self.relu(self.bn2(y) + self.agg2(y, frames) + residual)


class TAdaBottleneck(nn.Module):
    """1×1, TAda 3×3 (the stride), 1×1 to ``planes × 4``, residual (torchvision's ResNet v1.5 layout)."""

    def __init__(
        self, c_in: int, planes: int, stride: int, norm: partial[nn.Module], cfg: TAda2DConfig
    ) -> None:
        super().__init__()
        route_norm = partial(norm_layer, cfg.norm, dims=1, max_groups=cfg.norm_groups)
        out = planes * 4
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = TAdaConv2d(planes, planes, 3, stride, route_norm, cfg.route_reduction, cfg.route_kernel)
        self.bn2 = norm(planes)
        self.agg2 = TemporalAggregation(planes, cfg.temporal_aggregation, norm)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = norm(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(c_in, out, stride, norm)

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x_NCHW: torch.Tensor, frames: int) -> torch.Tensor:
        residual = x_NCHW if self.downsample is None else self.downsample(x_NCHW)
        y = self.relu(self.bn1(self.conv1(x_NCHW)))
        y = self.conv2(y, frames)
        y = self.relu(self.bn2(y) + self.agg2(y, frames))
        return self.relu(self.bn3(self.conv3(y)) + residual)


class TemporalAggregation(nn.Module):
    """``(y_NCHW, frames) -> norm(avgpool_t(y))``: each frame's average with its neighbours (zero padding at the
    clip's ends, as ``AvgPool3d``), through a norm whose scale and shift start at 0 (the block starts as 2-D).
    With ``kernel=0`` it is absent (returns 0)."""

    def __init__(self, channels: int, kernel: int, norm: partial[nn.Module]) -> None:
        super().__init__()
        self.kernel = kernel
        self.norm = norm(channels) if kernel else None

    def reset_parameters(self) -> None:
        if self.norm is not None:
            nn.init.zeros_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)

    def forward(self, y_NCHW: torch.Tensor, frames: int) -> torch.Tensor | float:
        if self.norm is None:
            return 0.0
        y_BCTHW = rearrange(y_NCHW, "(b t) c h w -> b c t h w", t=frames)
        pooled = F.avg_pool3d(y_BCTHW, (self.kernel, 1, 1), stride=1, padding=(self.kernel // 2, 0, 0))
        return self.norm(rearrange(pooled, "b c t h w -> (b t) c h w"))


def _downsample(c_in: int, c_out: int, stride: int, norm: partial[nn.Module]) -> nn.Sequential | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm(c_out))


class TAda2D(StagedNet, nn.Module):
    """TAda2D backbone: ``forward_features(video_BCTHW) -> feat_BD`` (average over time and space)."""

    def __init__(self, cfg: TAda2DConfig) -> None:
        super().__init__()
        self.cfg = cfg
        norm = partial(norm_layer, cfg.norm, dims=2, max_groups=cfg.norm_groups)
        w = cfg.widths[0]
        self.conv1 = nn.Conv2d(cfg.in_chans, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        block = TAdaBottleneck if cfg.block == "bottleneck" else TAdaBasicBlock
        c_in = w
        for i, (planes, depth) in enumerate(zip(cfg.widths, cfg.depths)):
            stride = 1 if i == 0 else 2
            blocks = [block(c_in, planes, stride, norm, cfg)]
            c_in = planes * cfg.expansion
            blocks += [block(c_in, planes, 1, norm, cfg) for _ in range(depth - 1)]
            self.add_module(f"layer{i + 1}", nn.ModuleList(blocks))
        init_conv_net(self)  # Conv2d (the TAda kernels included) and 2-D norms; the routes keep their init
        for m in self.modules():
            if isinstance(m, TemporalAggregation):
                m.reset_parameters()
        if cfg.zero_init_residual:
            for m in self.modules():
                if isinstance(m, (TAdaBasicBlock, TAdaBottleneck)):
                    nn.init.zeros_(m.last_norm().weight)

    @property
    def feature_dim(self) -> int:
        return self.cfg.feature_dim

    # -- engine hooks (names relative to this module) ----------------------------------------------
    def stage_prefixes(self) -> list[tuple[str, ...]]:
        """Parameter-name prefixes of each stage, input to output: stem (conv1, bn1), layer1..S."""
        return [("conv1.", "bn1.")] + [(f"layer{i + 1}.",) for i in range(self.cfg.num_stages)]

    # -- forward ------------------------------------------------------------------------------------
    def forward_maps(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map ``[B, D, T, H', W']`` (time is never downsampled)."""
        check_video_input(video_BCTHW, self.cfg)
        frames = video_BCTHW.shape[2]
        x = self.maxpool(self.relu(self.bn1(self.conv1(rearrange(video_BCTHW, "b c t h w -> (b t) c h w")))))
        for i in range(self.cfg.num_stages):
            for block in getattr(self, f"layer{i + 1}"):
                x = block(x, frames)
        return rearrange(x, "(b t) d h w -> b d t h w", t=frames)

    def forward_features(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.forward_maps(video_BCTHW).mean(dim=(2, 3, 4))

    def forward_temporal_features(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """Space-pooled features per frame ``[B, T, D]``."""
        return rearrange(self.forward_maps(video_BCTHW).mean(dim=(3, 4)), "b d t -> b t d")

    def forward(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.forward_features(video_BCTHW)
