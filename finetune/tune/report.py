"""What a study leaves: the trials table, the plots, the winning recipe and its registered model, all also in
the study's MLflow run (and each trial's run tagged with how it ended)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from finetune.tune.space import SearchSpace
from finetune.tune.trial import RUN_DIR, TrialPlan, trial_folder

TRIALS_CSV, CURVES_PNG, PARAMS_PNG = "trials.csv", "curves.png", "params.png"


def trial_rows(grid: Any, space: SearchSpace, plan: TrialPlan, max_t: int) -> list[dict[str, Any]]:
    """One row per trial: its parameters, best and last metric, evaluations, steps, how it ended."""
    key, best = space.study.metric.replace("/", "_"), max if space.study.mode == "max" else min
    rows = []
    for r in grid:
        df = r.metrics_dataframe
        values = [] if df is None or key not in df else [float(v) for v in df[key].dropna()]
        evals = len(values)
        status = "error" if r.error else ("finished" if evals >= max_t else "stopped early")
        rows.append({
            "trial": str(r.metrics.get("trial_id", Path(r.path).name)),
            "status": status,
            "evaluations": evals,
            "steps": int(df["step"].max()) if evals else 0,
            f"best_{key}": best(values) if values else float("nan"),
            f"last_{key}": values[-1] if values else float("nan"),
            **{d.key: r.config.get(d.key) for d in space.dimensions},
            "path": str(trial_folder(plan, str(r.metrics.get("trial_id", "")))),
            "curve": list(zip([int(s) for s in df["step"]], values)) if evals else [],
        })  # fmt: skip
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols = [c for c in rows[0] if c not in ("path", "curve")]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict[str, Any]], space: SearchSpace, root: Path) -> tuple[Path, Path]:
    """Validation curves of every trial; each parameter against the trial's best metric."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = space.study.metric.replace("/", "_")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["curve"]:
            steps, vals = zip(*r["curve"])
            ax.plot(
                steps, vals, marker="o", ls="--" if r["status"] != "finished" else "-", label=r["trial"][-12:]
            )
    ax.set_xlabel("step")
    ax.set_ylabel(space.study.metric)
    ax.set_title("trials (dashed: stopped early)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(root / CURVES_PNG, dpi=100)
    plt.close(fig)
    dims = space.dimensions
    fig, axes = plt.subplots(1, len(dims), figsize=(3.2 * len(dims), 3), squeeze=False)
    for ax, d in zip(axes[0], dims):
        scored = [r for r in rows if r[f"best_{key}"] == r[f"best_{key}"]]  # trials that reported (not NaN)
        xs = [r[d.key] for r in scored]
        ys = [r[f"best_{key}"] for r in scored]
        ax.scatter([str(x) if d.kind in ("choice", "grid") else x for x in xs], ys)
        ax.set_xscale("log" if d.kind == "loguniform" else "linear")
        ax.set_xlabel(d.key)
        ax.set_ylabel(f"best {space.study.metric}")
        ax.tick_params(labelsize=7, which="both")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    fig.savefig(root / PARAMS_PNG, dpi=100)
    plt.close(fig)
    return root / CURVES_PNG, root / PARAMS_PNG


def best_yaml(plan: TrialPlan, params: dict[str, Any], root: Path) -> Path:
    """The winning recipe as a config file that runs as it is (its own run directory, no study run)."""
    from finetune.tune.trial import value_text
    from pretrain.engine import load_config
    from pretrain.engine.config import to_yaml

    cfg = load_config(
        plan.config_class,
        plan.config,
        [*plan.overrides, *(f"{k}={value_text(v)}" for k, v in params.items())],
    )
    cfg.train.run_dir = str(root / "best_recipe_run")
    cfg.tracking.parent_run_id = None
    path = root / "best.yaml"
    header = (
        f"# the best recipe of the study in {root} ({', '.join(f'{k}={v}' for k, v in params.items())})\n"
    )
    path.write_text(header + to_yaml(cfg))
    return path


def _trial_run(row: dict[str, Any]) -> str | None:
    f = Path(row["path"]) / RUN_DIR / "mlflow_run.json"
    return json.loads(f.read_text())["run_id"] if f.is_file() else None


def write_results(
    grid: Any, space: SearchSpace, base: Any, plan: TrialPlan, root: Path, max_t: int, args: Any
) -> dict[str, Any]:
    from mlflow import MlflowClient

    key = space.study.metric.replace("/", "_")
    rows = trial_rows(grid, space, plan, max_t)
    write_csv(rows, root / TRIALS_CSV)
    curves, params_png = plot(rows, space, root)
    scored = [r for r in rows if r[f"best_{key}"] == r[f"best_{key}"]]
    if not scored:
        raise RuntimeError(f"no trial reported {space.study.metric}: see the trial logs under {root / 'ray'}")
    pick = max if space.study.mode == "max" else min
    best = pick(scored, key=lambda r: r[f"best_{key}"])
    params = {d.key: best[d.key] for d in space.dimensions}
    recipe = best_yaml(plan, params, root)
    client = MlflowClient(plan.uri)
    for r in rows:
        run = _trial_run(r)
        if run:
            client.set_tag(run, "tubelet.tune.status", r["status"])
            if r["status"] != "finished" and client.get_run(run).info.status == "RUNNING":
                client.set_terminated(run, "KILLED")
    registered = _register(best, space, plan, client)
    parent = plan.parent_run_id
    if parent:
        client.log_metric(parent, f"best_{key}", best[f"best_{key}"])
        client.set_tag(parent, "tubelet.tune.best_trial", best["trial"])
        for f in (root / TRIALS_CSV, curves, params_png, recipe):
            client.log_artifact(parent, str(f))
        client.set_terminated(parent, "FINISHED")
    return {
        "metric": space.study.metric,
        "best": {"trial": best["trial"], "value": best[f"best_{key}"], "params": params},
        "trials": [{k: v for k, v in r.items() if k != "curve"} for r in rows],
        "best_yaml": str(recipe),
        "trials_csv": str(root / TRIALS_CSV),
        "curves": str(curves),
        "registered": registered,
    }


def _register(best: dict[str, Any], space: SearchSpace, plan: TrialPlan, client: Any) -> str | None:
    """The best trial's best model (its final one when it kept none) as a version of `study.register_as`."""
    name = space.study.register_as
    run = _trial_run(best)
    if not name or not run:
        return None
    from finetune.mlflow_model import log_model

    run_dir = Path(best["path"]) / RUN_DIR
    model_dir = run_dir / "best" if (run_dir / "best" / "config.json").is_file() else run_dir / "model"
    if (run_dir / "continual.json").is_file():  # a continual trial: its last experience's model
        n = len(json.loads((run_dir / "continual.json").read_text())["experiences"])
        model_dir = run_dir / f"experience_{n - 1}" / "model"
        run = json.loads((model_dir.parent / "mlflow_run.json").read_text())["run_id"]
    # a resumed study whose winner was registered since its model was written keeps that version (a name-only
    # filter: some registries, Unity Catalog among them, take a single condition)
    written_ms = (model_dir / "config.json").stat().st_mtime * 1000
    done = [
        int(v.version)
        for v in client.search_model_versions(f"name='{name}'")
        if v.run_id == run and v.creation_timestamp >= written_ms
    ]
    if done:
        return f"models:/{name}/{max(done)}"
    exp = client.get_run(run).info.experiment_id
    logged = log_model(
        model_dir, uri=plan.uri, run_id=run, experiment_id=exp, name="tune_best", register_as=name
    )
    return f"models:/{name}/{logged.registered_model_version}"
