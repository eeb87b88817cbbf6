"""Weight surgery: a starting point's weights (`pretrain.sources.load_source`) into a fresh classifier.

Expected gaps (new head, fc_norm, the MAE decoder, the encoder's final norm, the parameters a PEFT method
adds) are listed with their reason; any other missing encoder weight or shape clash is an error naming
the keys. Works on the classifier *after* a method was applied: peft keeps the original layer as
`.base_layer`, so names are matched with that segment removed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from finetune.peft_methods import is_method_param
from pretrain.engine import ConfigError
from pretrain.sources import Source

_EXPECTED_NEW = {
    "head.": "new classification head",
    "fc_norm.": "new pooling norm (VideoMAE: mean pooling + fc_norm replaces the encoder's final norm)",
    "audio.": "new audio branch (audio-visual sync: the sound's encoder and its fusion with the picture)",
}
_EXPECTED_DROPPED = {
    "decoder.": "MAE decoder (pretraining only)",
    "encoder_to_decoder.": "MAE encoder→decoder projection (pretraining only)",
    "mask_token": "MAE mask token (pretraining only)",
    "encoder.norm.": "encoder final norm (the classifier mean-pools and normalises with fc_norm)",
}


def classifier_weights(src: Source) -> dict[str, torch.Tensor]:
    """The source's weights in classifier key names (a bare encoder gains the `encoder.` prefix)."""
    assert src.state_dict is not None, "load_source(), not read_source(), gives weights"
    if src.architecture == "VideoViT":
        return {f"encoder.{k}": v for k, v in src.state_dict.items()}
    return dict(src.state_dict)


def _explain(keys: list[str], table: dict[str, str]) -> tuple[dict[str, list[str]], list[str]]:
    """Split `keys` into {reason: keys} for those a table prefix explains, and the rest."""
    known: dict[str, list[str]] = {}
    other = []
    for k in keys:
        why = next((w for p, w in table.items() if k.startswith(p)), None)
        if why is None:
            other.append(k)
        else:
            known.setdefault(why, []).append(k)
    return known, other


def load_init_weights(model: nn.Module, src: Source) -> dict[str, Any]:
    """Copy `src`'s weights into `model` (a classifier, method applied); returns what was (not) loaded."""
    weights = classifier_weights(src)
    in_model = {k.replace(".base_layer", ""): k for k in model.state_dict() if not is_method_param(k)}
    own = {plain: model.state_dict()[k] for plain, k in in_model.items()}
    head_dropped = []
    for k in ("head.weight", "head.bias"):
        if k in weights and k in own and weights[k].shape != own[k].shape:
            head_dropped.append(f"{k}: {tuple(weights[k].shape)} → {tuple(own[k].shape)}")
            weights.pop(k)
    shapes = [
        f"{k}: source {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in weights.items()
        if k in own and v.shape != own[k].shape
    ]
    new, bad_missing = _explain(sorted(set(own) - set(weights)), _EXPECTED_NEW)
    dropped, bad_unexpected = _explain(sorted(set(weights) - set(own)), _EXPECTED_DROPPED)
    if shapes or bad_missing:
        raise ConfigError(
            f"finetune.init={src.location}: its weights do not fit the classifier: shape mismatches {shapes}; "
            f"missing encoder weights {bad_missing}. Use an init with the same encoder architecture."
        )
    model.load_state_dict({in_model[k]: v for k, v in weights.items() if k in own}, strict=False)
    return {
        "source": src.location,
        "kind": src.kind,
        "architecture": src.architecture,
        "loaded": len([k for k in weights if k in own]),
        "expected_new": new,
        "expected_dropped": {w: len(ks) for w, ks in dropped.items()},
        "unexpected_other": bad_unexpected,
        "head_reinitialised": head_dropped,
    }


def format_init_report(r: dict[str, Any]) -> str:
    lines = [
        f"[finetune] init from {r['kind']} {r['source']} ({r['architecture']}): {r['loaded']} tensors loaded"
    ]
    for why, keys in r["expected_new"].items():
        lines.append(f"[finetune]   missing (expected, {why}): {', '.join(keys)}")
    for why, n in r["expected_dropped"].items():
        lines.append(f"[finetune]   not used (expected, {why}): {n} tensors")
    for item in r["head_reinitialised"]:
        lines.append(f"[finetune]   head re-initialised (class count differs): {item}")
    if r["unexpected_other"]:
        lines.append(f"[finetune]   WARNING unexpected keys ignored: {r['unexpected_other']}")
    return "\n".join(lines)
