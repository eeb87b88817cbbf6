"""Video ResNets: R3D, MC3 and R(2+1)D (Tran et al., "A Closer Look at Spatiotemporal Convolutions", 2018).

Module names follow ``torchvision.models.video.resnet`` (``stem.0``, ``layer1.0.conv1.0.0`` / ``.0.1`` / ``.0.3``
for the factorised (2+1)D conv and its mid-channel norm, ``layer2.0.downsample.0``...), so a torchvision
``r3d_18`` / ``mc3_18`` / ``r2plus1d_18`` state dict without ``fc`` loads into :class:`VideoResNet` by name
(``torchvision_io.py`` maps ``fc`` to the classifier's ``head``). The backbone ends at the global average
pool: ``forward_features(video_BCTHW) -> feat_BD``; the head lives in ``BackboneClassifier``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from einops import rearrange
from torch import nn

from ._cnn import StagedNet, check_resnet_fields, check_video_input, init_conv_net, norm_layer
from .dynamic_conv import DYNAMIC_KINDS, KernelMixtureConv3d, SelectiveKernelConv3d

VIDEO_RESNET_ARCHS = ("r3d", "mc3", "r2plus1d")


@dataclass
class VideoResNetConfig:
    """Architecture and input geometry of a video ResNet. Defaults are torchvision's R(2+1)D-18 at 16×112."""

    arch: str = (
        "r2plus1d"  # r3d: full 3×3×3 convs | mc3: 3-D in stage 1, 1×3×3 after | r2plus1d: 1×3×3 then 3×1×1
    )
    widths: tuple[int, ...] = (64, 128, 256, 512)  # stage widths; the stem outputs widths[0]
    depths: tuple[int, ...] = (2, 2, 2, 2)  # basic blocks per stage
    stem_mid_channels: int = 45  # R(2+1)D stem's mid width (torchvision hard-codes 45)
    img_size: int = 112
    num_frames: int = 16
    in_chans: int = 3
    norm: str = "batch"  # batch (torchvision) | group (per-sample statistics: no running stats to sync)
    norm_groups: int = 32  # with norm=group: the largest divisor of each width not above this
    zero_init_residual: bool = False  # zero the last norm of every block (each block starts as identity)
    # Dynamic block convolutions (dynamic_conv.py); the stem and the 1×1×1 downsamples stay static.
    # kernel_mixture: every block conv mixes dynamic_kernels kernels per clip (softmax(MLP(GAP) / temperature));
    # selective_kernel: every block conv with a temporal extent (3) becomes branches of temporal sizes
    # sk_kernels fused by a per-channel softmax attention (MC3: stage 1 only; its later stages are 1×3×3).
    dynamic: str = "none"  # none | kernel_mixture | selective_kernel
    dynamic_kernels: int = 4
    dynamic_temperature: float = 1.0
    dynamic_reduction: int = 4  # hidden width of the attention MLPs: channels // reduction
    sk_kernels: tuple[int, ...] = (3, 5)
    preset: str | None = None  # informational: which VIDEO_RESNET_PRESETS entry this came from

    def __post_init__(self) -> None:
        if self.arch not in VIDEO_RESNET_ARCHS:
            raise ValueError(f"arch={self.arch!r}: use one of {VIDEO_RESNET_ARCHS}")
        check_resnet_fields(self)
        if self.stem_mid_channels < 1:
            raise ValueError(f"stem_mid_channels={self.stem_mid_channels} must be >= 1")
        if self.dynamic not in DYNAMIC_KINDS:
            raise ValueError(f"dynamic={self.dynamic!r}: use one of {DYNAMIC_KINDS}")
        if self.dynamic_kernels < 1 or self.dynamic_reduction < 1 or self.dynamic_temperature <= 0:
            raise ValueError(
                f"dynamic_kernels={self.dynamic_kernels} and dynamic_reduction={self.dynamic_reduction} must be "
                f">= 1, dynamic_temperature={self.dynamic_temperature} > 0"
            )
        if not self.sk_kernels or any(k < 1 or k % 2 == 0 for k in self.sk_kernels):
            raise ValueError(f"sk_kernels={self.sk_kernels} must be odd temporal sizes (e.g. (3, 5))")

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    @property
    def num_stages(self) -> int:
        return len(self.widths)

    def conv_kind(self, stage: int) -> str:
        """Residual-block conv of stage ``stage`` (0-based): ``3d``, ``2d`` (1×3×3, no temporal) or ``2plus1d``."""
        if self.arch == "r2plus1d":
            return "2plus1d"
        return "3d" if self.arch == "r3d" or stage == 0 else "2d"

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> VideoResNetConfig:
        """A copy of ``VIDEO_RESNET_PRESETS[name]`` with ``overrides`` applied (e.g. ``num_frames=8``)."""
        if name not in VIDEO_RESNET_PRESETS:
            raise KeyError(
                f"unknown video ResNet preset {name!r}; choose from {sorted(VIDEO_RESNET_PRESETS)}"
            )
        return dataclasses.replace(VIDEO_RESNET_PRESETS[name], **overrides)


