"""Video models: plain ``nn.Module``s (architecture only) plus their configs, masks, FLOPs and I/O."""

from .attention import Attention, attend, resolve_attn_impl
from .checkpointing import apply_activation_checkpointing
from .classifier import VideoClassifier, VideoClassifierConfig
from .flops import forward_flops_per_clip, training_flops_per_clip
from .io import load_model, save_model
from .mae import MAE_DECODERS, MAEConfig, MAEOutput, MaskedVideoAutoencoder, reconstruct_video
from .masking import make_mask, random_mask, running_cell_mask, tube_mask
from .vit import PRESETS, VideoViT, VideoViTConfig, count_parameters, param_count_table

__all__ = [
    "MAE_DECODERS",
    "PRESETS",
    "Attention",
    "MAEConfig",
    "MAEOutput",
    "MaskedVideoAutoencoder",
    "VideoClassifier",
    "VideoClassifierConfig",
    "VideoViT",
    "VideoViTConfig",
    "apply_activation_checkpointing",
    "attend",
    "count_parameters",
    "forward_flops_per_clip",
    "load_model",
    "make_mask",
    "param_count_table",
    "random_mask",
    "reconstruct_video",
    "resolve_attn_impl",
    "running_cell_mask",
    "save_model",
    "training_flops_per_clip",
    "tube_mask",
]
