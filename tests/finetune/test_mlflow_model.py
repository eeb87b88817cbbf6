"""The fine-tuned model as an MLflow model, against a real sqlite store: two fine-tunes registering one name
make versions 1 and 2, both runs carry pyfunc models `model` and `best`, the pyfunc predicts video bytes and
paths (bad rows get an error, not an exception), an alias resolves, test evaluations land in the fine-tune's
own run (or in a run named after the model), and `mlflow models serve` answers a request."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import requests
from ft_helpers import PY, Registry, base_env, free_port, ok, run_cli, start_server, stop_server


def run_id(run: Path) -> str:
    return json.loads((run / "mlflow_run.json").read_text())["run_id"]


def test_two_fine_tunes_register_versions_1_and_2_of_one_name(registry: Registry) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(registry.uri, registry_uri=registry.uri)
    versions = sorted(client.search_model_versions(f"name='{registry.name}'"), key=lambda v: int(v.version))
    assert [(str(v.version), v.run_id) for v in versions] == [
        ("1", run_id(registry.runs[0])),
        ("2", run_id(registry.runs[1])),
    ]
    assert str(client.get_model_version_by_alias(registry.name, "champion").version) == "1"
    for run in registry.runs:
        exp = client.get_run(run_id(run)).info.experiment_id
        logged = client.search_logged_models([exp], filter_string=f"source_run_id='{run_id(run)}'")
        assert sorted(m.name for m in logged) == ["best", "model"]  # final and best, each a pyfunc model
    mlmodel = client.get_logged_model(versions[0].tags["tubelet.logged_model_id"]).name
    assert mlmodel == "best"  # the registered version is the best model (what evaluate reports)
    # the training bar is closed before the end-of-run lines (they were printed into the open bar, and
    # MLflow's INFO "Validating input example" line with them)
    shown = (registry.runs[1].parent / "again.log").read_text()
    assert shown.rindex("train: ") < shown.index(f"registered as {registry.name} version 2"), shown[-3000:]
    assert "Validating input example" not in shown


def test_pyfunc_predicts_bytes_and_paths_and_reports_bad_rows(
    registry: Registry, video_inputs: dict, tmp_path: Path
) -> None:
    import mlflow

    from finetune.predict import Predictor
    from finetune.registry import resolve_model

    clip = tmp_path / "clip.webm"
    clip.write_bytes(video_inputs["webm"])
    client = mlflow.MlflowClient(registry.uri, registry_uri=registry.uri)
    champion = client.get_model_version_by_alias(registry.name, "champion")
    model = mlflow.pyfunc.load_model(client.get_model_version_download_uri(registry.name, champion.version))
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["video", "path"] and sig.params.params[0].name == "top_k"
    frame = pd.DataFrame(
        {"video": [video_inputs["mp4"], video_inputs["not_a_video"], None], "path": [None, None, str(clip)]}
    )
    out = model.predict(frame, params={"top_k": 2})
    assert list(out.columns) == ["label", "score", "top_k", "error"] and len(out) == 3
    assert out["error"][0] is None and out["error"][2] is None and out["error"][1].startswith("not_a_video")
    assert [len(t) for t in out["top_k"]] == [2, 0, 2] and out["label"][1] is None and out["score"][1] is None
    local = Predictor(resolve_model(f"models:/{registry.name}/1", registry.uri, tmp_path / "v1").model_dir)
    (probs,) = local.probabilities([local.decode(video_inputs["mp4"])])
    assert out["label"][0] == local.top(probs, 1)[0]["label"]
    assert out["score"][0] == pytest.approx(local.top(probs, 1)[0]["score"], abs=1e-5)
    records = model.predict([{"path": str(clip)}])  # list-of-records input, top_k defaults to 5 → 4 classes
    assert len(records["top_k"][0]) == 4 and records["label"][0] == out["label"][2]


def test_resolve_model_names_what_is_missing(registry: Registry, tmp_path: Path) -> None:
    from finetune.registry import check_source, resolve_model

    with pytest.raises(  # the model is there: its versions and aliases are named
        ValueError,
        match=rf"models:/{registry.name}/9: {registry.name} in .* has versions \[1, 2\] and aliases \['champion'\]",
    ):
        resolve_model(f"models:/{registry.name}/9", registry.uri, tmp_path)
    with pytest.raises(
        ValueError, match=rf"models:/other/1: not in the model registry .* registered models: \['{registry.name}'\]"
    ):
        resolve_model("models:/other/1", registry.uri, tmp_path)
    with pytest.raises(ValueError, match="expected models:/NAME/VERSION"):
        resolve_model(f"models:/{registry.name}/latest", registry.uri, tmp_path)
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        resolve_model(str(tmp_path), registry.uri)
    src = resolve_model(str(registry.runs[0] / "best"))
    assert src.run == (registry.uri, run_id(registry.runs[0]))
    before = set(tmp_path.iterdir())  # serve's start-up check downloads nothing
    assert check_source(f"models:/{registry.name}@champion", registry.uri).endswith(
        f"(version 1 of {registry.name}, run {run_id(registry.runs[0])})"
    )
    assert set(tmp_path.iterdir()) == before
    with pytest.raises(ValueError, match=r"aliases \['champion'\]; give one of them .*finetune update"):
        check_source(f"models:/{registry.name}@nobody", registry.uri)


def test_without_a_tracking_uri_the_default_store_that_has_the_model_is_used(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fine-tune with the default run directory keeps its store in runs/mlflow.db, the update loop in
    runs/update/mlflow.db: `serve --model models:/NAME@ALIAS` from the same folder finds it there."""
    from finetune.registry import registry_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"no MLflow store to look it up in: .*\./runs/mlflow\.db"):
        registry_store(f"models:/{registry.name}@champion", None)
    (tmp_path / "runs" / "update").mkdir(parents=True)
    db = Path(registry.uri.removeprefix("sqlite:///"))
    shutil.copy(db, tmp_path / "runs" / "mlflow.db")
    here = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert registry_store(f"models:/{registry.name}@champion", None) == here
    from mlflow import MlflowClient

    other = f"sqlite:///{tmp_path / 'runs' / 'update' / 'mlflow.db'}"
    MlflowClient(other, registry_uri=other).create_registered_model("other")
    assert registry_store(f"models:/{registry.name}/1", None) == here  # the store that registers it
    assert registry_store("models:/other@champion", None) == other
    shutil.copy(db, tmp_path / "mlflow.db")
    with pytest.raises(ValueError, match="several of the default stores here register"):
        registry_store(f"models:/{registry.name}/1", None)


