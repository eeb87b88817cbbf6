"""Multi-node on one machine, for real: two "nodes" are 127.0.0.1 and 127.0.0.2, reached through an sshd of
the test's own (tests/engine/loopback.py), with one rank each.

* `deepspeed --hostfile H --master_addr 127.0.0.1 launch/pretrain.sh ...` through DeepSpeed's own multi-node
  runner (pdsh over ssh, as on a cluster): node ranks, `.deepspeed_env` forwarding, the working directory and
  the `.venv` interpreter on the other node, LOCAL_RANK 0 on each node.
* `torchrun --nnodes 2 --node-rank {0,1} --rdzv-backend c10d` twice on loopback (what `srun` starts).

Each job is preempted: SIGTERM to the training process of the second node only; every rank checkpoints at
the step boundary and exits 0; the same command with `--resume auto` finishes. The losses of every step
equal those of the same global batches on one node with 2 ranks (within 1e-6), one MLflow run holds them
all, and there is one set of checkpoints (each with both ranks' files), written once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import loopback
import pytest
from engine_helpers import PY, REPO, base_env, free_port, losses, ok, run_ranks, tiny_args
from procs import wait_all

pytestmark = pytest.mark.slow

STOP = 24  # every run ends here (train.stop_at); train.steps is longer, so the LR schedule is the same
Launch = Callable[[list[str]], list[subprocess.Popen]]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory):
    node = loopback.start(tmp_path_factory.mktemp("sshd"))
    yield node
    node.stop()


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> list[tuple[int, float]]:
    """The reference: the same job on one node with 2 ranks, uninterrupted."""
    run = tmp_path_factory.mktemp("one_node") / "run"
    ok(run_ranks(_args(run, shards), 2))
    return losses(run)


def _args(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return tiny_args(
        run_dir, shards, "train.steps=200", f"train.stop_at={STOP}", "train.micro_batch_size=4", *extra
    )


def _tracked(run_dir: Path, shards: Path, uri: str) -> list[str]:
    return _args(
        run_dir, shards, "tracking.enabled=true", f"tracking.uri={uri}", "tracking.experiment=multinode"
    )


def _preempt_then_resume(launch: Launch, run_dir: Path, args: list[str], mark: str) -> list[loopback.Proc]:
    """Start the job, SIGTERM the training process of the second node once two steps are logged, check every
    rank checkpointed and exited 0 (and so did the launchers), then resume it to the end. Returns the
    training processes of the first job."""
    watcher = loopback.Watcher(mark)
    try:
        procs = launch(args)
        victim = watcher.rank(1).pid
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and (not metrics.exists() or metrics.read_text().count('"loss"') < 2):
            time.sleep(0.02)
        os.kill(victim, signal.SIGTERM)
        first = wait_all(procs)
        seen = watcher.stop()
    finally:
        watcher.kill_leftovers()
    ok(first)
    text = "".join(r.stdout for r in first)
    assert "SIGTERM: checkpointing at the next step boundary" in text
    (ckpt,) = [c.parent for c in (run_dir / "checkpoints").glob("*/complete")]
    step = int(ckpt.name.split("_")[1])
    assert 2 <= step < STOP, f"preempted at step {step}"
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    assert (run_dir / "checkpoints" / "latest").read_text() == ckpt.name
    resumed = wait_all(launch([*args, "--resume", "auto"]))
    ok(resumed)
    assert f"paused at train.stop_at at step {STOP}" in "".join(r.stdout for r in resumed)
    return seen


def _same_as_one_node(run_dir: Path, one_node: list[tuple[int, float]], uri: str) -> float:
    """Every step's loss equals the one-node run's; metrics.jsonl and the single MLflow run have each step
    once (rank 0 alone writes); the checkpoints are one set. Returns the largest loss difference."""
    mine = losses(run_dir)
    assert [s for s, _ in mine] == [s for s, _ in one_node] == list(range(1, STOP + 1))
    worst = max(abs(a - b) for (_, a), (_, b) in zip(mine, one_node))
    assert worst <= 1e-6, (worst, mine, one_node)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])
    assert run.info.run_id == json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, STOP + 1))
    for ckpt in (run_dir / "checkpoints").glob("step_*"):
        assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    return worst


def test_deepspeed_hostfile_over_pdsh_and_ssh(tmp_path: Path, shards: Path, nodes, one_node) -> None:
    launch_dir, run_dir, mark = tmp_path / "launch", tmp_path / "run", uuid.uuid4().hex
    launch_dir.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (launch_dir / "hostfile").write_text("".join(f"{h} slots=1\n" for h in loopback.HOSTS))
    # forwarded to every node by DeepSpeed's runner (the ssh sessions start with a clean environment)
    forwarded = {
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TQDM_DISABLE": "1",
        "MLFLOW_TRACKING_URI": uri,
        "TUBELET_TEST_MARK": mark,
    }
    (launch_dir / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in forwarded.items()))
    deepspeed = Path(PY).with_name("deepspeed")

    def launch(args: list[str]) -> list[subprocess.Popen]:
        cmd = [str(deepspeed), "--hostfile", "hostfile", "--master_addr", "127.0.0.1"]
        cmd += ["--master_port", str(free_port()), str(REPO / "launch" / "pretrain.sh"), *args]
        env = nodes.env({k: v for k, v in base_env().items() if k not in forwarded})
        return [
            subprocess.Popen(
                cmd, env=env, cwd=launch_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        ]

    args = _args(run_dir, shards, "tracking.enabled=true", "tracking.experiment=multinode")
    seen = _preempt_then_resume(launch, run_dir, args, mark)
    # what the runner gave each rank: pdsh's node rank, LOCAL_RANK 0 on each node, the launch directory and
    # the same interpreter (.venv) on the other node, the master address of node 0
    assert [(p.rank, p.local_rank, p.world_size, p.node) for p in seen] == [
        (0, 0, 2, "127.0.0.1"),
        (1, 0, 2, "127.0.0.2"),
    ], seen
    assert all(p.cwd == str(launch_dir) and p.master_addr == "127.0.0.1" for p in seen), seen
    assert all(Path(p.exe).resolve() == Path(PY).resolve() for p in seen), seen
    worst = _same_as_one_node(run_dir, one_node, uri)
    print(f"deepspeed 2 nodes x 1 rank vs 1 node x 2 ranks: max |loss difference| = {worst:.3g}; {seen}")


def test_torchrun_two_nodes_c10d(tmp_path: Path, shards: Path, one_node) -> None:
    run_dir, mark = tmp_path / "run", uuid.uuid4().hex
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def launch(args: list[str]) -> list[subprocess.Popen]:
        torchrun, port, procs = Path(PY).with_name("torchrun"), free_port(), []
        for node, addr in enumerate(loopback.HOSTS):
            cmd = [str(torchrun), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node)]
            cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", mark]
            cmd += ["--local-addr", addr, "-m", "pretrain", *args]
            env = {**base_env(), "TUBELET_TEST_MARK": mark, "TUBELET_TEST_NODE": addr}
            procs.append(
                subprocess.Popen(
                    cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
            )
        return procs

    seen = _preempt_then_resume(launch, run_dir, _tracked(run_dir, shards, uri), mark)
    # c10d ignores --node-rank: ranks follow the sorted --local-addr, so 127.0.0.1 holds rank 0
    assert [(p.rank, p.local_rank, p.world_size, p.node) for p in seen] == [
        (0, 0, 2, "127.0.0.1"),
        (1, 0, 2, "127.0.0.2"),
    ], seen
    worst = _same_as_one_node(run_dir, one_node, uri)
    print(f"torchrun 2 nodes x 1 rank vs 1 node x 2 ranks: max |loss difference| = {worst:.3g}; {seen}")
