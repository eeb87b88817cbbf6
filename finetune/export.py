"""Exports of a model directory to other formats: Hugging Face `VideoMAEForVideoClassification` here, ONNX
in `onnx_export.py`."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.model_dir import model_extra
from finetune.peft_methods import SIDECAR_CONFIG
from pretrain.models import VideoClassifier, load_model


def export_hf(model_dir: str | Path, out_dir: str | Path) -> Path:
    """HF `VideoMAEForVideoClassification` layout of a merged (plain) model directory."""
    from pretrain.models.hf import to_hf

    if (Path(model_dir) / SIDECAR_CONFIG).is_file():
        raise ValueError(
            f"{model_dir} holds unmerged {json.loads((Path(model_dir) / SIDECAR_CONFIG).read_text())['method']} "
            "parameters (adapters / prompts): HF VideoMAE cannot express them; export the tubelet dir only"
        )
    model = load_model(model_dir)
    if not isinstance(model, VideoClassifier):
        raise ValueError(
            f"{model_dir} holds a {type(model).__name__} ({getattr(model.cfg, 'backbone', '?')}): HF VideoMAE can only "
            "express the ViT; use the tubelet model directory (evaluate, predict, serve and load_model read it)"
        )
    if model.cfg.audio is not None:
        raise ValueError(
            f"{model_dir} is an audio-visual model (it hears the clip's sound too): HF VideoMAE takes video "
            "only; use the tubelet model directory"
        )
    if model.cfg.temporal:
        raise ValueError(
            f"{model_dir} is a temporal model (a class per time step): HF VideoMAEForVideoClassification has one "
            "prediction per clip; use the tubelet model directory"
        )
    extra = model_extra(model_dir)
    out = to_hf(model, out_dir, extra)  # sampling kept: from-hf restores it
    if extra.get("head") == "multi_label":  # HF then scores with a sigmoid per label, as we do
        config = json.loads((out / "config.json").read_text())
        config["problem_type"] = "multi_label_classification"
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
