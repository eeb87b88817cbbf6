"""Masked video autoencoder (VideoMAE / VideoMAE V2 dual masking) with the normalized-pixel loss.

Numerics follow transformers' ``VideoMAEForPreTraining``: the encoder sees visible tokens only; the
decoder input is ``[visible tokens, mask tokens]`` each plus a fixed sin-cos position in decoder width;
the target is the *un-normalized* video cut into tubelet patches laid out ``(p0 p1 p2) c`` and, with
``norm_pix_loss``, normalized per patch and channel (mean, unbiased std + 1e-6); the loss is MSE on the
reconstructed tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .vit import (
    PRESETS,
    VideoViT,
    VideoViTConfig,
    build_blocks,
    encoder_layer_index,
    gather_tokens,
    get_sinusoid_encoding_table,
    init_vit_weights,
    mask_to_ids,
    patch_tokens,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class MAEConfig:
    """Encoder + decoder + loss settings. ``pixel_mean/std`` undo the loader's normalization for the target."""

    encoder: VideoViTConfig = field(default_factory=VideoViTConfig)
    decoder_embed_dim: int = 384
    decoder_depth: int = 4
    decoder_num_heads: int = 6
    decoder_mlp_ratio: float = 4.0
    norm_pix_loss: bool = True
    pixel_mean: tuple[float, ...] | None = IMAGENET_MEAN  # None: inputs are already in target space
    pixel_std: tuple[float, ...] | None = IMAGENET_STD
    decoder_norm_eps: float | None = None  # decoder blocks; None = encoder.norm_eps (as HF)
    decoder_final_norm_eps: float = 1e-6  # HF hard-codes 1e-5 here

    def __post_init__(self) -> None:
        if (self.pixel_mean is None) != (self.pixel_std is None):
            raise ValueError("pixel_mean and pixel_std must both be set or both be None")
        if self.pixel_mean is not None and len(self.pixel_mean) != self.encoder.in_chans:
            raise ValueError(
                f"pixel_mean has {len(self.pixel_mean)} values for {self.encoder.in_chans} channels"
            )
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError("decoder_embed_dim must be divisible by decoder_num_heads")

    @classmethod
    def from_preset(cls, name: str, **encoder_overrides: object) -> MAEConfig:
        """VideoMAE's pairing of encoder size and decoder (width/heads; depth 4, tiny: 2)."""
        if name not in MAE_DECODERS:
            raise KeyError(f"unknown preset {name!r}; choose from {sorted(MAE_DECODERS)}")
        dim, depth, heads = MAE_DECODERS[name]
        enc = VideoViTConfig.from_preset(name, **encoder_overrides)
        return cls(encoder=enc, decoder_embed_dim=dim, decoder_depth=depth, decoder_num_heads=heads)


# decoder (width, depth, heads) per encoder preset, as in VideoMAE / VideoMAE V2.
MAE_DECODERS: dict[str, tuple[int, int, int]] = {
    "tiny": (32, 1, 2),
    "vit-s": (192, 4, 3),
    "vit-b": (384, 4, 6),
    "vit-l": (512, 4, 8),
    "vit-h": (640, 4, 8),
    "vit-g": (512, 4, 8),
}
assert set(MAE_DECODERS) == set(PRESETS)


@dataclass
class MAEOutput:
    """``pred``/``target`` are ``[B, M, tubelet·p·p·C]`` for the M reconstructed tokens ``pred_ids_BM``."""

    loss: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor  # [B, N] encoder mask (True = hidden)
    pred_ids: torch.Tensor  # [B, M] token index of each prediction
    loss_weight: torch.Tensor  # [B, M] 1.0 where the token counts in the loss


