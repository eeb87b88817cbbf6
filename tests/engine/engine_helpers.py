"""Helpers for the engine tests: start real training processes (bash launcher, `deepspeed` launcher, or one
process per rank with torch env vars). A module of its own, not conftest, so imports are unambiguous."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/procs.py
import procs
from procs import PY, REPO, base_env, free_port, ok  # noqa: F401

TINY = REPO / "pretrain" / "configs" / "tiny_cpu.yaml"
WORKER = Path(__file__).with_name("_worker.py")


def tiny_args(run_dir: Path, shards: Path | None, *extra: str) -> list[str]:
    """Tiny model, 32 px, a handful of steps; logging every step so losses can be compared exactly."""
    data = [f"data.shards={shards}", "data.backend=pyav"] if shards else ["data.backend=synthetic"]
    return [
        "--config",
        str(TINY),
        f"train.run_dir={run_dir}",
        *data,
        "data.num_workers=0",  # decode in the training process: no worker start-up per run
        "data.val_split=null",
        "train.global_batch_size=8",  # the tests' own batch geometry, not the demo's
        "train.micro_batch_size=4",
        "train.log_every=1",
        "train.eval_every=0",
        "train.visualize_every=0",
        "optim.warmup_steps=2",
        "checkpoint.every=0",
        "tracking.enabled=false",
        "tracking.log_model=false",
        *extra,
    ]


def run_ranks(
    args: list[str],
    world: int,
    *,
    module: str = "pretrain",
    timeout: int = 240,
    cwd: Path | None = None,
    **per_rank,
) -> list[subprocess.CompletedProcess]:
    """`python -m MODULE ARGS` (or the test worker script with module="worker") once per rank; `per_rank`:
    `rank_env` / `rank_cwd` (see procs.run_ranks)."""
    cmd = [str(WORKER), *args] if module == "worker" else ["-m", module, *args]
    return procs.run_ranks(cmd, world, timeout=timeout, cwd=cwd, **per_rank)


def deepspeed_launch(args: list[str], world: int, timeout: int = 300) -> subprocess.CompletedProcess:
    ds = Path(PY).with_name("deepspeed")
    cmd = [
        str(ds),
        "--num_gpus",
        str(world),
        "--master_port",
        str(free_port()),
        str(REPO / "launch" / "pretrain.sh"),
        *args,
    ]
    return subprocess.run(cmd, env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def relative_gap(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> float:
    """The largest |a - b| / |b| of two loss curves over the same steps."""
    assert [s for s, _ in a] == [s for s, _ in b], (a, b)
    return max(abs(x - y) / abs(y) for (_, x), (_, y) in zip(a, b))
