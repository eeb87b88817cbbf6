"""Starting real multi-process runs from tests: free ports, a clean CPU environment, one process per rank.

Shared by the engine and fine-tuning suites (imported by path: `tests/` is not a package).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    """The test process's environment minus rank variables and MLflow URI (tests pick their store)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    return env


def run_ranks(
    python_args: list[str],
    world: int,
    *,
    timeout: int = 300,
    cwd: Path | None = None,
    rank_env: Callable[[int], dict[str, str]] | None = None,
    rank_cwd: Callable[[int], Path] | None = None,
) -> list[subprocess.CompletedProcess]:
    """`python PYTHON_ARGS` once per rank with RANK/WORLD_SIZE/MASTER_* set (what torchrun does), all waited for.
    `rank_env` / `rank_cwd`: a rank's own variables and working directory (machines that share nothing)."""
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
            **(rank_env(rank) if rank_env else {}),
        )
        procs.append(
            subprocess.Popen(
                [PY, *python_args],
                env=env,
                cwd=rank_cwd(rank) if rank_cwd else cwd or REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return wait_all(procs, timeout)


def wait_all(procs: list[subprocess.Popen], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Each process's exit and output (stdout with stderr merged); one that hangs kills them all."""
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
