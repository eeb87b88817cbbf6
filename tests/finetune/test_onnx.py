"""ONNX export (the optional `onnx` extra): the graph runs in onnxruntime with the model's logits at two batch
sizes (the batch axis stays dynamic). Skipped where the extra is not installed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_onnx_export_matches_pytorch_with_a_dynamic_batch(tiny_classifier: Path, tmp_path: Path) -> None:
    from finetune.onnx_export import PARITY_ATOL, check_parity, export_onnx

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_classifier, model_dir)
    path = export_onnx(model_dir)
    assert path == model_dir / "model.onnx" and path.stat().st_size > 100_000
    r = check_parity(model_dir, path, batches=(1, 3))
    assert r["dynamic_batch"] and r["ok"], r
    assert set(r["max_abs_diff"]) == {1, 3} and max(r["max_abs_diff"].values()) < PARITY_ATOL
