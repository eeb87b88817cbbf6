"""Tracking against a real `mlflow server` on 127.0.0.1: params, metrics and artifacts arrive, and the run
survives the server going away mid-run (metrics.jsonl stays complete)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from engine_helpers import PY, REPO, base_env, free_port, losses, ok, tiny_args


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    env = {**base_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = Path(PY).with_name("mlflow")
    store = tmp_path / "server"
    store.mkdir()
    proc = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",
            str(store / "artifacts"),
        ],
        env=env,
        cwd=store,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not become healthy in 90 s")
    yield uri, proc
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def _start(run_dir: Path, uri: str, *extra: str) -> subprocess.Popen:
    args = tiny_args(
        run_dir,
        None,
        "tracking.enabled=true",
        f"tracking.uri={uri}",
        "tracking.experiment=engine-test",
        *extra,
    )
    return subprocess.Popen(
        [PY, "-m", "pretrain", *args],
        env=base_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_server_receives_params_metrics_artifacts_and_its_loss_is_survived(tmp_path, mlflow_server) -> None:
    from mlflow.tracking import MlflowClient

    uri, server = mlflow_server
    # 1) a complete run: params, per-step metrics, config + reconstruction PNG + model directory
    run_dir = tmp_path / "a"
    p = _start(run_dir, uri, "train.steps=4", "train.visualize_every=2", "tracking.log_model=true")
    out, _ = p.communicate(timeout=180)
    ok(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert f"MLflow run {run_id}" in out and uri in out
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.preset"] == "tiny" and run.data.params["deepspeed.zero_stage"] == "2"
    assert run.data.params["resolved.total_steps"] == "4"
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == [loss for _, loss in losses(run_dir)]
    for key in ("lr", "grad_norm", "clips_per_s", "tokens_per_s", "data_wait_frac", "peak_mem_gib", "mfu"):
        assert key in run.data.metrics, key
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "deepspeed.json", "reconstructions", "model"} <= top
    recon = [a.path for a in client.list_artifacts(run_id, "reconstructions/step_00000002")]
    assert recon == ["reconstructions/step_00000002/reconstruction.png"]
    model_files = {Path(a.path).name for a in client.list_artifacts(run_id, "model")}
    assert {"model.safetensors", "config.json"} <= model_files

    # 2) the server dies mid-run: training finishes, warns, and metrics.jsonl has every step
    run_dir = tmp_path / "b"
    p = _start(run_dir, uri, "train.steps=400", "optim.warmup_steps=5")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.2)
    os.killpg(server.pid, 15)
    server.wait(timeout=30)
    t0 = time.time()
    out, _ = p.communicate(timeout=240)
    ok(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    assert "MLflow logging to" in out and "training continues" in out
    assert [s for s, _ in losses(run_dir)] == list(range(1, 401))
    assert time.time() - t0 < 200


@pytest.mark.parametrize("tracking_first", [False, True])
def test_deepspeed_is_imported_without_its_autotuners_mlflow_and_tracking_still_gets_the_real_one(
    tracking_first: bool,
) -> None:
    """DeepSpeed's autotuner imports mlflow at import time (1-2 s of every rank's start); `import_deepspeed`
    hides it when the process has not imported mlflow itself. The real mlflow must still import afterwards,
    and one already imported (tracking on) must be left alone."""
    code = (
        "import sys\n"
        + ("import mlflow\n" if tracking_first else "")
        + "from pretrain.engine.dist import import_deepspeed\n"
        "import_deepspeed()\n"
        "from deepspeed.autotuning import autotuner\n"
        "loaded = 'mlflow' in sys.modules\n"
        "import mlflow\n"
        "mlflow.set_tracking_uri('file:///nonexistent')\n"
        "print(loaded, autotuner.has_mlflow, mlflow.get_tracking_uri())\n"
    )
    out = subprocess.run(
        [PY, "-c", code], env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = str(
        tracking_first
    )  # mlflow in sys.modules right after deepspeed, and the autotuner's has_mlflow
    assert out.stdout.split() == [loaded, loaded, "file:///nonexistent"], out.stdout
