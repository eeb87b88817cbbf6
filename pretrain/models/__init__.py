"""Video models: plain ``nn.Module``s (architecture only) plus their configs, masks, FLOPs and I/O."""

from .attention import Attention, attend, resolve_attn_impl
from .backbones import (
    BACKBONES,
    BackboneClassifier,
    BackboneClassifierConfig,
    backbone_config,
    backbone_param_table,
    build_backbone,
    count_backbone_parameters,
)
from .checkpointing import apply_activation_checkpointing, compile_model
from .classifier import VideoClassifier, VideoClassifierConfig
from .cnn_rnn import CNN_RNN_PRESETS, CnnRnn, CnnRnnConfig
from .flops import (
    backbone_forward_flops,
    classifier_forward_flops_per_clip,
    classifier_training_flops_per_clip,
    cnn_rnn_forward_flops,
    forward_flops_per_clip,
    training_flops_per_clip,
    video_resnet_forward_flops,
)
from .io import load_model, save_model
from .mae import MAE_DECODERS, MAEConfig, MAEOutput, MaskedVideoAutoencoder, reconstruct_video
from .masking import keyed_mask, make_mask, random_mask, running_cell_mask, tube_mask
from .tada2d import TADA2D_PRESETS, TAda2D, TAda2DConfig
from .torchvision_io import (
    classifier_from_torchvision,
    from_torchvision_state_dict,
    tada2d_from_resnet_state_dict,
    to_torchvision_state_dict,
)
from .video_resnet import VIDEO_RESNET_PRESETS, VideoResNet, VideoResNetConfig
from .vit import PRESETS, VideoViT, VideoViTConfig, count_parameters, param_count_table

__all__ = [
    "BACKBONES",
    "CNN_RNN_PRESETS",
    "MAE_DECODERS",
    "PRESETS",
    "TADA2D_PRESETS",
    "VIDEO_RESNET_PRESETS",
    "Attention",
    "BackboneClassifier",
    "BackboneClassifierConfig",
    "CnnRnn",
    "CnnRnnConfig",
    "MAEConfig",
    "MAEOutput",
    "MaskedVideoAutoencoder",
    "TAda2D",
    "TAda2DConfig",
    "VideoClassifier",
    "VideoClassifierConfig",
    "VideoResNet",
    "VideoResNetConfig",
    "VideoViT",
    "VideoViTConfig",
    "apply_activation_checkpointing",
    "attend",
    "backbone_config",
    "backbone_forward_flops",
    "backbone_param_table",
    "build_backbone",
    "classifier_forward_flops_per_clip",
    "classifier_from_torchvision",
    "classifier_training_flops_per_clip",
    "cnn_rnn_forward_flops",
    "compile_model",
    "count_backbone_parameters",
    "count_parameters",
    "forward_flops_per_clip",
    "from_torchvision_state_dict",
    "keyed_mask",
    "load_model",
    "make_mask",
    "param_count_table",
    "random_mask",
    "reconstruct_video",
    "resolve_attn_impl",
    "running_cell_mask",
    "save_model",
    "tada2d_from_resnet_state_dict",
    "to_torchvision_state_dict",
    "training_flops_per_clip",
    "tube_mask",
    "video_resnet_forward_flops",
]
