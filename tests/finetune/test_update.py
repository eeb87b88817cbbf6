"""The update loop (`python -m finetune update`): real rounds (build with Ray or in the round's process,
DeepSpeed fine-tune, MLflow sqlite store and registry), the gate's rules, the aliases and rollback, the lock.

Round 1 continues the registry fixture's learned classifier on a new batch and is promoted; round 2 brings a
batch whose labels were shuffled and is refused, the champion staying where it was."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from ft_helpers import REPO, Registry, run_cli

from finetune.update.config import GateSection
from finetune.update.gate import decide

UPDATE = REPO / "finetune" / "configs" / "update.yaml"
FAST = '["train.steps=20","train.global_batch_size=8","train.micro_batch_size=8","continual.replay_batch_size=4","continual.memory_size=16","data.backend=pyav","data.num_workers=0","optim.lr=2e-4"]'


def batch(folder: Path, seed: int, videos: int = 64, shuffle: bool = False) -> Path:
    """A batch of new labelled videos (the 4 motion classes); `shuffle`: the labels permuted at random
    (`synth --shuffle-labels`: the same labels in another order, most of them now wrong)."""
    from data_shards.synth import SynthSpec, write_synthetic_set

    spec = SynthSpec(videos=videos, classes=4, frames=16, size=32, seed=seed, shuffle_labels=shuffle)
    labels = write_synthetic_set(folder, spec)
    if shuffle:
        rows = list(csv.DictReader(labels.open()))
        wrong = [r for r in rows if not r["path"].endswith(f"_{r['label']}.mp4")]
        assert len(wrong) > len(rows) / 2  # the file name still tells the true motion
    return labels


def update(work: Path, uri: str, videos: Path, round_name: str, *extra: str) -> tuple[int, str, dict]:
    r = run_cli(
        [
            "update",
            "--config",
            str(UPDATE),
            "model=upd-test",
            f"videos={videos}",
            f"work_dir={work}",
            f"tracking_uri={uri}",
            f"round={round_name}",
            f"finetune.overrides={FAST}",
            "gate.min_top1=0.5",
            "build.test_fraction=0.35",
            "gate.max_drop_old=0.1",
            *extra,
        ],
        timeout=400,
    )
    report = work / "rounds" / round_name / "report.json"
    return r.returncode, r.stdout + r.stderr, json.loads(report.read_text()) if report.is_file() else {}


def test_a_round_is_promoted_and_a_poisoned_one_refused(tmp_path: Path, registry: Registry) -> None:
    from mlflow import MlflowClient

    work, uri = tmp_path / "work", f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out, r1 = update(work, uri, batch(tmp_path / "b1", 11), "r1", f"init={registry.runs[0] / 'best'}")
    assert code == 0, out[-4000:]
    assert r1["promoted"] and r1["champion_before"] is None and r1["champion_after"] == "1", r1["decision"]
    assert r1["scores"]["challenger"]["r1"]["top1"] >= 0.5
    assert "PROMOTED" in out

    # round 2 builds its batch in the round's process (build.workers=0: no Ray start), round 1 on local Ray
    code, out, r2 = update(work, uri, batch(tmp_path / "b2", 12, shuffle=True), "r2", "build.workers=0")
    assert code == 0, out[-4000:]
    assert not r2["promoted"] and r2["champion_before"] == "1" and r2["champion_after"] == "1"
    failed = {c["rule"] for c in r2["decision"]["checks"] if not c["passed"]}
    assert "gate.min_top1" in failed, r2["decision"]
    assert set(r2["scores"]["champion"]) == set(r2["scores"]["challenger"]) == {"r1", "r2"}
    assert "REFUSED" in out

    c = MlflowClient(uri, registry_uri=uri)
    assert str(c.get_model_version_by_alias("upd-test", "champion").version) == "1"
    assert str(c.get_model_version_by_alias("upd-test", "challenger").version) == "2"
    assert c.get_model_version("upd-test", "2").tags["tubelet.update.decision"] == "refused"
    assert c.get_model_version("upd-test", "1").tags["tubelet.update.decision"] == "promoted"
    # one store, one tree: each round's run is the parent of its fine-tune and evaluation runs
    runs = c.search_runs([c.get_experiment_by_name("tubelet-update").experiment_id])
    parents = {r.info.run_name: r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == {"r1 (upd-test)", "r2 (upd-test)"}
    children = {
        r.info.run_name: r.data.tags["mlflow.parentRunId"] for r in runs if r.info.run_name not in parents
    }
    assert children == {
        "r1 · fine-tune": parents["r1 (upd-test)"],
        "r1 · evaluate challenger (new)": parents["r1 (upd-test)"],
        "r2 · fine-tune": parents["r2 (upd-test)"],
        "r2 · evaluate challenger (new)": parents["r2 (upd-test)"],
        "r2 · evaluate champion (1)": parents["r2 (upd-test)"],
    }
    # the lineage travels with the model: round 2 continued round 1's catalog and replay memory
    lineage = json.loads((work / "rounds" / "r2" / "train" / "model" / "lineage.json").read_text())
    assert [s["name"] for s in lineage["sets"]] == ["r1", "r2"] and lineage["rounds"] == ["r1", "r2"]
    assert {Path(it["shards"]).name for it in lineage["memory"]["items"]} == {"r1", "r2"}
    assert len(lineage["memory"]["items"]) == 16

    # a finished round run again: nothing redone, the same report
    code, out, again = update(work, uri, tmp_path / "b2" / "labels.csv", "r2")
    assert code == 0 and "already finished" in out and again["challenger_version"] == "2"


@pytest.mark.parametrize(
    ("challenger", "champion", "failed"),
    [
        ({"new": 0.9, "old": 0.80}, {"new": 0.5, "old": 0.85}, set()),
        ({"new": 0.9, "old": 0.70}, {"new": 0.5, "old": 0.85}, {"gate.max_drop_old"}),
        ({"new": 0.55, "old": 0.85}, {"new": 0.5, "old": 0.85}, {"gate.min_gain_new"}),
        ({"new": 0.3, "old": 0.85}, None, {"gate.min_top1"}),
        ({"new": float("nan"), "old": 0.85}, None, {"gate.min_top1"}),
    ],
)
def test_the_gate_applies_every_rule(challenger: dict, champion: dict | None, failed: set) -> None:
    gate = GateSection(min_gain_new=0.1, max_drop_old=0.1, min_top1=0.5)

    def scores(top1: dict | None) -> dict | None:
        return None if top1 is None else {k: {"top1": v, "n": 10, "recall": {}} for k, v in top1.items()}

    d = decide(gate, "new", scores(challenger), scores(champion))
    assert {c.rule for c in d.checks if not c.passed} == failed
    assert d.promote == (not failed)


def test_the_class_recall_floor() -> None:
    gate = GateSection(min_class_recall=0.5)
    s = {"new": {"top1": 0.8, "n": 10, "recall": {"a": 1.0, "b": 0.4}}}
    d = decide(gate, "new", s, None)
    assert not d.promote and [c.target for c in d.checks if not c.passed] == ["new/b"]


def test_promote_keeps_previous_and_rollback_walks_back(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from finetune.update.promote import promote, rollback

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    c = MlflowClient(uri, registry_uri=uri)
    c.create_registered_model("m")
    for _ in range(3):
        c.create_model_version("m", source=str(tmp_path))
    assert promote(uri, "m", "1") is None
    assert promote(uri, "m", "2") == "1" and promote(uri, "m", "3") == "2"
    assert promote(uri, "m", "3") == "2"  # idempotent
    aliases = {a: str(c.get_model_version_by_alias("m", a).version) for a in ("champion", "previous")}
    assert aliases == {"champion": "3", "previous": "2"}
    r = run_cli(["rollback", "m", "--tracking-uri", uri])
    assert r.returncode == 0 and "champion 3 -> 2" in r.stdout, r.stdout + r.stderr
    assert str(c.get_model_version_by_alias("m", "champion").version) == "2"
    assert str(c.get_model_version_by_alias("m", "previous").version) == "1"
    assert rollback(uri, "m") == ("2", "1")
    with pytest.raises(ValueError, match="no earlier champion"):
        rollback(uri, "m")
    # a name never registered, and a store that does not answer, are told apart from "no champion"
    with pytest.raises(ValueError, match="nosuch: no registered model of that name"):
        rollback(uri, "nosuch")
    r = run_cli(["rollback", "m", "--tracking-uri", "http://127.0.0.1:9"],
                env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})  # fmt: skip
    assert r.returncode == 2 and "error: MLflow at http://127.0.0.1:9: API request" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "no 'champion'" not in r.stderr


def test_a_concurrent_round_is_refused(tmp_path: Path) -> None:
    import os
    import socket

    from finetune.update.lock import round_lock

    videos = tmp_path / "labels.csv"
    videos.write_text("path,label\n")
    args = ["update", "--config", str(UPDATE), "model=m", f"videos={videos}", f"work_dir={tmp_path / 'w'}"]
    with round_lock(tmp_path / "w", "m", "first"):
        r = run_cli(args)
        assert r.returncode == 75, r.stdout + r.stderr
        assert "another update round of 'm' is running (first" in r.stderr
    assert not (tmp_path / "w" / "rounds").exists()  # the refused round touched nothing
    # a lock left by a dead process (a pid above the kernel's maximum) is stale: taken over
    lock = tmp_path / "w" / "locks" / "m.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345, "round": "old"}))
    with round_lock(tmp_path / "w", "m", "next") as held:
        assert json.loads(held.read_text())["pid"] == os.getpid()


@pytest.mark.slow  # ~70 s: two ranks, killed and resumed
def test_a_round_killed_mid_fine_tune_resumes(tmp_path: Path) -> None:
    """SIGKILL to the whole round (driver, torchrun, both ranks) after the fine-tune's first checkpoint: the
    same command with --resume auto takes over the stale lock, skips the steps done (no second build) and
    continues the fine-tune from its checkpoint."""
    import os
    import signal
    import subprocess
    import time

    from ft_helpers import PY, base_env

    work, uri = tmp_path / "work", f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps = (
        '["train.steps=120","train.global_batch_size=8","train.micro_batch_size=4","continual.replay_batch_size=2",'
        '"continual.memory_size=16","data.backend=pyav","data.num_workers=0","optim.lr=2e-4","checkpoint.every=10"]'
    )
    args = [
        "-m", "finetune", "update", "--config", str(UPDATE), "model=killed", f"videos={batch(tmp_path / 'b', 3)}",
        f"work_dir={work}", f"tracking_uri={uri}", "round=r", "init=scratch", "gate.min_top1=0",
        f"finetune.overrides={steps}", "finetune.ranks=2",
    ]  # fmt: skip
    proc = subprocess.Popen([PY, *args], env=base_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    marker = work / "rounds" / "r" / "train" / "checkpoints" / "step_00000010" / "complete"
    deadline = time.time() + 300
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.3)
    assert proc.poll() is None, "the round ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (work / "rounds" / "r" / "report.json").exists()
    state = json.loads((work / "rounds" / "r" / "state.json").read_text())
    assert state["done"] == ["champion", "build"]

    r = run_cli([*args[2:]], timeout=400)  # without --resume: refused, naming the way on
    assert r.returncode == 2 and "--resume auto" in r.stderr
    r = run_cli([*args[2:], "--resume", "auto"], timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "r: build" not in r.stdout and "r: train" in r.stdout
    steps_logged = [
        json.loads(x)["step"]
        for x in (work / "rounds" / "r" / "train" / "metrics.jsonl").open()
        if '"loss"' in x
    ]
    assert steps_logged[-1] == 120
    report = json.loads((work / "rounds" / "r" / "report.json").read_text())
    assert report["promoted"] and report["challenger_version"] == "1"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("init=/nonexistent/model", r"init=/nonexistent/model: no such file or folder"),
        ('finetune.overrides=["train.stepz=3"]', r"unknown key train\.stepz \(did you mean train\.steps\?\)"),
    ],
)
def test_a_missing_init_or_a_bad_fine_tune_override_is_refused_before_the_batch_is_sharded(
    tmp_path: Path, override: str, message: str
) -> None:
    from finetune.update.config import UpdateConfig
    from pretrain.engine import ConfigError, load_config

    cfg = load_config(UpdateConfig, REPO / "finetune" / "configs" / "update.yaml",
                      [f"videos={tmp_path / 'labels.csv'}", f"work_dir={tmp_path / 'w'}", override])  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