def _presets() -> dict[str, VideoResNetConfig]:
    out: dict[str, VideoResNetConfig] = {}
    for arch in VIDEO_RESNET_ARCHS:
        # torchvision's 18-layer nets at their Kinetics-400 geometry (16 frames × 112²).
        out[f"{arch}-18"] = VideoResNetConfig(arch=arch, preset=f"{arch}-18")
        # CPU size: about the tiny ViT's parameter count, for 8 frames × 32².
        out[f"{arch}-tiny"] = VideoResNetConfig(
            arch=arch,
            widths=(16, 24, 32, 48),
            depths=(1, 1, 1, 1),
            stem_mid_channels=12,
            img_size=32,
            num_frames=8,
            preset=f"{arch}-tiny",
        )
    return out


# Parameter counts are asserted in tests/models/test_video_cnn.py (the -18 ones against torchvision's).
VIDEO_RESNET_PRESETS: dict[str, VideoResNetConfig] = _presets()


def block_mid_channels(c_in: int, planes: int) -> int:
    """(2+1)D mid width that matches a full 3×3×3 conv's parameters (torchvision's formula, floor division).

    torchvision computes it once per block from (in, out) and uses it for both convs of the block.
    """
    return (c_in * planes * 27) // (c_in * 9 + 3 * planes)


ConvFactory = Callable[
    [int, int, tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]], nn.Module
]


def block_conv_factory(cfg: VideoResNetConfig) -> ConvFactory:
    """``(c_in, c_out, kernel, stride, padding) -> module`` for the blocks' convs: a plain Conv3d, or the
    dynamic layer ``cfg.dynamic`` names (selective kernel only where the kernel has a temporal extent)."""

    def make(c_in: int, c_out: int, k: tuple, s: tuple, p: tuple) -> nn.Module:
        if cfg.dynamic == "kernel_mixture":
            return KernelMixtureConv3d(
                c_in, c_out, k, s, p, cfg.dynamic_kernels, cfg.dynamic_temperature, cfg.dynamic_reduction
            )
        if cfg.dynamic == "selective_kernel" and k[0] > 1:
            return SelectiveKernelConv3d(c_in, c_out, k, s, p, cfg.sk_kernels, cfg.dynamic_reduction)
        return nn.Conv3d(c_in, c_out, k, stride=s, padding=p, bias=False)

    return make


def spatiotemporal_conv(
    kind: str,
    c_in: int,
    c_out: int,
    mid: int,
    stride: int,
    norm: partial[nn.Module],
    conv: ConvFactory | None = None,
) -> nn.Module:
    """A block's 3×3×3-like conv: a Conv3d, or (2+1)D as Sequential(1×3×3, norm, ReLU, 3×1×1).

    ``conv`` builds each convolution (default: a plain Conv3d; see :func:`block_conv_factory`)."""
    conv = conv or (lambda a, b, k, s, p: nn.Conv3d(a, b, k, stride=s, padding=p, bias=False))
    if kind == "3d":
        return conv(c_in, c_out, (3, 3, 3), (stride,) * 3, (1, 1, 1))
    if kind == "2d":
        return conv(c_in, c_out, (1, 3, 3), (1, stride, stride), (0, 1, 1))
    return nn.Sequential(
        conv(c_in, mid, (1, 3, 3), (1, stride, stride), (0, 1, 1)),
        norm(mid),
        nn.ReLU(inplace=True),
        conv(mid, c_out, (3, 1, 1), (stride, 1, 1), (1, 0, 0)),
    )


