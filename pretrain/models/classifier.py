"""Video classifier: VideoMAE encoder + pooling + head (VideoMAE fine-tuning convention).

With ``use_mean_pooling`` the encoder has no final norm; tokens are averaged and normalized by ``fc_norm``.
With ``temporal`` the tokens are averaged over space only: one feature (and one row of logits) per temporal
token, ``[B, T', D]`` (labels per time step, background included).
Without it the encoder's final ``norm`` is applied and the *first token* is used (VideoMAE has no CLS
token; this is what HF ``VideoMAEForVideoClassification`` does). PEFT is applied from outside through
``.encoder`` and ``.head``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from ._head import LinearHead
from .audio import AudioBranch, AudioBranchConfig
from .vit import VideoViT, VideoViTConfig, encoder_layer_index


@dataclass
class VideoClassifierConfig:
    encoder: VideoViTConfig = field(default_factory=VideoViTConfig)
    num_classes: int = 400
    use_mean_pooling: bool = True
    head_dropout: float = 0.0
    init_scale: float = 0.001  # VideoMAE multiplies the head init by this
    fc_norm_eps: float = 1e-6  # HF hard-codes 1e-5
    class_names: list[str] | None = None
    temporal: bool = False  # logits per temporal token [B, T', K] instead of per clip
    audio: AudioBranchConfig | None = None  # an audio-visual model: the sound fused in (`audio.py`)

    def __post_init__(self) -> None:
        self.audio = AudioBranchConfig.for_classifier(self.audio, self.temporal)
        if self.temporal and not self.use_mean_pooling:
            raise ValueError("temporal=True pools each time step's tokens: it needs use_mean_pooling=True")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for num_classes={self.num_classes}")

    @property
    def built_encoder(self) -> VideoViTConfig:
        """The encoder actually built: final norm only when not mean pooling."""
        return dataclasses.replace(self.encoder, final_norm=not self.use_mean_pooling)


class VideoClassifier(LinearHead, nn.Module):
    """``forward(video_BCTHW) -> logits_BK``."""

    def __init__(self, cfg: VideoClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VideoViT(cfg.built_encoder)
        dim = cfg.encoder.embed_dim
        self.fc_norm = nn.LayerNorm(dim, eps=cfg.fc_norm_eps) if cfg.use_mean_pooling else None
        self.head_dropout = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(dim, cfg.num_classes)
        self.audio = AudioBranch(cfg.audio, dim) if cfg.audio is not None else None
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(cfg.init_scale)
            self.head.bias.mul_(cfg.init_scale)

    @property
    def feature_dim(self) -> int:
        """Width of ``forward_features`` (the classifier contract shared with ``BackboneClassifier``)."""
        return self.cfg.encoder.embed_dim

    @property
    def num_layers_for_lr_decay(self) -> int:
        return self.cfg.encoder.depth + 2

    def layer_index(self, param_name: str) -> int:
        return encoder_layer_index(param_name, self.cfg.encoder.depth, "encoder.")

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def forward_features(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """Pooled clip features ``[B, D]`` (before dropout and head); ``[B, T', D]`` when temporal or
        audio-visual (the sound is fused per time step)."""
        tokens_BND = self.encoder(video_BCTHW)
        if self.cfg.temporal or self.cfg.audio is not None:
            t = self.cfg.encoder.grid_size[0]
            return self.fc_norm(tokens_BND.unflatten(1, (t, -1)).mean(dim=2))
        if self.fc_norm is not None:
            return self.fc_norm(tokens_BND.mean(dim=1))
        return tokens_BND[:, 0]
