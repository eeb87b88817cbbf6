"""The parts of tests/gpu/verify.py that also run without CUDA, so the one GPU call is known to work before
a GPU is lent: the ours-vs-HF masked-video step (issue 28) on a tiny model. In the default run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _verify() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_verify", REPO / "tests" / "gpu" / "verify.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_verify", module)
    spec.loader.exec_module(module)
    return module


def test_mae_vs_hf_step_on_cpu_agrees_and_reports_ratios() -> None:
    pytest.importorskip("transformers")
    got = _verify().mae_vs_hf("tiny", batch=2, steps=1, frames=4, size=32, device="cpu")
    ours, hf = (float(x.split(":")[1]) for x in got["mae_loss_tiny"].split(","))
    assert abs(ours - hf) < 1e-3
    assert float(got["mae_vs_hf_tiny"]) > 0
    assert got["mae_hf_attn_tiny"] in ("sdpa", "eager")