def patchify(video_BCTHW: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """``[B, C, T, H, W]`` → ``[B, N, tubelet·p·p, C]`` in (t, h, w) token order (HF's target layout)."""
    return rearrange(
        video_BCTHW, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c", p0=tubelet, p1=patch, p2=patch
    )


def unpatchify(
    patches_BNPC: torch.Tensor, grid: tuple[int, int, int], tubelet: int, patch: int
) -> torch.Tensor:
    t, h, w = grid
    return rearrange(
        patches_BNPC,
        "b (t h w) (p0 p1 p2) c -> b c (t p0) (h p1) (w p2)",
        t=t,
        h=h,
        w=w,
        p0=tubelet,
        p1=patch,
        p2=patch,
    )


def _pixel_space(video_BCTHW: torch.Tensor, cfg: MAEConfig) -> torch.Tensor:
    if cfg.pixel_mean is None:
        return video_BCTHW
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(cfg.pixel_mean, dtype=video_BCTHW.dtype, device=video_BCTHW.device).view(shape)
    std = torch.tensor(cfg.pixel_std, dtype=video_BCTHW.dtype, device=video_BCTHW.device).view(shape)
    return video_BCTHW * std + mean


def _patch_stats(patches_BNPC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = patches_BNPC.mean(dim=-2, keepdim=True)
    std = patches_BNPC.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6
    return mean, std


@torch.no_grad()
def patch_targets(patches_BMP: torch.Tensor, cfg: MAEConfig) -> torch.Tensor:
    """Targets ``[B, M, tubelet·p·p·C]`` ``(p0 p1 p2) c`` of the tokens whose pixels are ``patches_BMP``
    (``patch_tokens`` rows, ``(c p0 p1 p2)``, in the loader's normalized space): back to pixel space, then
    (``norm_pix_loss``) normalized per patch and channel with the mean and unbiased std + 1e-6 (HF's)."""
    b, m, _ = patches_BMP.shape
    x_BMCP = patches_BMP.reshape(b, m, cfg.encoder.in_chans, -1)
    if cfg.pixel_mean is not None:  # the same per-element affine map as _pixel_space
        mean_C1 = torch.tensor(cfg.pixel_mean, dtype=x_BMCP.dtype, device=x_BMCP.device)[:, None]
        std_C1 = torch.tensor(cfg.pixel_std, dtype=x_BMCP.dtype, device=x_BMCP.device)[:, None]
        x_BMCP = x_BMCP * std_C1 + mean_C1
    if cfg.norm_pix_loss:  # two passes over contiguous rows, in place on our own copy
        x_BMCP = x_BMCP - x_BMCP.mean(dim=-1, keepdim=True)
        n = x_BMCP.shape[-1]
        std_BMC1 = torch.linalg.vector_norm(x_BMCP, dim=-1, keepdim=True) / math.sqrt(n - 1) + 1e-6
        x_BMCP.div_(std_BMC1)
    return x_BMCP.transpose(-1, -2).reshape(b, m, -1)


@torch.no_grad()
def compute_targets(
    video_BCTHW: torch.Tensor, cfg: MAEConfig, ids_BM: torch.Tensor | None = None
) -> torch.Tensor:
    """Targets ``[B, M, tubelet·p·p·C]`` of tokens ``ids_BM`` (all N tokens when None)."""
    enc = cfg.encoder
    patches_BNP = patch_tokens(video_BCTHW, enc.tubelet_size, enc.patch_size)
    return patch_targets(patches_BNP if ids_BM is None else gather_tokens(patches_BNP, ids_BM), cfg)


class MAEDecoder(nn.Module):
    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        eps = cfg.encoder.norm_eps if cfg.decoder_norm_eps is None else cfg.decoder_norm_eps
        self.blocks = build_blocks(
            cfg.decoder_depth,
            cfg.decoder_embed_dim,
            cfg.decoder_num_heads,
            int(cfg.decoder_embed_dim * cfg.decoder_mlp_ratio),
            cfg.encoder.qkv_bias,
            0.0,
            cfg.encoder.layer_scale_init,
            cfg.encoder.attn_impl,
            eps,
        )
        self.norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=cfg.decoder_final_norm_eps)
        self.head = nn.Linear(cfg.decoder_embed_dim, cfg.encoder.patch_dim)

    def forward(self, tokens_BND: torch.Tensor, num_pred: int) -> torch.Tensor:
        """Predictions for the last ``num_pred`` tokens; the last block computes only those rows."""
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            tokens_BND = block(tokens_BND, keep_last=num_pred) if i == last else block(tokens_BND)
        return self.head(self.norm(tokens_BND[:, tokens_BND.shape[1] - num_pred :]))


class MaskedVideoAutoencoder(nn.Module):
    """``forward(video_BCTHW, mask_BN, decoder_mask_BN=None) -> MAEOutput``.

    ``mask_BN``: True = hidden from the encoder. ``decoder_mask_BN`` (VideoMAE V2 dual masking):
    True = the decoder reconstructs that token; without it the decoder reconstructs every hidden token.
    With it, the loss covers tokens hidden from the encoder *and* reconstructed by the decoder.
    """

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VideoViT(cfg.encoder)
        self.encoder_to_decoder = nn.Linear(cfg.encoder.embed_dim, cfg.decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        table = get_sinusoid_encoding_table(cfg.encoder.num_patches, cfg.decoder_embed_dim)
        self.register_buffer("decoder_pos_embed", table.to(torch.empty(0).device), persistent=False)
        self.decoder = MAEDecoder(cfg)
        self.encoder_to_decoder.apply(init_vit_weights)
        self.decoder.apply(init_vit_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    @property
    def num_layers_for_lr_decay(self) -> int:
        return self.cfg.encoder.depth + 2

    def layer_index(self, param_name: str) -> int:
        return encoder_layer_index(param_name, self.cfg.encoder.depth, "encoder.")

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def forward(
        self,
        video_BCTHW: torch.Tensor,
        mask_BN: torch.Tensor,
        decoder_mask_BN: torch.Tensor | None = None,
    ) -> MAEOutput:
        visible_ids_BK, masked_ids_BM = mask_to_ids(mask_BN)
        enc = self.cfg.encoder
        self.encoder.check_input(video_BCTHW)
        # one copy of the clip as token rows: the visible ones are embedded (a Linear on 10 % of the
        # tokens instead of a Conv3d over the clip), the reconstructed ones become the targets
        patches_BNP = patch_tokens(video_BCTHW, enc.tubelet_size, enc.patch_size)
        tokens_BKD = self.encoder.embed_patches(gather_tokens(patches_BNP, visible_ids_BK), visible_ids_BK)
        latent_BKD = self.encoder.forward_blocks(tokens_BKD)
        latent_BKd = self.encoder_to_decoder(latent_BKD)

        if decoder_mask_BN is None:
            pred_ids_BM = masked_ids_BM
        else:
            if decoder_mask_BN.shape != mask_BN.shape:
                raise ValueError("decoder_mask_BN must have the same shape as mask_BN")
            # ids of the decoded tokens (True ones), ascending: reuse mask_to_ids on the complement.
            _, pred_ids_BM = mask_to_ids(decoder_mask_BN)
        pos_1Nd = self.decoder_pos_embed.to(latent_BKd.dtype)
        x_vis = latent_BKd + gather_tokens(pos_1Nd, visible_ids_BK)
        x_pred = self.mask_token.to(latent_BKd.dtype) + gather_tokens(pos_1Nd, pred_ids_BM)
        pred_BMP = self.decoder(torch.cat([x_vis, x_pred], dim=1), pred_ids_BM.shape[1])

        # targets of the reconstructed tokens only; the loss is MSE over the hidden ones among them
        target_BMP = patch_targets(gather_tokens(patches_BNP, pred_ids_BM), self.cfg).to(pred_BMP.dtype)
        if decoder_mask_BN is None:  # every reconstructed token is hidden: plain MSE, one fused kernel
            weight_BM = torch.ones(pred_ids_BM.shape, dtype=pred_BMP.dtype, device=pred_BMP.device)
            loss = F.mse_loss(pred_BMP, target_BMP)
        else:
            weight_BM = torch.gather(mask_BN, 1, pred_ids_BM).to(pred_BMP.dtype)
            err_BM = (pred_BMP - target_BMP).pow(2).mean(dim=-1)
            loss = (err_BM * weight_BM).sum() / weight_BM.sum().clamp_min(1.0)
        return MAEOutput(loss, pred_BMP, target_BMP, mask_BN, pred_ids_BM, weight_BM)


@dataclass
class ReconstructionFrames:
    """Pixel-space videos ``[B, C, T, H, W]`` for visualization."""

    original: torch.Tensor
    masked: torch.Tensor  # hidden tokens filled with ``fill`` (grey by default)
    reconstruction: torch.Tensor  # visible tokens from the input, hidden ones from the prediction


@torch.no_grad()
def reconstruct_video(
    output: MAEOutput, video_BCTHW: torch.Tensor, cfg: MAEConfig, fill: float = 0.5
) -> ReconstructionFrames:
    """Paste predictions back into the clip, undoing norm-pix with each patch's own statistics."""
    enc = cfg.encoder
    patches_BNPC = patchify(_pixel_space(video_BCTHW.float(), cfg), enc.tubelet_size, enc.patch_size)
    pred_BMPC = rearrange(output.pred.float(), "b m (p c) -> b m p c", c=enc.in_chans)
    ids_BM = output.pred_ids
    if cfg.norm_pix_loss:
        mean, std = _patch_stats(patches_BNPC)
        idx = ids_BM[:, :, None, None]
        pred_BMPC = pred_BMPC * torch.gather(std, 1, idx.expand(-1, -1, *std.shape[2:])) + torch.gather(
            mean, 1, idx.expand(-1, -1, *mean.shape[2:])
        )
    idx_full = ids_BM[:, :, None, None].expand(-1, -1, *patches_BNPC.shape[2:])
    recon_BNPC = patches_BNPC.scatter(1, idx_full, pred_BMPC)
    hidden_BN11 = output.mask[:, :, None, None]
    masked_BNPC = torch.where(hidden_BN11, torch.full_like(patches_BNPC, fill), patches_BNPC)
    # tokens hidden from the encoder but not decoded (dual masking) stay grey in the reconstruction.
    decoded_BN = torch.zeros_like(output.mask).scatter(1, ids_BM, True)
    recon_BNPC = torch.where(hidden_BN11 & ~decoded_BN[:, :, None, None], masked_BNPC, recon_BNPC)
    grid, t, p = enc.grid_size, enc.tubelet_size, enc.patch_size
    recon = unpatchify(recon_BNPC, grid, t, p)
    if cfg.pixel_mean is not None:  # pixel space is [0, 1]: clip the predictions' overshoot
        recon = recon.clamp(0, 1)
    return ReconstructionFrames(
        original=unpatchify(patches_BNPC, grid, t, p),
        masked=unpatchify(masked_BNPC, grid, t, p),
        reconstruction=recon,
    )


def replace_encoder(cfg: MAEConfig, **encoder_overrides: object) -> MAEConfig:
    """Copy of ``cfg`` with encoder fields replaced (e.g. ``attn_impl="math"``)."""
    return dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, **encoder_overrides))
