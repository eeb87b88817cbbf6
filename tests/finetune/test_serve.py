"""`python -m finetune serve` for real: one local Ray Serve instance on 127.0.0.1 for the module, serving the
registered model through its alias (`models:/NAME@champion`), answering real HTTP requests: good clips (raw
body and multipart), embeddings, each kind of bad input (4xx JSON, and the next request still works), a body
over the upload limit, a burst of concurrent requests that forms batches, and a clean stop on SIGINT."""

from __future__ import annotations

import concurrent.futures as cf
import json
from collections.abc import Iterator

import pytest
import requests
import torch
from ft_helpers import BAD_INPUTS, PY, Registry, base_env, free_port, start_server, stop_server

UPLOAD_LIMIT_MB = 0.25


@pytest.fixture(scope="module")
def server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [
        PY, "-m", "finetune", "serve", "--model", f"models:/{registry.name}@champion", "--tracking-uri", registry.uri,
        "--port", str(port), "--max-batch-size", "8", "--batch-wait-ms", "200", "--max-upload-mb", str(UPLOAD_LIMIT_MB),
    ]  # fmt: skip
    env = {**base_env(), "RAY_USAGE_STATS_ENABLED": "0"}
    base = f"http://127.0.0.1:{port}"
    proc = start_server(cmd, env, log, f"{base}/health")
    try:
        yield base
    finally:
        code = stop_server(proc)
    assert code == 0 and "[serve] stopping" in log.read_text(), log.read_text()[-4000:]


@pytest.fixture(scope="module")
def local(registry: Registry, tmp_path_factory: pytest.TempPathFactory):
    """The same registered version, loaded in this process: what the server must agree with."""
    from finetune.predict import Predictor
    from finetune.registry import resolve_model

    src = resolve_model(f"models:/{registry.name}/1", registry.uri, tmp_path_factory.mktemp("v1"))
    return Predictor(src.model_dir)


def test_health_and_metadata_name_the_model_version_and_its_input(server: str, registry: Registry) -> None:
    assert requests.get(f"{server}/health", timeout=10).json() == {"status": "ok"}
    meta = requests.get(f"{server}/metadata", timeout=10).json()
    assert meta["labels"] == ["move_right", "move_left", "move_down", "move_up"]
    assert (
        meta["input"]["frames"] == 8 and meta["input"]["size"] == 32 and meta["input"]["views_per_video"] == 2
    )
    m = meta["model"]
    assert (
        m["source"] == f"models:/{registry.name}@champion"
        and m["version"] == "1"
        and "champion" in m["aliases"]
    )
    run_id = json.loads((registry.runs[0] / "mlflow_run.json").read_text())["run_id"]
    assert m["run_id"] == run_id
    s = meta["serving"]
    assert s["max_batch_size"] == 8 and s["max_ongoing_requests"] >= 8 and s["max_upload_bytes"] == 262144


def test_predict_answers_like_the_local_predictor(server: str, local, video_inputs: dict) -> None:
    r = requests.post(f"{server}/predict", data=video_inputs["mp4"], timeout=60)
    assert r.status_code == 200, r.text
    top = r.json()
    assert len(top) == 4 and all(set(t) == {"label", "score"} for t in top)  # top_k 5 clipped to 4 classes
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    (probs,) = local.probabilities([local.decode(video_inputs["mp4"])])  # same model, same eval sampling
    expected = {t["label"]: t["score"] for t in local.top(probs, 4)}
    assert {t["label"]: t["score"] for t in top} == pytest.approx(expected, abs=1e-5)

    two = requests.post(f"{server}/predict?top_k=2", data=video_inputs["mp4"], timeout=60).json()
    assert two == top[:2]
    files = {"file": ("clip.webm", video_inputs["webm"], "video/webm")}
    multi = requests.post(f"{server}/predict", files=files, timeout=60)
    raw = requests.post(f"{server}/predict", data=video_inputs["webm"], timeout=60)
    assert multi.status_code == 200 and multi.json() == raw.json()
    bad_k = requests.post(f"{server}/predict?top_k=0", data=video_inputs["mp4"], timeout=60)
    assert (
        bad_k.status_code == 400
        and bad_k.json()["error"] == "bad_request"
        and "top_k" in bad_k.json()["detail"]
    )


