"""CNN+RNN video backbone: a 2-D ResNet on every frame, a linear projection, then a GRU or LSTM over time.

The per-frame CNN (``.cnn``) uses torchvision ``resnet18`` names (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``...), so ImageNet ResNet weights without ``fc`` load into it by name. Time is folded
into the batch for the CNN (``(b t) c h w``). The projection is an ``nn.Linear`` (``.proj``) so LoRA can
target it from outside; ``.rnn`` is a plain ``nn.GRU`` / ``nn.LSTM``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
from einops import rearrange
from torch import nn

from ._cnn import StagedNet, check_resnet_fields, check_video_input, init_conv_net, norm_layer

RNN_KINDS = ("gru", "lstm")
POOLINGS = ("mean", "last")


@dataclass
class CnnRnnConfig:
    """Per-frame ResNet + recurrent temporal model. Defaults: ResNet-18 frames, one 512-wide GRU, 16×112."""

    widths: tuple[int, ...] = (64, 128, 256, 512)  # ResNet stage widths; conv1 outputs widths[0]
    depths: tuple[int, ...] = (2, 2, 2, 2)  # basic blocks per stage
    img_size: int = 112
    num_frames: int = 16
    in_chans: int = 3
    norm: str = "batch"  # batch (torchvision) | group (per-sample statistics: no running stats to sync)
    norm_groups: int = 32
    zero_init_residual: bool = False  # zero each block's bn2 (torchvision's option)
    proj_dim: int = 512  # Linear CNN feature -> RNN input
    rnn: str = "gru"  # gru | lstm
    hidden: int = 512
    layers: int = 1
    bidirectional: bool = False
    rnn_dropout: float = 0.0  # between stacked RNN layers (needs layers > 1)
    pool: str = "mean"  # mean: average of the top layer's outputs over time | last: final hidden state(s)
    preset: str | None = None  # informational: which CNN_RNN_PRESETS entry this came from

    def __post_init__(self) -> None:
        check_resnet_fields(self)
        if self.rnn not in RNN_KINDS:
            raise ValueError(f"rnn={self.rnn!r}: use one of {RNN_KINDS}")
        if self.pool not in POOLINGS:
            raise ValueError(f"pool={self.pool!r}: use one of {POOLINGS}")
        if min(self.proj_dim, self.hidden, self.layers) < 1:
            raise ValueError(
                f"proj_dim={self.proj_dim}, hidden={self.hidden}, layers={self.layers} must be >= 1"
            )
        if not 0.0 <= self.rnn_dropout < 1.0 or (self.rnn_dropout > 0 and self.layers == 1):
            raise ValueError(f"rnn_dropout={self.rnn_dropout} must be in [0, 1) and needs layers > 1")

    @property
    def cnn_dim(self) -> int:
        return self.widths[-1]

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def feature_dim(self) -> int:
        return self.hidden * self.num_directions

    @property
    def num_stages(self) -> int:
        return len(self.widths)

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> CnnRnnConfig:
        """A copy of ``CNN_RNN_PRESETS[name]`` with ``overrides`` applied (e.g. ``rnn="lstm"``)."""
        if name not in CNN_RNN_PRESETS:
            raise KeyError(f"unknown CNN+RNN preset {name!r}; choose from {sorted(CNN_RNN_PRESETS)}")
        return dataclasses.replace(CNN_RNN_PRESETS[name], **overrides)


# Parameter counts are asserted in tests/models/test_video_cnn.py.
CNN_RNN_PRESETS: dict[str, CnnRnnConfig] = {
    "resnet18": CnnRnnConfig(preset="resnet18"),
    # CPU size: about the tiny ViT's parameter count, for 8 frames × 32².
    "tiny": CnnRnnConfig(
        widths=(16, 24, 32, 48),
        depths=(1, 1, 1, 1),
        img_size=32,
        num_frames=8,
        proj_dim=64,
        hidden=64,
        preset="tiny",
    ),
}


class BasicBlock2d(nn.Module):
    """torchvision's 2-D basic block: conv1/bn1/relu, conv2/bn2, residual (``downsample`` when needed)."""

    def __init__(self, c_in: int, planes: int, stride: int, norm: partial[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or c_in != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, planes, 1, stride=stride, bias=False), norm(planes)
            )

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        residual = x_NCHW if self.downsample is None else self.downsample(x_NCHW)
        y = self.relu(self.bn1(self.conv1(x_NCHW)))
        return self.relu(self.bn2(self.conv2(y)) + residual)


