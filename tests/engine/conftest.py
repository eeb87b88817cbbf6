"""Fixtures for the engine tests: a tiny real shard set (train + val), and helpers that start real
training processes (bash launcher, `deepspeed` launcher, or one process per rank with torch env vars)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
TINY = REPO / "pretrain" / "configs" / "tiny_cpu.yaml"
WORKER = Path(__file__).with_name("_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        PYTHONPATH=str(REPO),
        MLFLOW_TRACKING_URI="",  # tests pick their store explicitly
        TQDM_DISABLE="1",
    )
    env.pop("MLFLOW_TRACKING_URI")
    return env


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
    args: list[str], world: int, *, module: str = "pretrain", timeout: int = 240, cwd: Path | None = None
) -> list[subprocess.CompletedProcess]:
    """One process per rank with RANK/WORLD_SIZE/MASTER_* set (what torchrun does), all waited for."""
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
        cmd = [PY, "-m", module, *args] if module != "worker" else [PY, str(WORKER), *args]
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=cwd or REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
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


def ok(result: subprocess.CompletedProcess | list[subprocess.CompletedProcess]) -> None:
    for r in result if isinstance(result, list) else [result]:
        assert r.returncode == 0, (
            f"exit {r.returncode}\n{(r.stdout or '')[-4000:]}\n{(r.stderr or '')[-4000:]}"
        )


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 train clips in 2 shards + 4 val clips, H.264, 32 px, 12 frames: real encodes, real shard writer."""
    from data_shards import format as fmt
    from data_shards.shardio import write_shard
    from data_shards.synth import MOTIONS, SynthSpec, encode_clip, render_clip

    folder = tmp_path_factory.mktemp("shards")
    spec = SynthSpec(videos=20, classes=4, frames=12, size=32, codec="h264", seed=3)
    tmp = folder / "tmp"
    tmp.mkdir()

    def sample(i: int) -> fmt.Sample:
        frames, motion = render_clip(i, spec)
        path = tmp / f"{i}.mp4"
        encode_clip(frames, path, spec.codec, spec.fps)
        vid = f"videos/{i:06d}_{motion}.mp4"
        meta = {"id": vid, "codec": "h264", "frames": spec.frames, "height": 32, "width": 32}
        return fmt.Sample(fmt.sample_key(vid), path.read_bytes(), "mp4", MOTIONS.index(motion), meta)

    infos = [
        write_shard(folder / fmt.shard_name("train", 0), [sample(i) for i in range(0, 8)]),
        write_shard(folder / fmt.shard_name("train", 1), [sample(i) for i in range(8, 16)]),
        write_shard(folder / fmt.shard_name("val", 0), [sample(i) for i in range(16, 20)]),
    ]
    splits = {}
    for split in ("train", "val"):
        mine = [i for i in infos if i.split == split]
        splits[split] = fmt.SplitInfo(
            samples=sum(i.samples for i in mine), shards=len(mine), bytes=sum(i.bytes for i in mine)
        )
    fmt.Manifest(classes=list(MOTIONS[:4]), shards=infos, splits=splits, options={"synthetic": True}).save(
        folder
    )
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return folder
