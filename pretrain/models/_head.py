"""The linear classification head both classifier families share: features → logits, and growing the head
for new classes while keeping the old classes' rows (continual learning, the update loop)."""

from __future__ import annotations

import torch
from torch import nn


class LinearHead:
    """Mixin for a classifier with `head_dropout` and a linear `head` over `forward_features` (timm's
    `forward_features` / `forward_head` split)."""

    head: nn.Linear
    head_dropout: nn.Module
    # an audio-visual model also has `audio` (an `AudioBranch`: fuses the clip's sound in); a class attribute
    # here would shadow the submodule nn.Module keeps in `_modules`

    def forward_features(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, feat_BD: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits from pooled features; `pre_logits`: the features the head sees (after dropout)."""
        x = self.head_dropout(feat_BD)
        return x if pre_logits else self.head(x)

    def forward(self, video_BCTHW: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; an audio-visual model (`audio` branch) also takes the clip's sound (log-mel [B, M, F])."""
        feat = self.forward_features(video_BCTHW)
        branch = getattr(self, "audio", None)
        if branch is not None:
            if audio is None:
                raise ValueError("this model listens as well as looks: pass the clip's sound (audio)")
            feat = branch(feat, audio)
        return self.forward_head(feat)

    def keep_head_rows(self, weight_KD: torch.Tensor, bias_K: torch.Tensor) -> int:
        """Copy an older head's rows into the first rows of this one (old class ids never move; the new
        classes keep their fresh init). Returns the number of rows kept; a head that shrank or changed width
        is an error naming both shapes."""
        n, width = weight_KD.shape
        if n > self.head.out_features or width != self.head.in_features:
            raise ValueError(
                f"cannot keep a head of {n} classes × {width} features in one of "
                f"{self.head.out_features} × {self.head.in_features}: a head only grows"
            )
        with torch.no_grad():
            self.head.weight[:n].copy_(weight_KD)
            self.head.bias[:n].copy_(bias_K)
        return n
