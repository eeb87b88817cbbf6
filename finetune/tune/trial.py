"""One trial: an ordinary engine fine-tune (`python -m finetune ...`) in its own process and run directory,
nested under the study's MLflow run; every engine evaluation it logs is reported to Tune.

The fine-tune runs as a subprocess (its own DeepSpeed process group and port, like any run), in a process
group that dies with the trial: when a scheduler stops the trial, or Ray ends its worker, nothing is left
running. A restarted trial (a resumed study) continues its run with `--resume auto`. For PBT, each report
carries the run's newest checkpoint; a trial that exploits another starts from a copy of that run.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

RUN_DIR, LOG_FILE, POINTER = "run", "finetune.log", "run_dir.txt"


@dataclass(frozen=True)
class TrialPlan:
    """What every trial shares (picklable: it travels to the Ray workers)."""

    config: str  # FT.yaml, absolute
    overrides: tuple[str, ...]
    uri: str  # the study's MLflow store
    experiment: str
    parent_run_id: str | None
    metric: str  # as the engine logs it, e.g. val/top1
    study_dir: str  # trials live in STUDY/trials/<trial id>: beside the study, not in Ray's session folder
    env: tuple[tuple[str, str], ...] = ()
    continual: bool = False  # trials are `finetune continual` runs (the metric: continual/average_accuracy)

    @property
    def command(self) -> list[str]:
        return ["-m", "finetune", "continual"] if self.continual else ["-m", "finetune"]

    @property
    def config_class(self) -> type:
        return config_class(self.continual)

    @property
    def metric_key(self) -> str:
        """The name Tune sees (Tune splits nested names at '/')."""
        return self.metric.replace("/", "_")


def config_class(continual: bool) -> type:
    """What a trial's config file is: a fine-tuning config, or a continual one."""
    from finetune.config import FinetuneConfig
    from finetune.continual.config import ContinualConfig

    return ContinualConfig if continual else FinetuneConfig


def trial_folder(plan: TrialPlan, trial_id: str) -> Path:
    return Path(plan.study_dir) / "trials" / trial_id


def value_text(v: Any) -> str:
    """A sampled value as a `key=value` override (YAML, so lists and nulls survive)."""
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def trial_overrides(plan: TrialPlan, params: dict[str, Any], run_dir: Path, name: str) -> list[str]:
    return [
        *plan.overrides,
        *(f"{k}={value_text(v)}" for k, v in params.items()),
        f"train.run_dir={run_dir}",
        "tracking.enabled=true",
        f"tracking.uri={plan.uri}",
        f"tracking.experiment={plan.experiment}",
        f"tracking.parent_run_id={plan.parent_run_id or 'null'}",
        f"tracking.run_name={name}",
        "tracking.register_as=null",  # the study registers the best trial's model once
    ]


def evaluations(metrics_file: Path, metric: str) -> list[dict[str, Any]]:
    """The run's evaluations so far (metrics.jsonl lines holding the metric), in order."""
    if not metrics_file.is_file():
        return []
    out = []
    for line in metrics_file.read_text().splitlines():
        if f'"{metric}"' in line:
            try:
                row = json.loads(line)
            except ValueError:  # a line being written
                continue
            out.append(row)
    return out


def _die_with_parent() -> None:
    """In the child: SIGTERM when the trial's process ends (Linux prctl PR_SET_PDEATHSIG), own group."""
    os.setsid()
    with contextlib.suppress(OSError):  # not Linux: the finally of run_trial still stops it
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the engine saves and exits on SIGTERM
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _adopt_checkpoint(run_dir: Path) -> None:
    """PBT exploit: this trial goes on from another trial's run (its checkpoints copied over this run's, the
    evaluations so far set aside), with its new hyperparameters; `--resume auto` then continues it."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return
    with ckpt.as_directory() as d:
        donor = Path((Path(d) / POINTER).read_text().strip())
    if donor == run_dir or not (donor / "checkpoints").is_dir():
        return  # our own checkpoint: a restarted trial resumes itself
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.copytree(donor / "checkpoints", run_dir / "checkpoints")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        metrics.rename(run_dir / f"metrics.before_exploit_{int(time.time())}.jsonl")


def _checkpoint(run_dir: Path, scratch: Path) -> Any:
    from ray import tune

    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / POINTER).write_text(str(run_dir))
    return tune.Checkpoint.from_directory(str(scratch))


def run_trial(params: dict[str, Any], plan: TrialPlan, pbt: bool = False) -> None:
    """The function trainable: start the fine-tune, report its evaluations as they appear."""
    from ray import tune

    ctx = tune.get_context()
    trial_dir = trial_folder(plan, ctx.get_trial_id())
    run_dir = trial_dir / RUN_DIR
    run_dir.mkdir(parents=True, exist_ok=True)
    if pbt:
        _adopt_checkpoint(run_dir)
    args = [
        "--config",
        plan.config,
        *trial_overrides(plan, params, run_dir, ctx.get_trial_name()),
        "--resume",
        "auto",
    ]
    env = {**os.environ, **dict(plan.env)}
    with open(trial_dir / LOG_FILE, "a") as log:
        proc = subprocess.Popen(
            [sys.executable, *plan.command, *args], stdout=log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
    try:
        reported = 0
        while True:
            finished = proc.poll() is not None
            for row in evaluations(run_dir / "metrics.jsonl", plan.metric)[reported:]:
                reported += 1
                metrics = {plan.metric_key: float(row[plan.metric]), "step": int(row["step"])}
                ckpt = _checkpoint(run_dir, trial_dir / "pointer" / str(reported)) if pbt else None
                tune.report(metrics, checkpoint=ckpt)
            if finished:
                break
            time.sleep(0.5)
        if proc.returncode != 0:
            tail = (trial_dir / LOG_FILE).read_text()[-2000:]
            raise RuntimeError(f"the trial's fine-tune exited {proc.returncode}:\n{tail}")
    finally:
        _stop(proc)
