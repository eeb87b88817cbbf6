"""`python -m finetune tune`: a search space is checked before any trial starts (errors name the key), and a
small ASHA study on local Ray runs real fine-tunes as nested MLflow runs, stops the weak ones early, writes the
best recipe, the trials table and the plots, registers the best model, and resumes without rerunning a trial."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from ft_helpers import REPO, ft_args, run_cli

TINY = REPO / "finetune" / "configs" / "tiny_cpu.yaml"


def space_file(tmp_path: Path, space: dict, **study: object) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump({"study": {"num_samples": 2, **study}, "space": space}))
    return p


@pytest.mark.parametrize(
    ("space", "study", "message"),
    [
        ({"optim.lrr": {"choice": [0.1]}}, {}, "space.optim.lrr"),
        ({"finetune.method": {"choice": []}}, {}, "space.finetune.method.choice is empty"),
        ({"optim.lr": {"loguniform": [0.0, 0.1]}}, {}, "bounds must be > 0 in log space"),
        ({"optim.lr": {"uniform": [0.1, 0.01]}}, {}, "low 0.1 must be below high 0.01"),
        ({"finetune.method": {"choice": ["full", "nope"]}}, {}, "space.finetune.method='nope'"),
        ({"optim.lr": {"between": [1, 2]}}, {}, "space.optim.lr: give one of"),
        ({"optim.lr": {"choice": [0.1]}}, {"schedulr": "asha"}, "study.schedulr"),
        ({"optim.lr": {"choice": [0.1]}}, {"num_samples": 0}, "study.num_samples must be >= 1"),
        ({"optim.lr": {"choice": [0.1]}}, {"metric": "val/top5x"}, "study.metric='val/top5x': a single_label"),
    ],
)
def test_a_bad_space_fails_before_any_trial_naming_the_key(
    tmp_path: Path, shards: Path, space: dict, study: dict, message: str, capsys: pytest.CaptureFixture
) -> None:
    from finetune.tune.study import main

    args = ["--config", str(TINY), "--space", str(space_file(tmp_path, space, **study)),
            "--dir", str(tmp_path / "study"), f"data.shards={shards}"]  # fmt: skip
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "study").exists()  # checked before the study folder, Ray or any trial


def test_the_command_line_names_a_bad_key(tmp_path: Path, shards: Path) -> None:
    space = space_file(tmp_path, {"optim.lrr": {"choice": [0.1]}})
    r = run_cli(["tune", "--config", str(TINY), "--space", str(space), f"data.shards={shards}"])
    assert r.returncode == 2 and "config error: space.optim.lrr" in r.stderr, r.stderr[-2000:]


def test_an_asha_study_stops_weak_trials_and_resumes_without_rerunning(
    tmp_path: Path, motion_shards: Path
) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = space_file(
        tmp_path,
        {"optim.lr": {"grid": [1.0e-6, 3.0e-3, 1.0e-5, 2.0e-3]}},
        num_samples=1, max_concurrent_trials=2, metric="val/loss", mode="min", grace_period=1,
        reduction_factor=2, register_as="tuned",
    )  # fmt: skip
    base = ft_args(tmp_path / "unused", motion_shards, None, "train.steps=12", "train.eval_every=3",
                   "train.global_batch_size=8", "train.micro_batch_size=8", "optim.warmup_steps=1")  # fmt: skip
    base = [a for a in base if not a.startswith(("train.run_dir=", "tracking.enabled=", "--config"))][1:]
    args = ["tune", "--config", str(TINY), "--space", str(space), "--dir", str(tmp_path / "study"),
            f"tracking.uri={uri}", *base]  # fmt: skip
    r = run_cli(args, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    rows = list(csv.DictReader((tmp_path / "study" / "trials.csv").open()))
    assert len(rows) == 4 and {x["status"] for x in rows} <= {"finished", "stopped early"}
    assert any(x["status"] == "stopped early" for x in rows), rows
    assert any(x["status"] == "finished" for x in rows), rows
    best = yaml.safe_load((tmp_path / "study" / "best.yaml").read_text())
    winner = min(rows, key=lambda x: float(x["best_val_loss"]))
    assert best["optim"]["lr"] == float(winner["optim.lr"]) and best["train"]["steps"] == 12
    assert (tmp_path / "study" / "curves.png").is_file() and (tmp_path / "study" / "params.png").is_file()

    c = MlflowClient(uri, registry_uri=uri)
    runs = c.search_runs([c.get_experiment_by_name("tubelet-demo").experiment_id])
    parent = json.loads((tmp_path / "study" / "study.json").read_text())["run_id"]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent]
    assert len(children) == 4 and {x.data.tags["tubelet.tune.status"] for x in children} == {
        x["status"] for x in rows
    }
    assert c.get_run(parent).info.status == "FINISHED"
    assert [v.version for v in c.search_model_versions("name='tuned'")] in (["1"], [1])  # the best model

    # the same command again with --resume auto: every trial is done, none runs again
    logs = sorted((tmp_path / "study" / "trials").rglob("finetune.log"))
    assert len(logs) == 4
    sizes = [p.stat().st_size for p in logs]
    r = run_cli([*args, "--resume", "auto"], timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert [p.stat().st_size for p in logs] == sizes
    # and the winner already registered stays version 1 (it was registered again as version 2)
    assert "registered models:/tuned/1" in r.stdout, r.stdout[-2000:]
    assert [v.version for v in c.search_model_versions("name='tuned'")] in (["1"], [1])


@pytest.mark.slow  # ~90 s
def test_a_killed_study_resumes_without_rerunning_finished_trials(
    tmp_path: Path, motion_shards: Path
) -> None:
    """SIGKILL to the driver (and its local Ray) once a trial has finished and the others have not: the same
    command with --resume auto finishes the study; the finished trial is not trained again."""
    import os
    import signal
    import subprocess
    import time

    from ft_helpers import PY, base_env

    space = space_file(tmp_path, {"optim.lr": {"grid": [1.0e-4, 3.0e-4, 1.0e-3, 2.0e-3]}},
                       num_samples=1, max_concurrent_trials=1, scheduler="fifo")  # fmt: skip
    base = ft_args(tmp_path / "unused", motion_shards, None, "train.steps=40", "train.eval_every=10",
                   "train.global_batch_size=8", "train.micro_batch_size=8", "optim.warmup_steps=1")  # fmt: skip
    base = [a for a in base if not a.startswith(("train.run_dir=", "tracking.enabled=", "--config"))][1:]
    study = tmp_path / "study"
    args = ["tune", "--config", str(TINY), "--space", str(space), "--dir", str(study),
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *base]  # fmt: skip
    proc = subprocess.Popen([PY, "-m", "finetune", *args], env=base_env(), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not list(study.glob("trials/*/run/exported.json")):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list(study.glob("trials/*/run/exported.json"))
    assert len(done) == 1 and not (study / "trials.csv").exists()
    metrics = done[0].parent / "metrics.jsonl"
    trained = metrics.read_text().count('"loss"')
    r = run_cli([*args, "--resume", "auto"], timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = list(csv.DictReader((study / "trials.csv").open()))
    assert len(rows) == 4 and all(x["status"] == "finished" for x in rows), rows
    # not trained again (Tune may restart it when its end was not yet in the experiment state: the run then
    # says it has finished and reports its evaluations again)
    assert metrics.read_text().count('"loss"') == trained


@pytest.mark.slow  # ~40 s
def test_a_study_over_continual_runs_uses_average_accuracy(tmp_path: Path) -> None:
    """A continual config makes every trial a `finetune continual` run, compared on its average accuracy."""
    from test_continual import CONFIG, balanced_shards, cl_args

    shards = balanced_shards(tmp_path / "shards")
    space = space_file(
        tmp_path, {"continual.strategy": {"grid": ["naive", "replay"]}}, num_samples=1, scheduler="fifo"
    )
    over = [
        a
        for a in cl_args(tmp_path / "unused", shards, "naive")[3:]
        if not a.startswith(("train.run_dir=", "continual.strategy="))
    ]
    r = run_cli(["tune", "--config", str(CONFIG), "--space", str(space), "--dir", str(tmp_path / "study"),
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *over], timeout=600)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = list(csv.DictReader((tmp_path / "study" / "trials.csv").open()))
    assert [x["continual.strategy"] for x in rows] == ["naive", "replay"]
    assert all(x["status"] == "finished" and x["evaluations"] == "2" for x in rows), rows
    assert "best_continual_average_accuracy" in rows[0]
    for x in rows:
        result = json.loads(
            (tmp_path / "study" / "trials" / x["trial"] / "run" / "continual.json").read_text()
        )
        assert result["strategy"] == x["continual.strategy"]
        assert float(x["last_continual_average_accuracy"]) == pytest.approx(result["average_accuracy"])
