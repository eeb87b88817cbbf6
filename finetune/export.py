"""Fine-tuned model directories: write (peft merged where possible), load back, export to HF.

A directory is the tubelet model format (`model.safetensors` + `config.json`, loadable with
`pretrain.models.load_model`). Methods whose trained parameters cannot be folded into the plain
architecture (adapter: a non-linear bottleneck; prompt: extra tokens) additionally get
`peft_sidecar.safetensors` + `peft.json`; `load_model` alone then returns the model WITHOUT them
(config.json's extra.finetune.merged is false and says so); `load_finetuned` re-applies them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from finetune.config import FinetuneSection
from finetune.peft_methods import MERGEABLE, SIDECAR_CONFIG, SIDECAR_NAME, apply_method, plain_state_dict
from pretrain.models import VideoClassifier, load_model, save_model
from pretrain.models.io import build_model, is_classifier, load_state_dict_strict


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
            "load with finetune.export.load_finetuned (load_model alone gives the model without them)"
        )
    out = save_model(base, out_dir, {**extra, "finetune": info})
    for stale in (SIDECAR_NAME, SIDECAR_CONFIG):
        (out / stale).unlink(missing_ok=True)
    if sidecar:
        save_file(sidecar, str(out / SIDECAR_NAME))
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
