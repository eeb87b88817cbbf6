"""Analytic FLOPs of the masked autoencoder and of the classifiers, for throughput / MFU reporting.

Convention (the one ``torch.utils.flop_counter`` and the MFU literature use): a matmul of [m,k]×[k,n]
costs 2·m·k·n FLOPs (multiply + add); counted are all Linear layers, the tubelet embedding (a Conv3d; in
the MAE a Linear on the visible tokens only) and the two attention matmuls QKᵀ and AV. Norms, softmax, GELU, biases and the loss are ignored (<1% at ViT sizes).
A conv costs 2·C_in·C_out·prod(kernel)·prod(output size); a GRU/LSTM step costs its input and recurrent
matmuls (3 or 4 gates). Dynamic convolutions add their route / attention MLPs and (kernel mixture) the mixing
of the K kernels per clip; pooling, softmax and the calibration's elementwise products are ignored. Training = 3 × forward (backward costs two matmuls per forward matmul), without
activation recompute.

``FlopCounterMode`` on CPU counts GRUs (they decompose into mm/addmm) but reports 0 for an LSTM, which
dispatches to oneDNN's fused RNN op; with ``torch.backends.mkldnn.flags(enabled=False)`` it decomposes
and matches ``rnn_forward_flops`` exactly (tests/models/test_video_cnn.py).
"""

from __future__ import annotations

import math

from .backbones import BackboneClassifierConfig
from .classifier import VideoClassifierConfig
from .cnn_rnn import CnnRnnConfig
from .dynamic_conv import mixture_width, route_width, select_width
from .mae import MAEConfig
from .tada2d import TAda2DConfig
from .video_resnet import VideoResNetConfig, block_mid_channels
from .vit import VideoViTConfig


def _blocks_flops(n_tokens: int, dim: int, hidden: int, depth: int, n_out: int | None = None) -> int:
    """``depth`` blocks over ``n_tokens``; with ``n_out`` the last one computes only ``n_out`` outputs
    (queries, projection and MLP of those rows; keys/values of all: the MAE decoder's last block)."""
    if n_out is not None and depth:
        last = (
            2 * n_tokens * dim * 3 * dim
            + 2 * n_out * dim * (dim + 2 * hidden)
            + 2 * 2 * n_out * n_tokens * dim
        )
        return _blocks_flops(n_tokens, dim, hidden, depth - 1) + last
    linear = 2 * n_tokens * dim * (3 * dim + dim + 2 * hidden)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * n_tokens * n_tokens * dim  # QKᵀ and AV over all heads
    return depth * (linear + attention)


def forward_flops_per_clip(
    cfg: MAEConfig, mask_ratio: float = 0.9, decoder_keep_ratio: float | None = None
) -> int:
    """Forward FLOPs of one clip: embedding + encoder (visible tokens) + decoder + head.

    ``decoder_keep_ratio``: fraction of all tokens the decoder reconstructs with dual masking
    (VideoMAE V2 running cell: 0.5); None = every masked token (VideoMAE).
    """
    enc = cfg.encoder
    n = enc.num_patches
    n_masked = round(n * mask_ratio)
    n_vis = n - n_masked
    n_pred = n_masked if decoder_keep_ratio is None else round(n * decoder_keep_ratio)
    dd = cfg.decoder_embed_dim
    embed = 2 * n_vis * enc.patch_dim * enc.embed_dim  # only the visible tokens are embedded
    encoder = _blocks_flops(n_vis, enc.embed_dim, enc.mlp_hidden_dim, enc.depth)
    to_decoder = 2 * n_vis * enc.embed_dim * dd
    hidden = int(dd * cfg.decoder_mlp_ratio)
    decoder = _blocks_flops(n_vis + n_pred, dd, hidden, cfg.decoder_depth, n_out=n_pred)
    head = 2 * n_pred * dd * enc.patch_dim
    return embed + encoder + to_decoder + decoder + head


def training_flops_per_clip(
    cfg: MAEConfig, mask_ratio: float = 0.9, decoder_keep_ratio: float | None = None
) -> int:
    """3 × forward: the standard fwd+bwd estimate (activation recompute not included)."""
    return 3 * forward_flops_per_clip(cfg, mask_ratio, decoder_keep_ratio)


# -- classifiers and CNN backbones ----------------------------------------------------------------------
# Same convention: every conv / linear / RNN matmul at 2·MACs; norms, activations, pooling, biases ignored.


