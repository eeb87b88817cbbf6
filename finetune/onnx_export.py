"""ONNX export of a model directory for non-Python runtimes, checked against onnxruntime.

`python -m finetune export RUN OUT --onnx` writes `OUT/model.onnx`: input `video` float [batch, 3, T, S, S]
(normalized as `config.json`'s extra.sampling says; the batch axis is dynamic), output `logits` [batch, K].
Attention is switched to the plain math formulation before export: the exported graph must not depend on
which fused kernel (SDPA, flash-attn) the exporting machine would pick, and flash-attn cannot be exported.
The check runs the ONNX graph in onnxruntime at two batch sizes (so a batch size baked in at export fails)
and prints the largest absolute logit difference against PyTorch. Needs the `onnx` extra
(`TUBELET_EXTRAS=dev,onnx bash launch/setup.sh`: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

ONNX_NAME = "model.onnx"
OPSET = 18
PARITY_ATOL = 1e-3  # fp32 logits; observed differences are ~1e-6


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"ONNX export needs {module}: install the onnx extra (TUBELET_EXTRAS=dev,onnx bash launch/setup.sh, "
            "or pip install -e '.[onnx]' in a checkout: onnx, onnxscript, onnxruntime)"
        ) from None


def export_onnx(model_dir: str | Path, out: str | Path | None = None) -> Path:
    """`model_dir` → ONNX (dynamo exporter, opset 18, dynamic batch), by default `model_dir/model.onnx`."""
    from finetune.model_dir import load_finetuned
    from pretrain.models.attention import Attention
    from pretrain.models.io import input_geometry

    _require("onnxscript")
    model = load_finetuned(model_dir)
    if getattr(model.cfg, "audio", None) is not None:
        raise ValueError(
            f"{model_dir} is an audio-visual model (video and sound in): the ONNX export takes video-only "
            "models; serve or predict the tubelet model directory"
        )
    for m in model.modules():
        if isinstance(m, Attention):
            m.attn_impl = "math"
    frames, size = input_geometry(model.cfg)
    example = torch.randn(2, 3, frames, size, size)
    path = Path(out) if out is not None else Path(model_dir) / ONNX_NAME
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        opset_version=OPSET,
        input_names=["video"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    return path


def check_parity(
    model_dir: str | Path, onnx_path: str | Path, batches: tuple[int, ...] = (1, 3)
) -> dict[str, Any]:
    """Run `onnx_path` in onnxruntime and the model in PyTorch on the same random clips at each batch size:
    {"max_abs_diff": {batch: diff}, "dynamic_batch": the input's batch axis is symbolic, "ok": ...}."""
    from finetune.model_dir import load_finetuned
    from pretrain.models.io import input_geometry

    ort = _require("onnxruntime")
    model = load_finetuned(model_dir)
    frames, size = input_geometry(model.cfg)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    dynamic = not isinstance(inp.shape[0], int)
    gen = torch.Generator().manual_seed(0)
    diffs: dict[int, float] = {}
    for b in batches if dynamic else (inp.shape[0],):  # a fixed batch axis runs at its one size only
        x = torch.randn(b, 3, frames, size, size, generator=gen)
        with torch.no_grad():
            ref = model(x).float().numpy()
        got = session.run(None, {inp.name: x.numpy()})[0]
        diffs[b] = float(np.abs(got - ref).max())
    return {
        "max_abs_diff": diffs,
        "dynamic_batch": dynamic,
        "ok": dynamic and max(diffs.values()) <= PARITY_ATOL,
    }
