"""Mixup and tube CutMix for video (the targets they mix come from the head: `finetune.heads`)."""

from __future__ import annotations

import numpy as np
import torch

from finetune.config import AugmentSection


def mix_batch(
    video_BCTHW: torch.Tensor,
    targets_BK: torch.Tensor,
    aug: AugmentSection,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix for video (timm's batch mode, partner = the batch reversed).

    CutMix cuts the SAME spatial box from every frame (a tube), so motion stays coherent inside it;
    the label weight is the box's exact area fraction. Returns (video, soft targets, λ).
    """
    use_mix, use_cut = aug.mixup > 0, aug.cutmix > 0
    if not (use_mix or use_cut) or rng.random() >= aug.mix_prob:
        return video_BCTHW, targets_BK, 1.0
    cut = use_cut and (not use_mix or rng.random() < aug.switch_prob)
    lam = float(rng.beta(aug.cutmix, aug.cutmix) if cut else rng.beta(aug.mixup, aug.mixup))
    partner = video_BCTHW.flip(0)
    if cut:
        h, w = video_BCTHW.shape[-2:]
        ratio = (1.0 - lam) ** 0.5
        ch, cw = int(h * ratio), int(w * ratio)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
        x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
        video_BCTHW = video_BCTHW.clone()
        video_BCTHW[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - float((y1 - y0) * (x1 - x0)) / (h * w)
    else:
        video_BCTHW = video_BCTHW * lam + partner * (1.0 - lam)
    return video_BCTHW, targets_BK * lam + targets_BK.flip(0) * (1.0 - lam), lam