def _out_len(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


class _ConvTally:
    """Walks a conv net's output shapes and adds 2·MACs per conv (the shape arithmetic of nn.ConvNd)."""

    def __init__(self) -> None:
        self.flops = 0

    def conv(
        self,
        shape: tuple[int, ...],
        c_in: int,
        c_out: int,
        k: tuple[int, ...],
        s: tuple[int, ...],
        p: tuple[int, ...],
    ) -> tuple[int, ...]:
        out = tuple(_out_len(n, kk, ss, pp) for n, kk, ss, pp in zip(shape, k, s, p))
        self.flops += 2 * c_in * c_out * math.prod(k) * math.prod(out)
        return out


def _block_conv(
    tally: _ConvTally,
    cfg: VideoResNetConfig,
    shape: tuple[int, ...],
    c_in: int,
    c_out: int,
    k: tuple[int, ...],
    s: tuple[int, ...],
    p: tuple[int, ...],
) -> tuple[int, ...]:
    """One block conv of a video ResNet, plain or dynamic (``cfg.dynamic``):

    kernel_mixture: the conv + mixing the K kernels (π_BK @ W_K·, 2·K·|W| per clip) + the attention MLP;
    selective_kernel (temporal extent > 1): one conv per temporal size + the selection MLP (fc, select)."""
    if cfg.dynamic == "selective_kernel" and k[0] > 1:
        d = select_width(c_out, cfg.dynamic_reduction)
        tally.flops += 2 * c_out * d + 2 * d * len(cfg.sk_kernels) * c_out
        outs = [tally.conv(shape, c_in, c_out, (kt, *k[1:]), s, (kt // 2, *p[1:])) for kt in cfg.sk_kernels]
        return outs[0]
    out = tally.conv(shape, c_in, c_out, k, s, p)
    if cfg.dynamic == "kernel_mixture":
        n_k, h = cfg.dynamic_kernels, mixture_width(c_in, cfg.dynamic_reduction)
        tally.flops += 2 * n_k * c_out * c_in * math.prod(k) + 2 * c_in * h + 2 * h * n_k
    return out


def _video_block(
    tally: _ConvTally,
    cfg: VideoResNetConfig,
    thw: tuple[int, ...],
    c_in: int,
    planes: int,
    kind: str,
    stride: int,
) -> tuple[int, ...]:
    mid = block_mid_channels(c_in, planes)
    out = thw
    for i, (a, b) in enumerate(((c_in, planes), (planes, planes))):
        st = stride if i == 0 else 1
        if kind == "3d":
            out = _block_conv(tally, cfg, out, a, b, (3, 3, 3), (st, st, st), (1, 1, 1))
        elif kind == "2d":
            out = _block_conv(tally, cfg, out, a, b, (1, 3, 3), (1, st, st), (0, 1, 1))
        else:
            out = _block_conv(tally, cfg, out, a, mid, (1, 3, 3), (1, st, st), (0, 1, 1))
            out = _block_conv(tally, cfg, out, mid, b, (3, 1, 1), (st, 1, 1), (1, 0, 0))
    if stride != 1 or c_in != planes:
        ds = (1, stride, stride) if kind == "2d" else (stride,) * 3
        tally.conv(thw, c_in, planes, (1, 1, 1), ds, (0, 0, 0))
    return out


def video_resnet_forward_flops(cfg: VideoResNetConfig) -> int:
    """Forward FLOPs of one clip through a video ResNet backbone (stem, stages; no head)."""
    tally = _ConvTally()
    thw: tuple[int, ...] = (cfg.num_frames, cfg.img_size, cfg.img_size)
    w = cfg.widths[0]
    if cfg.arch == "r2plus1d":
        thw = tally.conv(thw, cfg.in_chans, cfg.stem_mid_channels, (1, 7, 7), (1, 2, 2), (0, 3, 3))
        thw = tally.conv(thw, cfg.stem_mid_channels, w, (3, 1, 1), (1, 1, 1), (1, 0, 0))
    else:
        thw = tally.conv(thw, cfg.in_chans, w, (3, 7, 7), (1, 2, 2), (1, 3, 3))
    c_in = w
    for i, (planes, depth) in enumerate(zip(cfg.widths, cfg.depths)):
        for j in range(depth):
            stride = 2 if i > 0 and j == 0 else 1
            thw = _video_block(tally, cfg, thw, c_in, planes, cfg.conv_kind(i), stride)
            c_in = planes
    return tally.flops


def frame_resnet_forward_flops(cfg: CnnRnnConfig) -> int:
    """Forward FLOPs of the per-frame 2-D ResNet for *one frame* (conv1, stages; max pool ignored)."""
    tally = _ConvTally()
    hw = tally.conv((cfg.img_size,) * 2, cfg.in_chans, cfg.widths[0], (7, 7), (2, 2), (3, 3))
    hw = tuple(_out_len(n, 3, 2, 1) for n in hw)  # max pool
    c_in = cfg.widths[0]
    for i, (planes, depth) in enumerate(zip(cfg.widths, cfg.depths)):
        for j in range(depth):
            s = 2 if i > 0 and j == 0 else 1
            out = tally.conv(hw, c_in, planes, (3, 3), (s, s), (1, 1))
            out = tally.conv(out, planes, planes, (3, 3), (1, 1), (1, 1))
            if s != 1 or c_in != planes:
                tally.conv(hw, c_in, planes, (1, 1), (s, s), (0, 0))
            hw, c_in = out, planes
    return tally.flops


def _tada_route_flops(cfg: TAda2DConfig, c_in: int, c_out: int) -> int:
    """One TAda route over a clip: the context Linear once, the two temporal 1-D convs at every frame."""
    h, k, t = route_width(c_in, cfg.route_reduction), cfg.route_kernel, cfg.num_frames
    return 2 * c_in * c_in + 2 * t * k * h * (c_in + c_out)


def tada2d_forward_flops(cfg: TAda2DConfig) -> int:
    """Forward FLOPs of one clip through TAda2D: its 2-D convs on every frame + the routes (max pool and the
    calibration's elementwise product ignored)."""
    tally = _ConvTally()
    hw = tally.conv((cfg.img_size,) * 2, cfg.in_chans, cfg.widths[0], (7, 7), (2, 2), (3, 3))
    hw = tuple(_out_len(n, 3, 2, 1) for n in hw)  # max pool
    routes, c_in = 0, cfg.widths[0]
    for i, (planes, depth) in enumerate(zip(cfg.widths, cfg.depths)):
        for j in range(depth):
            s = 2 if i > 0 and j == 0 else 1
            c_out = planes * cfg.expansion
            if cfg.block == "bottleneck":
                out = tally.conv(hw, c_in, planes, (1, 1), (1, 1), (0, 0))
                out = tally.conv(out, planes, planes, (3, 3), (s, s), (1, 1))
                out = tally.conv(out, planes, c_out, (1, 1), (1, 1), (0, 0))
                routes += _tada_route_flops(cfg, planes, planes)
            else:
                out = tally.conv(hw, c_in, planes, (3, 3), (s, s), (1, 1))
                out = tally.conv(out, planes, planes, (3, 3), (1, 1), (1, 1))
                routes += _tada_route_flops(cfg, c_in, planes) + _tada_route_flops(cfg, planes, planes)
            if s != 1 or c_in != c_out:
                tally.conv(hw, c_in, c_out, (1, 1), (s, s), (0, 0))
            hw, c_in = out, c_out
    return cfg.num_frames * tally.flops + routes


def rnn_forward_flops(cfg: CnnRnnConfig) -> int:
    """Input and recurrent matmuls of the GRU (3 gates) / LSTM (4 gates), every layer, direction and step.

    Gate nonlinearities and elementwise updates are ignored like other activations (≈ 10·H per step).
    """
    gates = 3 if cfg.rnn == "gru" else 4
    total = 0
    for layer in range(cfg.layers):
        n_in = cfg.proj_dim if layer == 0 else cfg.feature_dim
        total += cfg.num_directions * 2 * cfg.num_frames * gates * cfg.hidden * (n_in + cfg.hidden)
    return total


def cnn_rnn_forward_flops(cfg: CnnRnnConfig) -> int:
    """Forward FLOPs of one clip through CNN+RNN: the frame CNN × T, the projection, the RNN."""
    proj = 2 * cfg.num_frames * cfg.cnn_dim * cfg.proj_dim
    return cfg.num_frames * frame_resnet_forward_flops(cfg) + proj + rnn_forward_flops(cfg)


def vit_encoder_forward_flops(enc: VideoViTConfig) -> int:
    """Forward FLOPs of one clip through the ViT encoder on all tokens (no masking)."""
    n = enc.num_patches
    return 2 * n * enc.patch_dim * enc.embed_dim + _blocks_flops(
        n, enc.embed_dim, enc.mlp_hidden_dim, enc.depth
    )


def backbone_forward_flops(cfg: VideoResNetConfig | CnnRnnConfig | TAda2DConfig | VideoViTConfig) -> int:
    """Forward FLOPs of one clip through any backbone, dispatched on its config type."""
    if isinstance(cfg, VideoResNetConfig):
        return video_resnet_forward_flops(cfg)
    if isinstance(cfg, TAda2DConfig):
        return tada2d_forward_flops(cfg)
    if isinstance(cfg, CnnRnnConfig):
        return cnn_rnn_forward_flops(cfg)
    if isinstance(cfg, VideoViTConfig):
        return vit_encoder_forward_flops(cfg)
    raise TypeError(f"no FLOPs formula for {type(cfg).__name__}")


def classifier_forward_flops_per_clip(cfg: BackboneClassifierConfig | VideoClassifierConfig) -> int:
    """Forward FLOPs of one clip through a classifier: backbone + head (ViT: mean pooling/fc_norm ignored)."""
    dim = cfg.encoder.embed_dim if isinstance(cfg, VideoClassifierConfig) else cfg.encoder.feature_dim
    return backbone_forward_flops(cfg.encoder) + 2 * dim * cfg.num_classes


def classifier_training_flops_per_clip(cfg: BackboneClassifierConfig | VideoClassifierConfig) -> int:
    """3 × forward (the first layer's input gradient, never computed, is over-counted)."""
    return 3 * classifier_forward_flops_per_clip(cfg)
