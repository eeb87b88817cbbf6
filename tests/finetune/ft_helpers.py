"""Helpers for the fine-tuning tests: start real `python -m finetune` runs (one process, or one per rank).

A module of its own (not conftest) so its name cannot clash with other test folders' conftest imports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
TINY = REPO / "finetune" / "configs" / "tiny_cpu.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MLFLOW_TRACKING_URI")
    }
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    return env


def ft_args(run_dir: Path, shards: Path, init: Path | None, *extra: str) -> list[str]:
    """tiny_cpu.yaml shrunk to a handful of steps, PyAV, no MLflow."""
    return [
        "--config",
        str(TINY),
        f"train.run_dir={run_dir}",
        f"data.shards={shards}",
        "data.backend=pyav",
        "data.num_workers=0",
        f"finetune.init={init if init else 'null'}",
        "train.steps=4",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "train.eval_every=0",
        "optim.warmup_steps=1",
        "tracking.enabled=false",
        *extra,
    ]


def run_cli(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "finetune", *args],
        env=base_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_ranks(args: list[str], world: int, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """One `python -m finetune` per rank with RANK/WORLD_SIZE/MASTER_* set (what torchrun does)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = base_env()
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [PY, "-m", "finetune", *args],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    out = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, ""))
    return out


def ok(result: subprocess.CompletedProcess | list[subprocess.CompletedProcess]) -> None:
    for r in result if isinstance(result, list) else [result]:
        assert r.returncode == 0, (
            f"exit {r.returncode}\n{(r.stdout or '')[-4000:]}\n{(r.stderr or '')[-4000:]}"
        )
