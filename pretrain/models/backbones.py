"""CNN backbones behind one classifier contract, so fine-tuning treats them like the ViT classifier.

Every backbone is an ``nn.Module`` with ``forward_features(video_BCTHW) -> feat_BD``, ``feature_dim``,
``stage_prefixes()`` and the engine's optimizer hooks, built from a typed config carrying ``img_size``,
``num_frames`` (the geometry the loaders must produce) and ``preset``. :class:`BackboneClassifier` puts a
linear ``head`` on top; the backbone sits under ``encoder.`` like the ViT classifier's encoder, so PEFT methods
(linear probe, partial, BitFit, LoRA) select parameters by name from outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._cnn import StagedNet
from ._config import config_from_dict
from ._head import LinearHead
from .audio import AudioBranch, AudioBranchConfig
from .cnn_rnn import CNN_RNN_PRESETS, CnnRnn, CnnRnnConfig
from .tada2d import TADA2D_PRESETS, TAda2D, TAda2DConfig
from .video_resnet import VIDEO_RESNET_ARCHS, VIDEO_RESNET_PRESETS, VideoResNet, VideoResNetConfig

BackboneConfig = VideoResNetConfig | CnnRnnConfig | TAda2DConfig

# backbone name -> (config class, module class, preset names, default preset)
BACKBONES: dict[str, tuple[type, type[nn.Module], tuple[str, ...], str]] = {
    arch: (
        VideoResNetConfig,
        VideoResNet,
        tuple(n for n in VIDEO_RESNET_PRESETS if n.startswith(f"{arch}-")),
        f"{arch}-18",
    )
    for arch in VIDEO_RESNET_ARCHS
}
BACKBONES["cnn_rnn"] = (CnnRnnConfig, CnnRnn, tuple(CNN_RNN_PRESETS), "resnet18")
BACKBONES["tada2d"] = (TAda2DConfig, TAda2D, tuple(TADA2D_PRESETS), "18")


def _check_backbone(name: str) -> None:
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r}: use one of {sorted(BACKBONES)}")


def backbone_config(backbone: str, preset: str | None = None, **overrides: Any) -> BackboneConfig:
    """The config of ``backbone`` from ``preset`` (its default when None) with ``overrides`` applied.

    Video ResNet presets can be named short: ``backbone_config("r2plus1d", "tiny")`` is ``"r2plus1d-tiny"``.
    """
    _check_backbone(backbone)
    cfg_cls, _, presets, default = BACKBONES[backbone]
    name = default if preset is None else preset
    if name not in presets and f"{backbone}-{name}" in presets:
        name = f"{backbone}-{name}"
    if name not in presets:
        raise KeyError(f"unknown preset {name!r} for backbone {backbone!r}; choose from {sorted(presets)}")
    return cfg_cls.from_preset(name, **overrides)


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """The backbone module a config describes."""
    for cfg_cls, module_cls, _, _ in BACKBONES.values():
        if type(cfg) is cfg_cls:
            return module_cls(cfg)
    raise TypeError(f"no backbone takes a {type(cfg).__name__}")


@dataclass
class BackboneClassifierConfig:
    """``backbone`` picks the family; ``encoder`` is its config (a dict is parsed; None = default preset)."""

    backbone: str = "r2plus1d"  # r2plus1d | r3d | mc3 | cnn_rnn | tada2d
    encoder: VideoResNetConfig | CnnRnnConfig | TAda2DConfig | None = None
    num_classes: int = 400
    head_dropout: float = 0.0
    init_std: float = 0.01  # head weights ~ N(0, init_std²), zero bias (torchvision's video ResNet init)
    class_names: list[str] | None = None
    temporal: bool = False  # logits per time step of the last feature map [B, T', K] instead of per clip
    audio: AudioBranchConfig | None = None  # an audio-visual model: the sound fused in (`audio.py`)

    def __post_init__(self) -> None:
        self.audio = AudioBranchConfig.for_classifier(self.audio, self.temporal)
        _check_backbone(self.backbone)
        cfg_cls = BACKBONES[self.backbone][0]
        if self.encoder is None:
            self.encoder = backbone_config(self.backbone)
        elif isinstance(self.encoder, dict):  # from config.json / YAML
            data = dict(self.encoder)
            if cfg_cls is VideoResNetConfig:
                data.setdefault("arch", self.backbone)
            self.encoder = config_from_dict(cfg_cls, data)
        if not isinstance(self.encoder, cfg_cls):
            raise TypeError(
                f"backbone={self.backbone!r} needs a {cfg_cls.__name__}, got {type(self.encoder).__name__}"
            )
        if isinstance(self.encoder, VideoResNetConfig) and self.encoder.arch != self.backbone:
            raise ValueError(f"backbone={self.backbone!r} but encoder.arch={self.encoder.arch!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes} must be >= 1")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout={self.head_dropout} must be in [0, 1)")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for num_classes={self.num_classes}")

    @property
    def img_size(self) -> int:
        return self.encoder.img_size

    @property
    def num_frames(self) -> int:
        return self.encoder.num_frames

    @classmethod
    def from_preset(
        cls, backbone: str, preset: str | None = None, num_classes: int = 400, **overrides: Any
    ) -> BackboneClassifierConfig:
        """Classifier on ``backbone_config(backbone, preset, **overrides)``."""
        return cls(
            backbone=backbone, encoder=backbone_config(backbone, preset, **overrides), num_classes=num_classes
        )


class BackboneClassifier(StagedNet, LinearHead, nn.Module):
    """``forward(video_BCTHW) -> logits_BK``: backbone ``encoder``, dropout, linear ``head``."""

    def __init__(self, cfg: BackboneClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_backbone(cfg.encoder)
        self.head_dropout = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(self.encoder.feature_dim, cfg.num_classes)
        self.audio = AudioBranch(cfg.audio, self.encoder.feature_dim) if cfg.audio is not None else None
        nn.init.normal_(self.head.weight, 0.0, cfg.init_std)
        nn.init.zeros_(self.head.bias)

    @property
    def feature_dim(self) -> int:
        return self.encoder.feature_dim

    # -- engine hooks -------------------------------------------------------------------------------
    def stage_prefixes(self) -> list[tuple[str, ...]]:
        """Backbone stages, input to output (the head not included): partial fine-tuning trains the last N
        (``name.startswith(prefixes)``) plus ``head.``."""
        return [tuple(f"encoder.{p}" for p in stage) for stage in self.encoder.stage_prefixes()]

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    # -- forward ------------------------------------------------------------------------------------
    def forward_features(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """Pooled clip features ``feat_BD`` (before dropout and head); ``[B, T', D]`` when temporal (the
        backbone's per-time-step features: space-pooled maps, or the RNN's outputs)."""
        if self.cfg.temporal or self.cfg.audio is not None:
            return self.encoder.forward_temporal_features(video_BCTHW)
        return self.encoder.forward_features(video_BCTHW)


def count_backbone_parameters(cfg: BackboneConfig | BackboneClassifierConfig) -> int:
    """Parameters of the module a config describes, built on ``meta`` (no memory, no init cost)."""
    with torch.device("meta"):
        model = BackboneClassifier(cfg) if isinstance(cfg, BackboneClassifierConfig) else build_backbone(cfg)
    return sum(p.numel() for p in model.parameters())


def backbone_param_table() -> str:
    """A printable table of backbone parameter counts for every preset (no head)."""
    rows = ["backbone  preset          frames  size   feat     params"]
    for name, (_, _, presets, _) in BACKBONES.items():
        for preset in presets:
            c = backbone_config(name, preset)
            n = count_backbone_parameters(c)
            rows.append(
                f"{name:9s} {preset:15s} {c.num_frames:6d} {c.img_size:5d} {c.feature_dim:5d} {n / 1e6:9.3f}M"
            )
    return "\n".join(rows)
