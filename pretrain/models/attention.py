"""Multi-head self-attention with selectable backends.

One module, three kernels: ``flash_attn`` (the FlashAttention package, CUDA + fp16/bf16 only),
``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``, which picks its own fused kernel) and
``math`` (an explicit softmax(QK^T/sqrt(d))V reference that the parity tests compare everything with).
``auto`` resolves per call, so the same model runs on a CPU laptop and on a GPU cluster.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

ATTN_IMPLS: tuple[str, ...] = ("auto", "flash_attn", "sdpa", "math")


def flash_attn_available() -> bool:
    """True when the optional ``flash_attn`` package is importable (GPU machines only)."""
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_impl(requested: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """Turn a configured backend into the one that actually runs for this device/dtype.

    ``auto`` → ``flash_attn`` when installed and the tensors are CUDA fp16/bf16, else ``sdpa``.
    An explicit ``flash_attn`` request fails loudly instead of silently falling back, so a cluster
    run never trains at a fraction of the expected speed without anyone noticing.
    """
    if requested not in ATTN_IMPLS:
        raise ValueError(f"attn_impl={requested!r} is not one of {ATTN_IMPLS}")
    device = torch.device(device)
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        if device.type == "cuda" and half and flash_attn_available():
            return "flash_attn"
        return "sdpa"
    if requested == "flash_attn":
        if not flash_attn_available():
            raise RuntimeError(
                "attn_impl='flash_attn' was requested but the flash_attn package is not installed "
                "(pip install 'tubelet[flash]' on a CUDA machine), or set attn_impl to 'auto' or 'sdpa'."
            )
        if device.type != "cuda" or not half:
            raise RuntimeError(
                f"attn_impl='flash_attn' needs CUDA fp16/bf16 tensors, got device={device.type} dtype={dtype}; "
                "use attn_impl='auto' to fall back to SDPA automatically."
            )
    return requested


def math_attention(q_BHND: torch.Tensor, k_BHND: torch.Tensor, v_BHND: torch.Tensor) -> torch.Tensor:
    """Reference attention: softmax(QK^T / sqrt(d)) V, computed in the input dtype."""
    scale = q_BHND.shape[-1] ** -0.5
    scores_BHNN = torch.matmul(q_BHND, k_BHND.transpose(-2, -1)) * scale
    probs_BHNN = scores_BHNN.softmax(dim=-1)
    return torch.matmul(probs_BHNN, v_BHND)


def attend(
    q_BHND: torch.Tensor,
    k_BHND: torch.Tensor,
    v_BHND: torch.Tensor,
    impl: str = "auto",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Non-causal attention with backend ``impl``; returns ``out_BHND``."""
    impl = resolve_attn_impl(impl, q_BHND.device, q_BHND.dtype)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q_BHND, k_BHND, v_BHND, dropout_p=dropout_p)
    if impl == "flash_attn":
        from flash_attn import flash_attn_func  # optional GPU dependency

        q_BNHD, k_BNHD, v_BNHD = (t.transpose(1, 2) for t in (q_BHND, k_BHND, v_BHND))
        out_BNHD = flash_attn_func(q_BNHD, k_BNHD, v_BNHD, dropout_p=dropout_p, causal=False)
        return out_BNHD.transpose(1, 2)
    if dropout_p > 0.0:
        raise ValueError("attention dropout is only supported by the sdpa/flash_attn backends")
    return math_attention(q_BHND, k_BHND, v_BHND)


class Attention(nn.Module):
    """VideoMAE self-attention: fused ``qkv`` Linear without bias plus separate ``q_bias``/``v_bias``.

    The key has no bias (softmax is invariant to it); keeping the original VideoMAE parameter layout
    makes checkpoint conversion a renaming instead of a re-derivation.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_impl: str = "auto") -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={attn_impl!r} is not one of {ATTN_IMPLS}")
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BND: torch.Tensor, keep_last: int | None = None) -> torch.Tensor:
        """``keep_last=M``: outputs for the last M tokens only (queries of those, keys/values of all)."""
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv_BN3HD = F.linear(x_BND, self.qkv.weight, bias).unflatten(-1, (3, self.num_heads, -1))
        # split on the ``three`` axis in place: backward stacks the q/k/v gradients straight into the
        # [B, N, 3, H, D] layout the Linear's backward reads (no extra permute copy)
        q_BHND, k_BHND, v_BHND = (t_BNHD.transpose(1, 2) for t_BNHD in qkv_BN3HD.unbind(2))
        if keep_last is not None:
            q_BHND = q_BHND[:, :, q_BHND.shape[2] - keep_last :]
        out_BHND = attend(q_BHND, k_BHND, v_BHND, self.attn_impl)
        return self.proj(rearrange(out_BHND, "b h n d -> b n (h d)"))
