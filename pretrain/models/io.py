"""The model directory: ``model.safetensors`` + ``config.json``. The one serialization path for models.

``config.json`` records the architecture, task, preset and the full dataclass config, so
``load_model(dir)`` rebuilds the exact module without any other input. Reading a training run directory or
an HF directory as a starting point is `pretrain.sources` (this module knows neither checkpoints nor HF).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data_shards import storage

from ._config import config_from_dict, config_to_dict
from .backbones import BackboneClassifier, BackboneClassifierConfig
from .classifier import VideoClassifier, VideoClassifierConfig
from .cnn_rnn import CnnRnn, CnnRnnConfig
from .mae import MAEConfig, MaskedVideoAutoencoder
from .tada2d import TAda2D, TAda2DConfig
from .video_resnet import VideoResNet, VideoResNetConfig
from .vit import VideoViT, VideoViTConfig

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
RUN_MODEL_NAME = "model.json"  # a training run directory's architecture: config.json's content, no weights

# architecture name → (module class, config class, task)
ARCHITECTURES: dict[str, tuple[type[nn.Module], type, str]] = {
    "MaskedVideoAutoencoder": (MaskedVideoAutoencoder, MAEConfig, "pretrain"),
    "VideoClassifier": (VideoClassifier, VideoClassifierConfig, "classification"),
    "VideoViT": (VideoViT, VideoViTConfig, "encoder"),
    "BackboneClassifier": (BackboneClassifier, BackboneClassifierConfig, "classification"),
    "VideoResNet": (VideoResNet, VideoResNetConfig, "encoder"),
    "CnnRnn": (CnnRnn, CnnRnnConfig, "encoder"),
    "TAda2D": (TAda2D, TAda2DConfig, "encoder"),
}


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def architecture_of(cfg: Any) -> str:
    """The registered architecture a config dataclass builds."""
    for arch, (_, cfg_cls, _) in ARCHITECTURES.items():
        if type(cfg) is cfg_cls:
            return arch
    raise TypeError(
        f"no registered architecture takes a {type(cfg).__name__}; known: {sorted(ARCHITECTURES)}"
    )


def model_meta(cfg: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config.json``'s content for a model config (architecture, task, preset, the full config)."""
    arch = architecture_of(cfg)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "architecture": arch,
        "task": ARCHITECTURES[arch][2],
        "preset": getattr(getattr(cfg, "encoder", cfg), "preset", None),  # a classifier's: its encoder's
        "config": config_to_dict(cfg),
    }
    if hasattr(cfg, "class_names"):
        meta["class_names"] = cfg.class_names
    if extra:
        meta["extra"] = extra
    return meta


def build_model(cfg: Any) -> nn.Module:
    """The registered module a config describes (fresh weights): one constructor lookup for every caller."""
    return ARCHITECTURES[architecture_of(cfg)][0](cfg)


CLASSIFIERS = ("VideoClassifier", "BackboneClassifier")


def is_classifier(model_or_cfg: Any) -> bool:
    """Whether a module (or config) is one of the classifiers fine-tuning, evaluation and serving take."""
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    return architecture_of(cfg) in CLASSIFIERS


def input_geometry(cfg: Any) -> tuple[int, int]:
    """(frames, square size) a model's clips must have, whichever architecture (ViT: its encoder's)."""
    enc = getattr(cfg, "encoder", cfg)
    return int(enc.num_frames), int(enc.img_size)


def write_run_model(cfg: Any, run_dir: str | Path) -> Path:
    """Record a training run's architecture as ``<run_dir>/model.json`` (what `pretrain.sources` reads)."""
    path = Path(run_dir) / RUN_MODEL_NAME
    path.write_text(json.dumps(model_meta(cfg), indent=2) + "\n")
    return path


def save_model(model: nn.Module, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``out_dir``; returns the directory.

    ``extra`` (JSON-able) is stored under ``"extra"`` — e.g. the training step or data manifest hash.
    """
    model = _unwrap(model)
    arch = type(model).__name__
    if arch not in ARCHITECTURES:
        raise TypeError(f"save_model supports {sorted(ARCHITECTURES)}, got {arch}")
    meta = model_meta(model.cfg, extra)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # state_dict() of a checkpoint-wrapped model already has the plain key names (torch's hooks).
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt", "architecture": arch})
    storage.plain_mode(out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_model_config(path: str | Path) -> tuple[str, Any, dict[str, Any]]:
    """(architecture, dataclass config, raw JSON) of a model directory (or a run's ``model.json`` file)."""
    cfg_path = Path(path) if Path(path).is_file() else Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: not a tubelet model directory (see save_model)")
    meta = json.loads(cfg_path.read_text())
    arch = meta.get("architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{cfg_path}: unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}"
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version {meta['format_version']} is newer than this code")
    cfg = config_from_dict(ARCHITECTURES[arch][1], meta["config"])
    return arch, cfg, meta


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error naming every missing / unexpected key and shape clash."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if own[k].shape != state_dict[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"weights in {source} do not match {type(model).__name__}: "
            f"missing keys {missing}; unexpected keys {unexpected}; shape mismatches {shapes}"
        )
    model.load_state_dict(state_dict, strict=True)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the module described by ``path/config.json`` and load ``model.safetensors`` strictly."""
    arch, cfg, _ = read_model_config(path)
    module_cls = ARCHITECTURES[arch][0]
    model = module_cls(cfg)
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    load_state_dict_strict(model, load_file(str(weights)), str(weights))
    return model.to(map_location)