class FrameResNet(nn.Module):
    """2-D ResNet without ``fc``: ``images_NCHW -> feat_ND`` (7×7/2 conv, 3×3/2 max pool, stages, average pool)."""

    def __init__(self, cfg: CnnRnnConfig) -> None:
        super().__init__()
        norm = partial(norm_layer, cfg.norm, dims=2, max_groups=cfg.norm_groups)
        w = cfg.widths[0]
        self.conv1 = nn.Conv2d(cfg.in_chans, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        c_in = w
        for i, (planes, depth) in enumerate(zip(cfg.widths, cfg.depths)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock2d(c_in, planes, stride, norm)]
            blocks += [BasicBlock2d(planes, planes, 1, norm) for _ in range(depth - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = planes
        self.num_stages = len(cfg.widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        init_conv_net(self)
        if cfg.zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock2d):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, images_NCHW: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images_NCHW))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return rearrange(self.avgpool(x), "n d 1 1 -> n d")


class CnnRnn(StagedNet, nn.Module):
    """CNN+RNN backbone: ``forward_features(video_BCTHW) -> feat_BD`` with D = hidden × directions."""

    def __init__(self, cfg: CnnRnnConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cnn = FrameResNet(cfg)
        self.proj = nn.Linear(cfg.cnn_dim, cfg.proj_dim)
        rnn_cls = nn.GRU if cfg.rnn == "gru" else nn.LSTM
        self.rnn = rnn_cls(
            cfg.proj_dim,
            cfg.hidden,
            num_layers=cfg.layers,
            batch_first=True,
            dropout=cfg.rnn_dropout,
            bidirectional=cfg.bidirectional,
        )

    @property
    def feature_dim(self) -> int:
        return self.cfg.feature_dim

    # -- engine hooks (names relative to this module) ----------------------------------------------
    def stage_prefixes(self) -> list[tuple[str, ...]]:
        """Parameter-name prefixes of each stage, input to output: stem, layer1..S, temporal (proj + rnn)."""
        layers = [(f"cnn.layer{i + 1}.",) for i in range(self.cfg.num_stages)]
        return [("cnn.conv1.", "cnn.bn1."), *layers, ("proj.", "rnn.")]

    # -- forward ------------------------------------------------------------------------------------
    def forward_sequence(self, video_BCTHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-layer outputs ``out_BTF``, final hidden states ``h_n`` ``[layers·dirs, B, H]``)."""
        check_video_input(video_BCTHW, self.cfg)
        frames_NCHW = rearrange(video_BCTHW, "b c t h w -> (b t) c h w")
        feat_BTD = rearrange(self.cnn(frames_NCHW), "(b t) d -> b t d", b=video_BCTHW.shape[0])
        out_BTF, state = self.rnn(self.proj(feat_BTD))
        h_n = state[0] if isinstance(state, tuple) else state  # LSTM: (h_n, c_n)
        return out_BTF, h_n

    def forward_features(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        out_BTF, h_n = self.forward_sequence(video_BCTHW)
        if self.cfg.pool == "mean":
            return out_BTF.mean(dim=1)
        # Last layer's final states: forward direction at t = T-1, backward direction at t = 0.
        last_dBH = h_n[-self.cfg.num_directions :]
        return rearrange(last_dBH, "d b h -> b (d h)")

    def forward_temporal_features(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """The top RNN layer's output at every frame ``[B, T, F]``."""
        return self.forward_sequence(video_BCTHW)[0]

    def forward(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.forward_features(video_BCTHW)
