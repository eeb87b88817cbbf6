"""Starting real multi-process runs from tests: free ports, a clean CPU environment, one process per rank.

Shared by the engine and fine-tuning suites (imported by path: `tests/` is not a package).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def free_port() -> int:
    """A port nothing listens on, below the kernel's ephemeral range (32768+): a port from bind(0) can be handed
    to another process's outgoing connection before a rank binds it (then the ranks wait for a rendezvous
    that never comes)."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


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


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@contextlib.contextmanager
def ray_head(env: dict[str, str]) -> Iterator[tuple[str, dict[str, str]]]:
    """A one-CPU `ray start --head` cluster on 127.0.0.1 with `env` (its workers inherit it); yields its
    address and the environment a client needs. `--block` keeps the head in its own process group, so
    stopping it touches nothing else (`ray stop` would kill this process's own Ray too)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # AF_UNIX socket paths must stay under 107 bytes
    env = {**env, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
    port = str(free_port())
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", port,
         "--num-cpus", "1", "--include-dashboard", "false", "--temp-dir", ray_tmp],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_port(int(port))
        yield f"127.0.0.1:{port}", env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
