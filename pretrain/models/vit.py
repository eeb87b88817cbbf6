"""Video ViT encoder (VideoMAE family): tubelet embedding, fixed or learned positions, pre-norm blocks.

Parameter names follow the original VideoMAE / VideoMAE V2 code (``patch_embed.proj``, ``blocks.N.attn.qkv``,
``q_bias``/``v_bias``, ``gamma_1``...), so its checkpoints load by renaming prefixes only.
Tokens are ordered (t, h, w): time-major, then rows, then columns — the order Conv3d + flatten produces.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import ATTN_IMPLS, Attention


@dataclass
class VideoViTConfig:
    """Architecture of the video encoder. Defaults are VideoMAE ViT-B 16×224 minus the width/depth."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    img_size: int = 224
    num_frames: int = 16
    patch_size: int = 16
    tubelet_size: int = 2
    in_chans: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # VideoMAE convention: q and v biases, no k bias
    drop_path_rate: float = 0.0
    layer_scale_init: float | None = None
    pos_embed: str = "sincos"  # "sincos" (fixed, VideoMAE) | "learned"
    attn_impl: str = "auto"  # auto | flash_attn | sdpa | math
    norm_eps: float = 1e-6  # original VideoMAE; HF VideoMAEConfig.layer_norm_eps defaults to 1e-12
    final_norm: bool = True  # LayerNorm after the last block (VideoMAE pretraining / no mean pooling)
    preset: str | None = None  # informational: which PRESETS entry this came from

    def __post_init__(self) -> None:
        if self.pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed={self.pos_embed!r}: use 'sincos' or 'learned'")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r} is not one of {ATTN_IMPLS}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.img_size % self.patch_size or self.num_frames % self.tubelet_size:
            raise ValueError(
                f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size} and "
                f"num_frames={self.num_frames} a multiple of tubelet_size={self.tubelet_size}"
            )

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Token grid (T', H', W')."""
        side = self.img_size // self.patch_size
        return (self.num_frames // self.tubelet_size, side, side)

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_size
        return t * h * w

    @property
    def patch_dim(self) -> int:
        """Pixels per token: tubelet·p·p·C (the MAE prediction width)."""
        return self.tubelet_size * self.patch_size * self.patch_size * self.in_chans

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> VideoViTConfig:
        """A copy of ``PRESETS[name]`` with ``overrides`` applied (e.g. ``num_frames=8``)."""
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


# Encoder sizes. Parameter counts (encoder, 16×224, tubelet 2) are asserted in tests/models/test_vit.py.
PRESETS: dict[str, VideoViTConfig] = {
    "tiny": VideoViTConfig(
        embed_dim=64, depth=2, num_heads=2, img_size=32, num_frames=8, patch_size=8, preset="tiny"
    ),
    "vit-s": VideoViTConfig(embed_dim=384, depth=12, num_heads=6, preset="vit-s"),
    "vit-b": VideoViTConfig(embed_dim=768, depth=12, num_heads=12, preset="vit-b"),
    "vit-l": VideoViTConfig(embed_dim=1024, depth=24, num_heads=16, preset="vit-l"),
    "vit-h": VideoViTConfig(embed_dim=1280, depth=32, num_heads=16, preset="vit-h"),
    # VideoMAE V2 giant (~1B): patch 14, MLP 6144 = 1408·48/11.
    "vit-g": VideoViTConfig(
        embed_dim=1408, depth=40, num_heads=16, patch_size=14, mlp_ratio=48 / 11, preset="vit-g"
    ),
}


def get_sinusoid_encoding_table(n_position: int, d_hid: int) -> torch.Tensor:
    """The fixed VideoMAE position table, ``[1, n_position, d_hid]`` float32.

    It is a 1-D transformer table over the *flattened* (t, h, w) token index, not a factorised 3-D one:
    that is what VideoMAE and HF ``VideoMAEModel`` use, and we match them bit for bit (float64 numpy,
    then cast), so converted checkpoints see exactly the positions they were trained with.
    """
    position = np.arange(n_position, dtype=np.float64)[:, None]
    exponent = np.array([2 * (j // 2) / d_hid for j in range(d_hid)], dtype=np.float64)
    angles = position / np.power(10000, exponent)[None, :]
    angles[:, 0::2] = np.sin(angles[:, 0::2])
    angles[:, 1::2] = np.cos(angles[:, 1::2])
    return torch.tensor(angles, dtype=torch.float32, device="cpu").unsqueeze(0)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x_BND)))


class Block(nn.Module):
    """Pre-norm transformer block with optional layer scale (``gamma_1``/``gamma_2``) and drop path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layer_scale_init: float | None = None,
        attn_impl: str = "auto",
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_impl=attn_impl)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_hidden)
        if layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.gamma_1 = None
            self.gamma_2 = None

    def forward(self, x_BND: torch.Tensor, keep_last: int | None = None) -> torch.Tensor:
        """``keep_last=M``: return only the last M tokens' outputs (they still attend to every token),
        and skip the other tokens' query, projection and MLP work (the MAE decoder's last block)."""
        y = self.attn(self.norm1(x_BND), keep_last)
        if keep_last is not None:
            x_BND = x_BND[:, x_BND.shape[1] - keep_last :]
        x_BND = x_BND + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x_BND))
        return x_BND + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


def build_blocks(
    depth: int,
    dim: int,
    num_heads: int,
    mlp_hidden: int,
    qkv_bias: bool,
    drop_path_rate: float,
    layer_scale_init: float | None,
    attn_impl: str,
    norm_eps: float,
) -> nn.ModuleList:
    """``depth`` blocks with drop path rising linearly from 0 to ``drop_path_rate`` (VideoMAE schedule)."""
    rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth else []
    return nn.ModuleList(
        Block(dim, num_heads, mlp_hidden, qkv_bias, r, layer_scale_init, attn_impl, norm_eps) for r in rates
    )


class TubeletEmbed(nn.Module):
    """Conv3d with kernel = stride = (tubelet, patch, patch): ``x_BCTHW`` → ``tokens_BND`` in (t, h, w) order."""

    def __init__(self, cfg: VideoViTConfig) -> None:
        super().__init__()
        k = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=k, stride=k)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x_BCTHW), "b d t h w -> b (t h w) d")

    def embed_patches(self, patches_BKP: torch.Tensor) -> torch.Tensor:
        """The same map on patches already cut out (``patch_tokens`` rows, ``(c t p p)``): a Linear.

        Equal to the Conv3d on those tokens (up to float summation order); the masked autoencoder embeds
        only the visible tokens this way instead of convolving the whole clip.
        """
        return F.linear(patches_BKP, self.proj.weight.flatten(1), self.proj.bias)


def init_vit_weights(module: nn.Module) -> None:
    """VideoMAE init: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def gather_tokens(tokens_BND: torch.Tensor, ids_BK: torch.Tensor) -> torch.Tensor:
    """Select tokens ``ids_BK`` per sample (differentiable). ``tokens`` may be ``[1, N, D]``: one table
    (positions) shared by the batch. Whole rows are copied (``index_select``), not element by element."""
    b, k = ids_BK.shape
    n, d = tokens_BND.shape[1], tokens_BND.shape[2]
    if tokens_BND.shape[0] == 1:
        return tokens_BND[0].index_select(0, ids_BK.flatten()).view(b, k, d)
    flat_ids = (ids_BK + torch.arange(b, device=ids_BK.device)[:, None] * n).flatten()
    return tokens_BND.reshape(b * n, d).index_select(0, flat_ids).view(b, k, d)


def patch_tokens(video_BCTHW: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """The clip cut into its N tokens' pixels: ``[B, N, C·tubelet·p·p]`` laid out ``(c p0 p1 p2)`` (the
    Conv3d weight's order), tokens in (t, h, w) order. One copy of the clip."""
    return rearrange(
        video_BCTHW, "b c (t p0) (h p1) (w p2) -> b (t h w) (c p0 p1 p2)", p0=tubelet, p1=patch, p2=patch
    )


def mask_to_ids(mask_BN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a bool mask into (visible ids ``[B, K]``, masked ids ``[B, M]``), each ascending.

    Every sample must hide the same number of tokens (the batch stays rectangular); ascending order
    matches HF's ``tokens[~bool_masked_pos]`` so results agree with it token for token.
    """
    if mask_BN.dtype != torch.bool or mask_BN.ndim != 2:
        raise ValueError(f"mask must be a bool tensor [B, N], got {mask_BN.dtype} {tuple(mask_BN.shape)}")
    counts = mask_BN.sum(1).tolist()  # the one host sync of a step
    n_masked = counts[0] if counts else 0
    if any(n != n_masked for n in counts):
        raise ValueError(f"every sample must mask the same number of tokens, got counts {counts}")
    order_BN = torch.argsort(mask_BN.to(torch.int8), dim=1, stable=True)
    n_visible = mask_BN.shape[1] - n_masked
    return order_BN[:, :n_visible], order_BN[:, n_visible:]


_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def encoder_layer_index(name: str, depth: int, encoder_prefix: str = "") -> int:
    """Layer id for layer-wise LR decay: 0 embeddings, i+1 encoder block i, depth+1 everything else."""
    if not name.startswith(encoder_prefix):
        return depth + 1
    rest = name[len(encoder_prefix) :]
    if rest.split(".")[0] in ("patch_embed", "pos_embed", "cls_token", "mask_token_enc"):
        return 0
    m = _BLOCK_RE.match(rest) if rest.startswith("blocks.") else None
    if m:
        return int(m.group(1)) + 1
    return depth + 1


class VideoViT(nn.Module):
    """Video ViT encoder. ``forward(x_BCTHW, mask_BN=None) -> tokens_BKD`` (visible tokens only when masked)."""

    def __init__(self, cfg: VideoViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = TubeletEmbed(cfg)
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            # Not a parameter and not saved: recomputed from the config, as in VideoMAE/HF.
            table = get_sinusoid_encoding_table(cfg.num_patches, cfg.embed_dim)
            self.register_buffer("pos_embed", table.to(torch.empty(0).device), persistent=False)
        self.blocks = build_blocks(
            cfg.depth,
            cfg.embed_dim,
            cfg.num_heads,
            cfg.mlp_hidden_dim,
            cfg.qkv_bias,
            cfg.drop_path_rate,
            cfg.layer_scale_init,
            cfg.attn_impl,
            cfg.norm_eps,
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        self.apply(init_vit_weights)

    # -- engine hooks -------------------------------------------------------------------------------
    @property
    def num_layers_for_lr_decay(self) -> int:
        return self.cfg.depth + 2

    def layer_index(self, param_name: str) -> int:
        return encoder_layer_index(param_name, self.cfg.depth)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"} if self.cfg.pos_embed == "learned" else set()

    # -- forward ------------------------------------------------------------------------------------
    def check_input(self, x_BCTHW: torch.Tensor) -> None:
        c = self.cfg
        want = (c.in_chans, c.num_frames, c.img_size, c.img_size)
        if x_BCTHW.ndim != 5 or tuple(x_BCTHW.shape[1:]) != want:
            raise ValueError(
                f"expected video [B, C, T, H, W] with (C, T, H, W) = {want}, got {tuple(x_BCTHW.shape)}"
            )

    def embed(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        """Tubelet tokens plus positions for all N tokens: ``tokens_BND``."""
        self.check_input(x_BCTHW)
        tokens_BND = self.patch_embed(x_BCTHW)
        return tokens_BND + self.pos_embed.to(dtype=tokens_BND.dtype)

    def embed_patches(self, patches_BKP: torch.Tensor, ids_BK: torch.Tensor) -> torch.Tensor:
        """Tokens plus positions for the tokens ``ids_BK`` whose pixels are ``patches_BKP``
        (``patch_tokens`` rows): the same map as ``embed`` followed by a selection, computed on those
        tokens only (the tubelet Conv3d as a Linear; equal up to float summation order)."""
        tokens_BKD = self.patch_embed.embed_patches(patches_BKP.to(self.patch_embed.proj.weight.dtype))
        return tokens_BKD + gather_tokens(self.pos_embed.to(dtype=tokens_BKD.dtype), ids_BK)

    def embed_visible(self, x_BCTHW: torch.Tensor, visible_ids_BK: torch.Tensor) -> torch.Tensor:
        """``embed`` followed by the selection of ``visible_ids_BK``, computed on those tokens only."""
        self.check_input(x_BCTHW)
        c = self.cfg
        patches_BNP = patch_tokens(x_BCTHW, c.tubelet_size, c.patch_size)
        return self.embed_patches(gather_tokens(patches_BNP, visible_ids_BK), visible_ids_BK)

    def forward_blocks(self, tokens_BND: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens_BND = block(tokens_BND)
        return self.norm(tokens_BND)

    def forward(self, x_BCTHW: torch.Tensor, mask_BN: torch.Tensor | None = None) -> torch.Tensor:
        if mask_BN is None:
            return self.forward_blocks(self.embed(x_BCTHW))
        visible_ids_BK, _ = mask_to_ids(mask_BN)
        return self.forward_blocks(self.embed_visible(x_BCTHW, visible_ids_BK))


def count_parameters(model_or_cfg: nn.Module | VideoViTConfig, trainable_only: bool = False) -> int:
    """Parameter count of a module, or of the encoder a config describes (built on ``meta``: no memory)."""
    if isinstance(model_or_cfg, VideoViTConfig):
        with torch.device("meta"):
            model_or_cfg = VideoViT(model_or_cfg)
    params: Iterable[nn.Parameter] = model_or_cfg.parameters()
    return sum(p.numel() for p in params if p.requires_grad or not trainable_only)


def param_count_table(names: Iterable[str] | None = None) -> str:
    """A printable table of encoder parameter counts for ``PRESETS`` (16×224 defaults of each preset)."""
    rows = ["preset   dim  depth heads patch  tokens   params"]
    for name in names or PRESETS:
        c = PRESETS[name]
        n = count_parameters(c)
        rows.append(
            f"{name:7s} {c.embed_dim:5d} {c.depth:5d} {c.num_heads:5d} {c.patch_size:5d} {c.num_patches:7d} "
            f"{n / 1e6:8.1f}M"
        )
    return "\n".join(rows)
