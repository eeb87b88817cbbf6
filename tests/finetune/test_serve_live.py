"""A served model in production: `serve --model models:/NAME@champion` follows the alias (a client posting
all along sees no failed request and the version switch once; a version that does not load leaves the old one
serving and says why), a bearer token guards every endpoint but /health, pathological uploads are refused
from their headers before any frame is decoded, and accepted uploads are captured for labelling.

One real Ray Serve instance for the module, on its own MLflow store (the shared registry's aliases stay put)."""

from __future__ import annotations

import csv
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from ft_helpers import PY, Registry, base_env, free_port, run_cli, start_server, stop_server

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_PIXELS = 3000  # the good clips are 48 x 48 = 2304 pixels


@dataclass(frozen=True)
class Live:
    base: str
    uri: str
    capture: Path
    log: Path


def set_champion(uri: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(uri, registry_uri=uri).set_registered_model_alias("live", "champion", version)


@pytest.fixture(scope="module")
def live(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Store with versions 1 and 2 of `live` (the registry fixture's two fine-tunes) and version 3, whose
    artifacts are not a model; champion = 1; the server follows it every second."""
    from mlflow import MlflowClient

    from finetune.mlflow_model import log_model

    root = tmp_path_factory.mktemp("live")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("live", artifact_location=(root / "artifacts").as_uri())
    run = client.create_run(exp).info.run_id
    for i, r in enumerate(registry.runs):
        log_model(r / "best", uri=uri, run_id=run, experiment_id=exp, name=f"m{i}", register_as="live")
    (root / "junk").mkdir()
    (root / "junk" / "README").write_text("not a model")
    client.create_model_version("live", source=str(root / "junk"), run_id=run)
    set_champion(uri, "1")
    port, capture, log = free_port(), root / "captured", root / "serve.log"
    cmd = [
        PY, "-m", "finetune", "serve", "--model", "models:/live@champion", "--tracking-uri", uri,
        "--port", str(port), "--reload-interval", "1", "--max-pixels", str(MAX_PIXELS),
        "--max-decode-seconds", "60", "--capture", str(capture), "--batch-wait-ms", "5",
    ]  # fmt: skip
    env = {**base_env(), "RAY_USAGE_STATS_ENABLED": "0", "TUBELET_SERVE_TOKEN": TOKEN}
    base = f"http://127.0.0.1:{port}"
    proc = start_server(cmd, env, log, f"{base}/health")
    try:
        yield Live(base, uri, capture, log)
    finally:
        stop_server(proc)


def metadata(live: Live) -> dict:
    r = requests.get(f"{live.base}/metadata", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_token_is_required_everywhere_but_health(live: Live, video_inputs: dict) -> None:
    assert requests.get(f"{live.base}/health", timeout=10).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        r = requests.get(f"{live.base}/metadata", headers=headers, timeout=10)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == "Bearer"
        r = requests.post(f"{live.base}/predict", data=video_inputs["mp4"], headers=headers, timeout=30)
        assert r.status_code == 401
    r = requests.post(f"{live.base}/predict", data=video_inputs["mp4"], headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()[0]["label"]
    meta = metadata(live)
    assert meta["auth"] is True and TOKEN not in r.text + str(meta) + live.log.read_text()


def _clip(path: Path, frames: int, size: int, fps: int) -> bytes:
    from data_shards.synth import encode_clip

    rng = np.random.default_rng(0)
    encode_clip(rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8), path, "h264", fps)
    return path.read_bytes()


def test_uploads_over_the_decode_limits_are_refused_before_decoding(live: Live, tmp_path: Path) -> None:
    big = _clip(tmp_path / "big.mp4", 4, 64, 16)  # 64 x 64 = 4096 pixels per frame
    t0 = time.perf_counter()
    r = requests.post(f"{live.base}/predict", data=big, headers=AUTH, timeout=30)
    assert r.status_code == 413 and r.json()["error"] == "too_large", r.text
    assert "--max-pixels" in r.json()["detail"] and time.perf_counter() - t0 < 1.0
    long = _clip(tmp_path / "long.mp4", 64, 16, 1)  # 64 s at one frame per second
    r = requests.post(f"{live.base}/predict", data=long, headers=AUTH, timeout=30)
    assert r.status_code == 422 and r.json()["error"] == "too_long", r.text
    assert metadata(live)["limits"] == {"max_pixels": MAX_PIXELS, "max_decode_seconds": 60.0}


def test_predict_refuses_the_same_files(registry: Registry, tmp_path: Path, video_inputs: dict) -> None:
    big = tmp_path / "big.mp4"
    _clip(big, 4, 64, 16)
    ok = tmp_path / "ok.mp4"
    ok.write_bytes(video_inputs["mp4"])
    model = str(registry.runs[0] / "best")
    r = run_cli(["predict", "--model", model, "--max-pixels", str(MAX_PIXELS), str(ok), str(big)])
    assert r.returncode == 1 and "over the limit of 3000 pixels" in r.stderr and str(ok) in r.stdout


def test_the_server_follows_the_alias_without_failing_a_request(live: Live, video_inputs: dict) -> None:
    statuses: list[int] = []
    versions: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            r = requests.post(f"{live.base}/predict", data=video_inputs["webm"], headers=AUTH, timeout=60)
            statuses.append(r.status_code)
            v = metadata(live)["model"]["version"]
            if not versions or versions[-1] != v:
                versions.append(v)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        time.sleep(1.5)
        set_champion(live.uri, "2")
        deadline = time.time() + 60
        while time.time() < deadline and versions[-1:] != ["2"]:
            time.sleep(0.2)
        set_champion(live.uri, "3")  # not a model: the server must go on with version 2
        while time.time() < deadline and "version 3" not in str(
            (metadata(live)["reload"] or {}).get("last_error")
        ):
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join()
    meta = metadata(live)
    assert versions == ["1", "2"], (versions, live.log.read_text()[-3000:])
    assert statuses and set(statuses) == {200}, statuses
    assert meta["model"]["version"] == "2" and meta["model"]["source"] == "models:/live@champion"
    assert "version 3 did not load" in meta["reload"]["last_error"] and meta["reload"]["loads"] == 1


def test_accepted_uploads_are_captured_for_labelling(live: Live, video_inputs: dict) -> None:
    from data_shards.inputs import read_inputs

    for kind in ("mp4", "webm", "not_a_video"):
        requests.post(f"{live.base}/predict", data=video_inputs[kind], headers=AUTH, timeout=30)
    deadline = time.time() + 20
    while time.time() < deadline and not list(live.capture.glob("captures-*.csv")):
        time.sleep(0.2)
    time.sleep(1.0)
    (manifest,) = live.capture.glob("captures-*.csv")
    rows = list(csv.DictReader(manifest.open()))
    assert len(rows) >= 2 and all(r["label"] == "" and r["predicted"] and r["model_version"] for r in rows)
    assert all((live.capture / r["path"]).is_file() for r in rows)  # the bad upload was not kept
    assert {Path(r["path"]).suffix for r in rows} >= {".mp4", ".webm"}
    meta = metadata(live)["capture"]
    assert meta["captured"] == len(rows) and meta["failed"] == 0
    for r in rows:  # a person fills the label column in: a manifest `data_shards build` reads
        r["label"] = r["predicted"]
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    inputs = read_inputs(manifest)
    assert len(inputs.items) == len(rows) and not inputs.rejects and inputs.labelled
