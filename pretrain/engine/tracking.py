"""Run tracking: `metrics.jsonl` in the run directory (always) and MLflow (rank 0, best effort).

MLflow is never allowed to stop or stall training: HTTP retries and timeouts are set low, every call is
guarded, failures are counted and warned about once per `warn_every`, and after a failure MLflow is left
alone for a growing back-off interval (metrics logged meanwhile are dropped from MLflow, not from the jsonl).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import TrackingConfig

# Before mlflow is imported anywhere: a dead server must cost milliseconds, not minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in training logs

RUN_ID_FILE = "mlflow_run.json"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3's UI: "custom_model_development" = the ML runs view
MODEL_TRAINING_KIND = "custom_model_development"


def default_uri(run_dir: Path) -> str:
    """A sqlite store beside the run directories: one `mlflow ui` shows every run under `runs/`."""
    return f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}"


def resolve_uri(cfg: TrackingConfig, run_dir: Path) -> str:
    return cfg.given_uri() or default_uri(run_dir)


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


class Tracker:
    """`log_params`, `log_metrics`, `log_artifact`, `close`; a no-op for MLflow on ranks other than 0."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, is_main: bool) -> None:
        self.cfg, self.run_dir, self.is_main = cfg, run_dir, is_main
        self.uri = resolve_uri(cfg, run_dir)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.failures = 0
        self._retry_at = 0.0
        self._backoff = 1.0
        self._client: Any = None
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if is_main else None  # noqa: SIM115
        if is_main and cfg.enabled:
            self._start()

    # -- mlflow plumbing ---------------------------------------------------------------------------
    def _start(self) -> None:
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment(client)
            saved = self.run_dir / RUN_ID_FILE
            run_id = None
            if saved.is_file():
                info = json.loads(saved.read_text())
                if info.get("uri") == self.uri:
                    run_id = info.get("run_id")
                    client.update_run(run_id, status="RUNNING")
            if run_id is None:
                name = self.cfg.run_name or self.run_dir.name
                tags = {"mlflow.parentRunId": self.cfg.parent_run_id} if self.cfg.parent_run_id else None
                run_id = client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
                saved.write_text(json.dumps({"uri": self.uri, "run_id": run_id}) + "\n")
            self._client, self.run_id = client, run_id
        except Exception as e:  # tracking must never stop training
            warnings.warn(
                f"MLflow at {self.uri} unavailable ({e}); continuing with metrics.jsonl only", stacklevel=2
            )
            self._client = None

    def _experiment(self, client: Any) -> str:
        """The experiment's id (created if missing), tagged as model training so the MLflow UI opens its
        runs table rather than the GenAI view."""
        exp = client.get_experiment_by_name(self.cfg.experiment)
        if exp is None:
            location = None
            if not self.uri.startswith(("http://", "https://", "databricks")):
                # keep artifacts beside the store, not in whatever the working directory is
                location = (self.run_dir.resolve().parent / "mlartifacts").as_uri()
            exp_id = client.create_experiment(self.cfg.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        if exp is None or exp.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
            client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return exp_id

    def _call(self, fn: Callable[[], Any], *, backoff: bool = True) -> Any:
        """`fn()`, or None after a warning when it fails; with `backoff`, skipped while a recent failure's
        retry delay runs (the per-step stream must not wait on a dead server; one-off work always tries)."""
        if self._client is None or (backoff and time.monotonic() < self._retry_at):
            return None
        try:
            out = fn()
            self._backoff = 1.0
            return out
        except Exception as e:
            self.failures += 1
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(60.0, self._backoff * 2)
            if self.failures % self.cfg.warn_every == 1 or self.cfg.warn_every == 1:
                warnings.warn(
                    f"MLflow logging to {self.uri} failed ({self.failures} failures so far; training "
                    f"continues, metrics.jsonl is complete): {type(e).__name__}: {str(e)[:200]}",
                    stacklevel=3,
                )

    # -- public ------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._client is not None

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run other MLflow work for this run (e.g. log a model) under the same rule as every call here:
        a failure warns and returns None, it never stops training; a metrics failure just before does not
        skip it. No-op off rank 0 or without MLflow."""
        if not self.is_main:
            return None
        return self._call(fn, backoff=False)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.is_main or self._client is None:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            self._call(lambda chunk=chunk: self._client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        assert self._jsonl is not None
        record = {"step": step, "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self._call(lambda: self._client.log_batch(self.run_id, metrics=items))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if not self.is_main or self._client is None:
            return
        p = Path(path)
        if p.is_dir():
            self._call(lambda: self._client.log_artifacts(self.run_id, str(p), artifact_path))
        else:
            self._call(lambda: self._client.log_artifact(self.run_id, str(p), artifact_path))

    def close(self, status: str = "FINISHED") -> None:
        if self._client is not None:
            self._call(lambda: self._client.set_terminated(self.run_id, status))
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def describe(self, metrics_at: str | None = None) -> str:
        """Where the run's metrics are (`metrics_at`: the metrics file's URL when the run directory is one)."""
        if self.run_id is None:
            return f"metrics: {metrics_at or self.run_dir / 'metrics.jsonl'} (MLflow off)"
        return (
            f"MLflow run {self.run_id} (experiment {self.cfg.experiment!r}) at {self.uri}\n"
            f"  view it: {ui_command(self.uri)}"
        )


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