def test_evaluation_is_logged_into_the_fine_tunes_own_run(
    registry: Registry, tiny_classifier: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    loose = tmp_path / "exported" / "model"  # a model directory that belongs to no run
    shutil.copytree(tiny_classifier, loose)
    args = [
        "evaluate",
        "--model",
        str(registry.runs[0] / "best"),
        "--model",
        str(loose),
        "--shards",
        str(registry.shards),
    ]
    r = run_cli([*args, "--split", "test", "--backend", "pyav", "--tracking-uri", registry.uri, "--json"])
    ok(r)
    client = MlflowClient(registry.uri)
    run = client.get_run(run_id(registry.runs[0]))
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert (
        run.data.metrics["test/top1"] == pytest.approx(lines[0]["top1"])
        and "test/f1/move_up" in run.data.metrics
    )
    assert run.data.tags["test.views"] == "2x1" and run.info.status == "FINISHED"
    step = json.loads((registry.runs[0] / "best" / "config.json").read_text())["extra"]["step"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/top1")] == [step]
    files = {a.path for a in client.list_artifacts(run.info.run_id, "eval/best_test")}
    assert {"eval/best_test/confusion.png", "eval/best_test/report.txt"} <= files
    other = client.search_runs(
        [client.get_experiment_by_name("tubelet-eval").experiment_id],
        "attributes.run_name = 'exported/model'",
    )
    assert len(other) == 1 and other[0].data.metrics["test/top1"] == pytest.approx(lines[1]["top1"])


def test_mlflow_models_serve_answers_a_request(
    registry: Registry, video_inputs: dict, tmp_path: Path
) -> None:
    port, log = free_port(), tmp_path / "mlflow_serve.log"
    mlflow_cli = str(Path(PY).with_name("mlflow"))
    cmd = [mlflow_cli, "models", "serve", "-m", f"models:/{registry.name}/1", "--env-manager", "local"]
    bin_dir = str(Path(PY).parent)  # `mlflow models serve` execs uvicorn from the environment's bin folder
    env = {**base_env(), "MLFLOW_TRACKING_URI": registry.uri, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = start_server(
        [*cmd, "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env, log, f"http://127.0.0.1:{port}/ping", 120
    )
    try:
        rows = [[base64.b64encode(video_inputs[k]).decode()] for k in ("mp4", "not_a_video")]
        payload = {"dataframe_split": {"columns": ["video"], "data": rows}, "params": {"top_k": 3}}
        r = requests.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=60)
        assert r.status_code == 200, r.text
        good, bad = r.json()["predictions"]
        assert (
            good["label"] in ["move_right", "move_left", "move_down", "move_up"] and len(good["top_k"]) == 3
        )
        assert good["error"] is None and bad["label"] is None and bad["error"].startswith("not_a_video")
    finally:
        stop_server(proc)


def test_a_model_in_a_bucket_is_linked_to_its_runs_store_when_this_machine_can_reach_it(tmp_path: Path) -> None:
    """`evaluate --model s3://.../RUN/best` logs into the fine-tune's run, as for a local RUN/best: the run's
    `mlflow_run.json` is in the bucket beside the model (any fsspec store; here the in-memory one)."""
    from data_shards import storage
    from finetune.registry import run_of_url

    run = "memory://bucket/runs/ft"
    storage.write_text(f"{run}/best/config.json", "{}")
    assert run_of_url(f"{run}/best") is None  # an untracked run
    db = tmp_path / "mlflow.db"
    db.touch()
    for uri, linked in ((f"sqlite:///{db}", True), ("http://tracking:5000", True), ("sqlite:////elsewhere/m.db", False)):
        storage.write_text(f"{run}/mlflow_run.json", json.dumps({"uri": uri, "run_id": "abc"}))
        assert run_of_url(f"{run}/best") == ((uri, "abc") if linked else None)