class BasicBlock3d(nn.Module):
    """Two spatiotemporal convs with a residual; ``downsample`` (1×1×1 conv + norm) when the shape changes."""

    def __init__(
        self,
        c_in: int,
        planes: int,
        kind: str,
        stride: int,
        norm: partial[nn.Module],
        conv: ConvFactory | None = None,
    ) -> None:
        super().__init__()
        mid = block_mid_channels(c_in, planes)
        self.conv1 = nn.Sequential(
            spatiotemporal_conv(kind, c_in, planes, mid, stride, norm, conv),
            norm(planes),
            nn.ReLU(inplace=True),
        )
        self.conv2 = nn.Sequential(
            spatiotemporal_conv(kind, planes, planes, mid, 1, norm, conv), norm(planes)
        )
        self.downsample: nn.Sequential | None = None
        if stride != 1 or c_in != planes:
            ds_stride = (1, stride, stride) if kind == "2d" else (stride, stride, stride)
            self.downsample = nn.Sequential(
                nn.Conv3d(c_in, planes, 1, stride=ds_stride, bias=False), norm(planes)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        residual = x_BCTHW if self.downsample is None else self.downsample(x_BCTHW)
        return self.relu(self.conv2(self.conv1(x_BCTHW)) + residual)


def make_stem(cfg: VideoResNetConfig, norm: partial[nn.Module]) -> nn.Sequential:
    """3×7×7 conv (R3D, MC3) or 1×7×7 + 3×1×1 (R(2+1)D); spatial stride 2, no pooling (torchvision)."""
    w = cfg.widths[0]
    if cfg.arch == "r2plus1d":
        mid = cfg.stem_mid_channels
        return nn.Sequential(
            nn.Conv3d(cfg.in_chans, mid, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            norm(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, w, (3, 1, 1), stride=1, padding=(1, 0, 0), bias=False),
            norm(w),
            nn.ReLU(inplace=True),
        )
    return nn.Sequential(
        nn.Conv3d(cfg.in_chans, w, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
        norm(w),
        nn.ReLU(inplace=True),
    )


class VideoResNet(StagedNet, nn.Module):
    """Video ResNet backbone: ``forward_features(video_BCTHW) -> feat_BD`` (global average pool of the last stage)."""

    def __init__(self, cfg: VideoResNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        norm = partial(norm_layer, cfg.norm, dims=3, max_groups=cfg.norm_groups)
        self.stem = make_stem(cfg, norm)
        c_in, conv = cfg.widths[0], block_conv_factory(cfg)
        for i, (planes, depth) in enumerate(zip(cfg.widths, cfg.depths)):
            kind, stride = cfg.conv_kind(i), 1 if i == 0 else 2
            blocks = [BasicBlock3d(c_in, planes, kind, stride, norm, conv)]
            blocks += [BasicBlock3d(planes, planes, kind, 1, norm, conv) for _ in range(depth - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = planes
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        init_conv_net(self)
        if cfg.zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock3d):
                    nn.init.zeros_(m.conv2[1].weight)

    @property
    def feature_dim(self) -> int:
        return self.cfg.feature_dim

    def stages(self) -> list[nn.Module]:
        return [self.stem] + [getattr(self, f"layer{i + 1}") for i in range(self.cfg.num_stages)]

    # -- engine hooks (names relative to this module) ----------------------------------------------
    def stage_prefixes(self) -> list[tuple[str, ...]]:
        """Parameter-name prefixes of each stage, input to output: stem, layer1, ..."""
        return [("stem.",)] + [(f"layer{i + 1}.",) for i in range(self.cfg.num_stages)]

    # -- forward ------------------------------------------------------------------------------------
    def forward_maps(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map ``[B, D, T', H', W']``."""
        check_video_input(video_BCTHW, self.cfg)
        x = video_BCTHW
        for stage in self.stages():
            x = stage(x)
        return x

    def forward_features(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        return rearrange(self.avgpool(self.forward_maps(video_BCTHW)), "b d 1 1 1 -> b d")

    def forward_temporal_features(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """Space-pooled features per time step of the last stage ``[B, T', D]``."""
        return rearrange(self.forward_maps(video_BCTHW).mean(dim=(3, 4)), "b d t -> b t d")

    def forward(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.forward_features(video_BCTHW)
