"""Dynamic convolutions: kernels that depend on the input.

- :class:`TAdaConv2d` (Huang et al., "TAda! Temporally-Adaptive Convolutions for Video Understanding",
  ICLR 2022): one shared 2-D kernel ``W`` applied to every frame, calibrated per frame and per output channel,
  ``W_t = α_t · W``. The calibration ``α_t`` comes from a route function (:class:`TAdaRoute`) over frame
  descriptors (spatially average-pooled input frames): global temporal context (a Linear of the clip mean)
  added to every frame's descriptor, a temporal 1-D conv (kernel 3), norm, ReLU, a second temporal 1-D conv
  whose weights start at zero, ``+ 1`` — so ``α = 1`` at initialisation and the layer starts as the plain conv.
  Because ``α`` scales output channels, ``(α_t · W) * x_t = α_t · (W * x_t)``: the layer runs the plain
  ``nn.Conv2d`` (``.conv``, a module peft's LoRA can wrap and merge) and scales its output.
- :class:`KernelMixtureConv3d` (Chen et al., "Dynamic Convolution: Attention over Convolution Kernels",
  CVPR 2020): K kernels mixed per sample, ``W_b = Σ_k π_bk W_k``, with ``π_b = softmax(MLP(GAP(x_b)) / τ)``.
  The MLP's last layer starts at zero (uniform attention: the layer starts as the mean kernel). Run as one
  grouped convolution over the batch.
- :class:`SelectiveKernelConv3d` (SKNet, Li et al., CVPR 2019, over time): M branches with different temporal
  kernel sizes (default 3 and 5), fused per sample and channel by a softmax attention over the branches
  computed from the pooled sum of the branches — the layer adjusts its temporal receptive field per input.

Every route / attention MLP is a :class:`DynamicRoute` (its Linear / Conv1d layers are what
``finetune.lora_targets=[dynamic]`` wraps). FLOPs are in ``flops.py`` (the widths come from the functions here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

DYNAMIC_KINDS = ("none", "kernel_mixture", "selective_kernel")
NormFactory = Callable[[int], nn.Module]


def mixture_width(c_in: int, reduction: int) -> int:
    """Hidden width of a kernel-mixture attention: no norm before its ReLU, so at least 8 units (fewer die
    together on the non-negative pooled input of a small layer)."""
    return route_width(c_in, reduction, floor=8)


def route_width(channels: int, reduction: int, floor: int = 4) -> int:
    """Hidden width of a route / attention MLP: ``channels // reduction``, at least ``floor``."""
    return max(channels // reduction, floor)


class DynamicRoute(nn.Module):
    """Marker base of the small networks that compute calibrations / attentions (LoRA target ``dynamic``)."""


# ------------------------------------------------------------------------------------------------- TAda


class TAdaRoute(DynamicRoute):
    """``desc_BCT -> α_BOT``: per-frame, per-output-channel calibration (1 at init)."""

    def __init__(self, c_in: int, c_out: int, reduction: int, kernel: int, norm: NormFactory) -> None:
        super().__init__()
        hidden = route_width(c_in, reduction)
        self.context = nn.Linear(c_in, c_in)  # global temporal context, added to every frame
        self.a = nn.Conv1d(c_in, hidden, kernel, padding=kernel // 2)
        self.norm = norm(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.b = nn.Conv1d(hidden, c_out, kernel, padding=kernel // 2, bias=False)
        nn.init.zeros_(self.b.weight)  # α = 1: the layer starts as the shared 2-D conv

    def forward(self, desc_BCT: torch.Tensor) -> torch.Tensor:
        context_BC1 = self.context(desc_BCT.mean(dim=2)).unsqueeze(2)
        return 1.0 + self.b(self.relu(self.norm(self.a(desc_BCT + context_BC1))))


class TAdaConv2d(nn.Module):
    """A 2-D conv on every frame with its kernel calibrated per frame: ``(x_NCHW, frames) -> y_NOHW``.

    ``N = B·T`` frames, time-major inside each clip (``(b t)``), as :class:`TAda2D` folds them.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int,
        norm: NormFactory,
        reduction: int = 4,
        route_kernel: int = 3,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.route = TAdaRoute(c_in, c_out, reduction, route_kernel, norm)

    def calibration(self, x_NCHW: torch.Tensor, frames: int) -> torch.Tensor:
        """``α_NO``: each frame's multiplier of each output channel's kernel."""
        desc_BCT = rearrange(x_NCHW.mean(dim=(2, 3)), "(b t) c -> b c t", t=frames)
        return rearrange(self.route(desc_BCT), "b o t -> (b t) o")

    def forward(self, x_NCHW: torch.Tensor, frames: int) -> torch.Tensor:
        alpha_NO = self.calibration(x_NCHW, frames)
        return self.conv(x_NCHW) * alpha_NO[:, :, None, None]


# --------------------------------------------------------------------------------------- kernel mixture


class MixtureAttention(DynamicRoute):
    """``pooled_BC -> logits_BK`` (the last layer starts at zero: uniform attention)."""

    def __init__(self, c_in: int, kernels: int, reduction: int) -> None:
        super().__init__()
        hidden = mixture_width(c_in, reduction)
        self.fc1 = nn.Linear(c_in, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, kernels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, pooled_BC: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(pooled_BC)))


class KernelMixtureConv3d(nn.Module):
    """Dynamic convolution: ``weight`` ``[K, O, C, kt, kh, kw]`` mixed per sample by softmax attention."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[int],
        kernels: int = 4,
        temperature: float = 1.0,
        reduction: int = 4,
    ) -> None:
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        self.kernel_size, self.stride, self.padding = tuple(kernel), tuple(stride), tuple(padding)
        self.temperature = temperature
        self.weight = nn.Parameter(torch.empty(kernels, c_out, c_in, *self.kernel_size))
        self.attention = MixtureAttention(c_in, kernels, reduction)
        for w in self.weight:  # each kernel as torchvision inits a conv (He normal, fan_out)
            nn.init.normal_(w, 0.0, math.sqrt(2.0 / (c_out * math.prod(self.kernel_size))))

    def mixture(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        """``π_BK``: each sample's weights over the K kernels (they sum to 1)."""
        logits_BK = self.attention(x_BCTHW.mean(dim=(2, 3, 4)))
        return torch.softmax(logits_BK / self.temperature, dim=1)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        b = x_BCTHW.shape[0]
        pi_BK = self.mixture(x_BCTHW)
        w = (pi_BK @ self.weight.flatten(1)).view(b * self.c_out, self.c_in, *self.kernel_size)
        x = x_BCTHW.reshape(1, b * self.c_in, *x_BCTHW.shape[2:])
        y = F.conv3d(x, w, None, self.stride, self.padding, groups=b)  # one group per sample
        return y.view(b, self.c_out, *y.shape[2:])


# -------------------------------------------------------------------------------------- selective kernel


def select_width(c_out: int, reduction: int) -> int:
    """SKNet's ``d = max(C / r, L)`` with ``L = 8`` (the tiny nets' widths are small)."""
    return route_width(c_out, reduction, floor=8)


class SelectAttention(DynamicRoute):
    """``pooled_BO -> logits_BMO`` (the last layer starts at zero: the branches start equally weighted)."""

    def __init__(self, c_out: int, branches: int, reduction: int) -> None:
        super().__init__()
        hidden = select_width(c_out, reduction)
        self.branches = branches
        self.fc = nn.Linear(c_out, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.select = nn.Linear(hidden, branches * c_out)
        nn.init.zeros_(self.select.weight)
        nn.init.zeros_(self.select.bias)

    def forward(self, pooled_BO: torch.Tensor) -> torch.Tensor:
        return rearrange(self.select(self.relu(self.fc(pooled_BO))), "b (m o) -> b m o", m=self.branches)


class SelectiveKernelConv3d(nn.Module):
    """Branches ``(kt_m, kh, kw)`` for each temporal size ``kt_m`` (odd), fused by a per-channel softmax."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[int],
        temporal_kernels: Sequence[int] = (3, 5),
        reduction: int = 4,
    ) -> None:
        super().__init__()
        _, kh, kw = kernel
        self.branches = nn.ModuleList(
            nn.Conv3d(
                c_in, c_out, (kt, kh, kw), stride=tuple(stride), padding=(kt // 2, *padding[1:]), bias=False
            )
            for kt in temporal_kernels
        )
        self.attention = SelectAttention(c_out, len(temporal_kernels), reduction)

    def selection(self, u_MBOTHW: torch.Tensor) -> torch.Tensor:
        """``a_BMO``: per sample and output channel, the weights of the branches (they sum to 1)."""
        return torch.softmax(self.attention(u_MBOTHW.sum(dim=0).mean(dim=(2, 3, 4))), dim=1)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        u_MBOTHW = torch.stack([branch(x_BCTHW) for branch in self.branches])
        a_MBO = rearrange(self.selection(u_MBOTHW), "b m o -> m b o")
        return (u_MBOTHW * a_MBO[..., None, None, None]).sum(dim=0)