def test_embed_is_the_pooled_feature_of_the_clip(server: str, local, video_inputs: dict) -> None:
    r = requests.post(f"{server}/embed", data=video_inputs["webm"], timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dim"] == 64 == len(body["embedding"])
    (expected,) = local.embeddings([local.decode(video_inputs["webm"])])
    torch.testing.assert_close(torch.tensor(body["embedding"]), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_gets_a_4xx_naming_it_and_the_server_goes_on(
    server: str, video_inputs: dict, kind: str
) -> None:
    reason, status = BAD_INPUTS[kind]
    r = requests.post(f"{server}/predict", data=video_inputs[kind], timeout=60)
    assert r.status_code == status and r.json()["error"] == reason, r.text
    assert r.json()["detail"]
    assert requests.post(f"{server}/predict", data=video_inputs["mp4"], timeout=60).status_code == 200


def test_a_body_over_the_limit_is_refused_declared_or_streamed(server: str, video_inputs: dict) -> None:
    big = video_inputs["mp4"] * (int(UPLOAD_LIMIT_MB * 2**20) // len(video_inputs["mp4"]) + 2)
    r = requests.post(f"{server}/predict", data=big, timeout=60)  # Content-Length says it
    assert (
        r.status_code == 413 and r.json()["error"] == "too_large" and "--max-upload-mb" in r.json()["detail"]
    )
    chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))  # chunked: counted while reading
    r = requests.post(f"{server}/embed", data=chunks, timeout=60)
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    files = {"file": ("x.mp4", b"\0" * 16, "video/mp4")}
    r = requests.post(f"{server}/predict", files=files, data={"note": "x"}, timeout=60)
    assert r.status_code == 415 and r.json()["error"] == "not_a_video"  # multipart: the file part is judged
    r = requests.post(f"{server}/predict", files={"note": (None, "no file here")}, timeout=60)
    assert r.status_code == 400 and "no file part" in r.json()["detail"]


def test_a_burst_of_concurrent_requests_is_batched(server: str, video_inputs: dict) -> None:
    def one(_: int) -> int:
        return requests.post(f"{server}/predict", data=video_inputs["mp4"], timeout=120).status_code

    before = requests.get(f"{server}/metadata", timeout=10).json()["serving"]["batch_size_histogram"][
        "predict"
    ]
    with cf.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(24)))
    assert codes == [200] * 24
    after = requests.get(f"{server}/metadata", timeout=10).json()["serving"]["batch_size_histogram"][
        "predict"
    ]
    new = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    assert sum(k * v for k, v in new.items()) == 24  # every request went through one batch
    assert max(new) > 1, f"no batch formed: {new}"
    assert max(new) <= 8  # --max-batch-size


def test_uploads_are_read_in_memory_never_spooled_to_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A multipart file far over Starlette's 1 MB spool threshold stays in memory (and a raw body is a bytes
    join): the request handler never writes what it received to disk."""
    import asyncio
    import tempfile

    from starlette.requests import Request

    from finetune.serve import read_video

    def no_disk(self: object) -> None:
        raise AssertionError("an upload was spooled to a temporary file")

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", no_disk)
    payload = bytes(range(256)) * (3 * 2**20 // 256)  # 3 MB
    boundary = "tubelet"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="v.mp4"\r\n'
            "Content-Type: video/mp4\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def request(content_type: str, data: bytes) -> Request:
        chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]

        async def receive() -> dict:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(data)).encode())]
        return Request({"type": "http", "method": "POST", "headers": headers}, receive)

    got = asyncio.run(read_video(request(f"multipart/form-data; boundary={boundary}", body), 4 * 2**20))
    assert got == payload
    assert asyncio.run(read_video(request("video/mp4", payload), 4 * 2**20)) == payload
