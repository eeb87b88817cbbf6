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
    return to_hf(model, out_dir, model_extra(model_dir))  # sampling kept: from-hf restores it
