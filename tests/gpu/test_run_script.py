"""`bash tests/gpu/run.sh` on a machine without CUDA: it runs up to the first CUDA-only step (dependencies,
imports, the parity shards) and exits 0 with a SKIP line, so the one-call GPU check is known to start
cleanly before a GPU is ever lent. In the default run (not marked gpu)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def test_run_sh_without_cuda_skips_after_the_cpu_steps() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: run `bash tests/gpu/run.sh` itself")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run(
        ["bash", str(REPO / "tests" / "gpu" / "run.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "parity shards: {'h264': 8, 'vp9': 8} clips" in r.stdout  # the CPU part ran
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("SKIP tests/gpu/run.sh: CUDA is not available"), last
