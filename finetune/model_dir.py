"""The model directory, the one artifact every job after training reads: write it (PEFT merged where
possible), and open it once for inference (`open_model_dir` → the classifier, its head, its eval sampling).

A directory is the tubelet model format (`model.safetensors` + `config.json`, loadable with
`pretrain.models.load_model`) or an HF `VideoMAEForVideoClassification` directory. Methods whose trained
parameters cannot be folded into the plain architecture (adapter: a non-linear bottleneck; prompt: extra
tokens) additionally get `peft_sidecar.safetensors` + `peft.json`; `load_model` alone then returns the model
WITHOUT them (config.json's extra.finetune.merged is false and says so); `load_finetuned` re-applies them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data_shards import storage
from finetune.config import FinetuneSection
from finetune.heads import Head, head_of
from finetune.peft_methods import MERGEABLE, SIDECAR_CONFIG, SIDECAR_NAME, apply_method, plain_state_dict
from pretrain.models import load_model, save_model
from pretrain.models.io import build_model, input_geometry, is_classifier, load_state_dict_strict


@dataclass
class OpenModel:
    """A model directory opened for inference: the frozen classifier in eval mode on its device, what
    config.json records beside the weights (`extra`), its head, its eval sampling and its label names."""

    path: Path
    model: nn.Module
    extra: dict[str, Any]
    head: Head
    spec: Any  # data_shards.loader.SamplingSpec
    labels: list[str]

    @property
    def geometry(self) -> tuple[int, int]:
        """(frames, size) the model takes."""
        return input_geometry(self.model.cfg)


def open_model_dir(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    clips: int | None = None,
    crops: int | None = None,
    stride: int | None = None,
) -> OpenModel:
    """The one model loader of evaluate, predict, serve, embed, continual and the MLflow model. `clips` /
    `crops` / `stride` override the exported test sampling. A URL is fetched once into the local cache."""
    p = storage.local_copy(path, "models")
    model = load_finetuned(p, map_location=str(device))
    extra = model_extra(p)
    cfg = model.cfg
    labels = list(cfg.class_names or [str(i) for i in range(cfg.num_classes)])
    return OpenModel(
        p, model, extra, head_of(extra), sampling_for(model, extra, clips, crops, stride), labels
    )


def export_model_dir(
    model: nn.Module,
    clf_cfg: Any,  # VideoClassifierConfig | BackboneClassifierConfig
    spec: FinetuneSection,
    out_dir: Path,
    extra: dict[str, Any],
) -> Path:
    """`model` (the training architecture, method applied; merged in place for peft) → model directory."""
    plain, sidecar = plain_state_dict(model, spec)
    base = build_model(clf_cfg)
    load_state_dict_strict(base, plain, f"fine-tuned {spec.method} model")
    merged = spec.method in MERGEABLE
    info = dict(extra.get("finetune", {}))
    info["merged"] = merged
    if not merged:
        info["note"] = (
            f"method {spec.method} cannot be merged into plain weights: its parameters are in {SIDECAR_NAME}; "
            "load with finetune.model_dir.load_finetuned (load_model alone gives the model without them)"
        )
    out = save_model(base, out_dir, {**extra, "finetune": info})
    for stale in (SIDECAR_NAME, SIDECAR_CONFIG):
        (out / stale).unlink(missing_ok=True)
    if sidecar:
        save_file(sidecar, str(out / SIDECAR_NAME))
        storage.plain_mode(out / SIDECAR_NAME)
        (out / SIDECAR_CONFIG).write_text(json.dumps(spec.to_json(), indent=1) + "\n")
    return out


def load_finetuned(path: str | Path, map_location: str = "cpu") -> nn.Module:
    """A classifier from a model directory: tubelet format (`load_model`, plus the adapters / prompts of an
    unmerged method when there is a sidecar) or an HF `VideoMAEForVideoClassification` directory."""
    p = Path(path)
    meta = json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else {}
    if meta and "architecture" not in meta:  # HF save_pretrained layout
        from pretrain.models.hf import from_hf

        model = from_hf(p)
    else:
        model = load_model(p)
    if not is_classifier(model):
        raise ValueError(
            f"{p} holds a {type(model).__name__}, not a classifier: fine-tune it first (python -m finetune)"
        )
    if (p / SIDECAR_CONFIG).is_file():
        spec = FinetuneSection(**json.loads((p / SIDECAR_CONFIG).read_text()))
        apply_method(model, spec)
        extra = load_file(str(p / SIDECAR_NAME))
        _, unexpected = model.load_state_dict(extra, strict=False)
        added = {k for k in model.state_dict() if ".adapter." in k or k.startswith("prompt.")}
        if unexpected or added - set(extra):
            raise ValueError(
                f"{p / SIDECAR_NAME}: unexpected {unexpected}, missing {sorted(added - set(extra))}"
            )
    for q in model.parameters():
        q.requires_grad_(False)
    return model.eval().to(map_location)


def model_extra(path: str | Path) -> dict[str, Any]:
    """The "extra" block of a model directory's config.json (sampling, finetune info), {} if none."""
    f = Path(path) / "config.json"
    meta = json.loads(f.read_text()) if f.is_file() else {}
    if "architecture" not in meta:  # an HF directory exported by tubelet keeps it in tubelet_extra
        from pretrain.models.hf import stored_extra

        return stored_extra(path) if f.is_file() else {}
    return meta.get("extra", {}) or {}


def sampling_for(
    model: torch.nn.Module, extra: dict[str, Any], clips: int | None, crops: int | None, stride: int | None
) -> Any:
    """The eval SamplingSpec of a model directory, resolved once for every inference path (evaluate, predict,
    serve, embed, the pyfunc model): its frames/size, training stride and normalisation, the exported test
    views unless `clips` / `crops` / `stride` say otherwise."""
    from data_shards.loader import SamplingSpec
    from pretrain.models.io import input_geometry

    s = extra.get("sampling", {})
    frames, size = input_geometry(model.cfg)
    defaults = SamplingSpec(frames=frames, size=size)  # a directory without sampling: the loader's defaults
    return SamplingSpec(
        frames=frames,
        stride=stride or int(s.get("stride", 4)),
        size=size,
        train=False,
        eval_clips=clips or int(s.get("test_clips", 1)),
        eval_crops=crops or int(s.get("test_crops", 1)),
        mean=tuple(s.get("mean", defaults.mean)),
        std=tuple(s.get("std", defaults.std)),
        audio=_audio_spec(extra.get("audio")),
    )


def _audio_spec(stored: dict[str, Any] | None) -> Any:
    """An audio-visual model's sound windows (`extra.audio`), or None for a video-only model."""
    from data_shards.loader.audio import AudioSpec

    if not stored:
        return None
    return AudioSpec(**{**stored, "offsets": tuple(stored.get("offsets", ()))})
