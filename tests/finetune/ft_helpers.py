"""Helpers for the fine-tuning tests: start real `python -m finetune` runs (one process, or one per rank).

A module of its own (not conftest) so its name cannot clash with other test folders' conftest imports."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/procs.py
import procs
from procs import PY, REPO, base_env, free_port, ok  # noqa: F401

TINY = REPO / "finetune" / "configs" / "tiny_cpu.yaml"


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


def data_shards(*args: str) -> None:
    """`python -m data_shards ARGS` in this process (synth, build --workers 0): no interpreter start."""
    from data_shards.__main__ import main

    assert main(list(args)) == 0, args


def run_cli(
    args: list[str],
    timeout: int = 240,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    merge_output: bool = False,
) -> subprocess.CompletedProcess:
    """`python -m finetune ARGS` (environment: `base_env()` plus `env`); `merge_output`: stderr into stdout,
    in the order a terminal shows them."""
    return subprocess.run(
        [PY, "-m", "finetune", *args],
        env={**base_env(), **(env or {})},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
        text=True,
        timeout=timeout,
    )


def run_ranks(args: list[str], world: int, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """One `python -m finetune` per rank with RANK/WORLD_SIZE/MASTER_* set (what torchrun does)."""
    return procs.run_ranks(["-m", "finetune", *args], world, timeout=timeout)


# the reason (and HTTP status) each bad input of `video_inputs` must get
BAD_INPUTS = {
    "empty": ("empty", 400),
    "not_a_video": ("not_a_video", 415),
    "still_image": ("not_a_video", 415),
    "audio_only": ("no_video_stream", 422),
    "truncated_mp4": ("truncated", 422),
    "truncated_webm": ("truncated", 422),
}


@dataclass(frozen=True)
class Registry:
    """Two fine-tunes registered under one name in a sqlite MLflow store: `runs[0]` (300 steps from scratch:
    it learned the motion direction) is version 1, alias `champion`; `runs[1]` (4 steps more from its best
    model: a re-fine-tune) is version 2."""

    uri: str
    name: str
    runs: tuple[Path, Path]
    shards: Path


REGISTERED_NAME = "tubelet-test-clf"


def start_server(
    cmd: list[str], env: dict[str, str], log: Path, url: str, timeout: float = 180
) -> subprocess.Popen:
    """Start a server in its own process group and wait until `url` answers 200; on any failure the whole
    group is stopped (so no Ray cluster outlives a failed start) and the log tail is in the error."""
    import requests

    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(url, timeout=2).ok:
                    return proc
            except requests.RequestException:  # not listening yet, or still starting
                pass
            time.sleep(1)
        raise TimeoutError(f"no answer from {url} in {timeout} s:\n{log.read_text()[-4000:]}")
    except BaseException:
        stop_server(proc, 30)
        raise


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> int | None:
    """SIGINT (a clean stop), then SIGKILL to the process group if it is still there after `timeout`;
    returns the exit code of a clean stop, None when it had to be killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left (Ray workers of a killed driver)
    proc.wait(timeout=30)
    return code
