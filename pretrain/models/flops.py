"""Analytic FLOPs of the masked autoencoder, for throughput / MFU reporting.

Convention (the one ``torch.utils.flop_counter`` and the MFU literature use): a matmul of [m,k]×[k,n]
costs 2·m·k·n FLOPs (multiply + add); counted are all Linear layers, the tubelet Conv3d, and the two
attention matmuls QKᵀ and AV. Norms, softmax, GELU, biases and the loss are ignored (<1% at ViT sizes).
Training = 3 × forward (backward costs two matmuls per forward matmul), without activation recompute.
"""

from __future__ import annotations

from .mae import MAEConfig


def _blocks_flops(n_tokens: int, dim: int, hidden: int, depth: int) -> int:
    linear = 2 * n_tokens * dim * (3 * dim + dim + 2 * hidden)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * n_tokens * n_tokens * dim  # QKᵀ and AV over all heads
    return depth * (linear + attention)


def forward_flops_per_clip(
    cfg: MAEConfig, mask_ratio: float = 0.9, decoder_keep_ratio: float | None = None
) -> int:
    """Forward FLOPs of one clip: embedding (all tokens) + encoder (visible) + decoder + head.

    ``decoder_keep_ratio``: fraction of all tokens the decoder reconstructs with dual masking
    (VideoMAE V2 running cell: 0.5); None = every masked token (VideoMAE).
    """
    enc = cfg.encoder
    n = enc.num_patches
    n_masked = round(n * mask_ratio)
    n_vis = n - n_masked
    n_pred = n_masked if decoder_keep_ratio is None else round(n * decoder_keep_ratio)
    dd = cfg.decoder_embed_dim
    embed = 2 * n * enc.patch_dim * enc.embed_dim
    encoder = _blocks_flops(n_vis, enc.embed_dim, enc.mlp_hidden_dim, enc.depth)
    to_decoder = 2 * n_vis * enc.embed_dim * dd
    decoder = _blocks_flops(n_vis + n_pred, dd, int(dd * cfg.decoder_mlp_ratio), cfg.decoder_depth)
    head = 2 * n_pred * dd * enc.patch_dim
    return embed + encoder + to_decoder + decoder + head


def training_flops_per_clip(
    cfg: MAEConfig, mask_ratio: float = 0.9, decoder_keep_ratio: float | None = None
) -> int:
    """3 × forward: the standard fwd+bwd estimate (activation recompute not included)."""
    return 3 * forward_flops_per_clip(cfg, mask_ratio, decoder_keep_ratio)
