"""torchvision checkpoints ⇄ :class:`BackboneClassifier` weights, by name. torchvision itself is never imported.

Our backbones use torchvision's module names, so conversion is a prefix: ``r3d_18`` / ``mc3_18`` /
``r2plus1d_18`` keys go under ``encoder.`` with ``fc`` becoming ``head``; ``resnet18`` (ImageNet) keys go under
``encoder.cnn.`` for the CNN+RNN, whose ``fc`` (1000 ImageNet classes) is dropped — its projection, RNN and
head are new. Every key and shape is checked against the model the config describes; mismatches are named.
"""

from __future__ import annotations

import torch

from .backbones import BackboneClassifier, BackboneClassifierConfig, backbone_config
from .cnn_rnn import CnnRnnConfig

_NEW_IN_CNN_RNN = ("encoder.proj.", "encoder.rnn.", "head.")


def torchvision_classifier_config(
    state_dict: dict[str, torch.Tensor], backbone: str, num_classes: int | None = None, **overrides: object
) -> BackboneClassifierConfig:
    """The 18-layer preset of ``backbone`` (with ``overrides``), classes from ``fc`` unless given."""
    if num_classes is None:
        if "fc.weight" not in state_dict:
            raise KeyError("no fc.weight in the state dict: pass num_classes")
        num_classes = int(state_dict["fc.weight"].shape[0])
    return BackboneClassifierConfig(
        backbone=backbone, encoder=backbone_config(backbone, None, **overrides), num_classes=num_classes
    )


def _expected_shapes(cfg: BackboneClassifierConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = BackboneClassifier(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def from_torchvision_state_dict(
    state_dict: dict[str, torch.Tensor], backbone: str, cfg: BackboneClassifierConfig | None = None
) -> dict[str, torch.Tensor]:
    """torchvision keys -> ``BackboneClassifier`` keys, checked strictly against ``cfg``.

    ``cfg`` defaults to :func:`torchvision_classifier_config`. For a video ResNet every model key must be
    provided; for ``cnn_rnn`` only the per-frame CNN's (projection, RNN and head keep their init).
    """
    cfg = cfg or torchvision_classifier_config(state_dict, backbone)
    if cfg.backbone != backbone:
        raise ValueError(f"cfg.backbone={cfg.backbone!r} but backbone={backbone!r}")
    is_cnn_rnn = isinstance(cfg.encoder, CnnRnnConfig)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if is_cnn_rnn:
            if not key.startswith("fc."):
                out[f"encoder.cnn.{key}"] = value
        else:
            out[f"head.{key[3:]}" if key.startswith("fc.") else f"encoder.{key}"] = value
    want = _expected_shapes(cfg)
    required = {k for k in want if not (is_cnn_rnn and k.startswith(_NEW_IN_CNN_RNN))}
    missing = sorted(required - set(out))
    unexpected = sorted(set(out) - set(want))
    shapes = [
        f"{k}: {tuple(out[k].shape)} vs model {want[k]}"
        for k in sorted(set(out) & set(want))
        if tuple(out[k].shape) != want[k]
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"torchvision weights do not match the {backbone} classifier: missing keys {missing}; "
            f"unexpected keys {unexpected}; shape mismatches {shapes}"
        )
    return out


def to_torchvision_state_dict(model: BackboneClassifier) -> dict[str, torch.Tensor]:
    """A video-ResNet classifier's weights in torchvision key names (``head`` -> ``fc``)."""
    if isinstance(model.cfg.encoder, CnnRnnConfig):
        raise ValueError("cnn_rnn has no torchvision counterpart (only its per-frame CNN: model.encoder.cnn)")
    out = {}
    for key, value in model.state_dict().items():
        out[f"fc.{key[5:]}" if key.startswith("head.") else key.removeprefix("encoder.")] = value
    return out


def classifier_from_torchvision(
    state_dict: dict[str, torch.Tensor], backbone: str, cfg: BackboneClassifierConfig | None = None
) -> BackboneClassifier:
    """A ``BackboneClassifier`` holding torchvision weights (``cnn_rnn``: only its frame CNN is loaded)."""
    cfg = cfg or torchvision_classifier_config(state_dict, backbone)
    model = BackboneClassifier(cfg)
    converted = from_torchvision_state_dict(state_dict, backbone, cfg)
    model.load_state_dict(converted, strict=not isinstance(cfg.encoder, CnnRnnConfig))
    return model


def tada2d_from_resnet_state_dict(
    state_dict: dict[str, torch.Tensor], model: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A 2-D ResNet's weights (torchvision ``resnet18`` / ``resnet50`` names, ``fc`` dropped) as a state dict
    of ``model`` (a ``TAda2D``, or a classifier holding one as ``encoder``), and the keys left at their init.

    Every 2-D key maps by name, except a TAda conv's kernel: ``layer1.0.conv1.weight`` becomes
    ``layer1.0.conv1.conv.weight``. What stays at its init is the routes (calibration 1), the temporal
    aggregations (0), so the loaded TAda2D computes the 2-D ResNet on every frame, and a classifier's head.
    Keys and shapes are checked.
    """
    own = model.state_dict()
    prefix = "encoder." if any(k.startswith("encoder.") for k in own) else ""
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue
        name = f"{prefix}{key}"
        tada = name.removesuffix(".weight") + ".conv.weight"
        target = tada if tada in own and name not in own else name
        if target in own:
            out[target] = value
        else:
            unexpected.append(key)
    shapes = [
        f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in out.items()
        if v.shape != own[k].shape
    ]
    left = sorted(set(own) - set(out))
    missing = [k for k in left if not _new_in_tada2d(k)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"2-D ResNet weights do not match the TAda2D: missing keys {missing}; unexpected keys {unexpected}; "
            f"shape mismatches {shapes}"
        )
    return {**own, **out}, left


def _new_in_tada2d(key: str) -> bool:
    return ".route." in key or ".agg" in key or key.startswith("head.")
