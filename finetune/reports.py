"""What an evaluation leaves behind: the per-class report, the confusion matrix picture, `metrics.json`, the
comparison table of several models, and the evaluation logged to MLflow (into the fine-tuning run the model
belongs to when there is one). `evaluate.py` scores; this module reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_shards import storage
from finetune.heads import DEFAULT_HEAD, HEADS, Head, make_head


def head_of(result: dict[str, Any]) -> Head:
    """The head an evaluation result was scored with (single-label for results without one)."""
    return make_head(result.get("head", DEFAULT_HEAD))


def classification_report(
    labels: torch.Tensor, preds: torch.Tensor, class_names: list[str]
) -> tuple[list[dict[str, Any]], np.ndarray, str]:
    """Per-class precision / recall / F1 / support, the confusion matrix [true, pred], and a text table."""
    k = len(class_names)
    cm = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(labels.tolist(), preds.tolist()):
        cm[t, p] += 1
    rows = []
    for i, name in enumerate(class_names):
        tp, support, predicted = cm[i, i], cm[i].sum(), cm[:, i].sum()
        prec = tp / predicted if predicted else 0.0
        rec = tp / support if support else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        rows.append(
            {
                "class": name,
                "precision": float(prec),
                "recall": float(rec),
                "f1": float(f1),
                "support": int(support),
            }
        )
    width = max(12, *(len(n) for n in class_names))
    lines = [f"{'class':<{width}} precision  recall      f1  support"]
    for r in rows:
        lines.append(
            f"{r['class']:<{width}} {r['precision']:9.3f} {r['recall']:7.3f} {r['f1']:7.3f} {r['support']:8d}"
        )
    sup = cm.sum()
    macro = {m: float(np.mean([r[m] for r in rows])) for m in ("precision", "recall", "f1")}
    lines.append(
        f"{'macro avg':<{width}} {macro['precision']:9.3f} {macro['recall']:7.3f} {macro['f1']:7.3f} {sup:8d}"
    )
    return rows, cm, "\n".join(lines)


def plot_confusion(cm: np.ndarray, class_names: list[str], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 1.0 + 0.6 * k))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color="black")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------- model dirs


def write_report(
    result: dict[str, Any],
    m: dict[str, Any],
    names: list[str],
    out: Path,
    title: str,
    head: Head = HEADS[DEFAULT_HEAD],
) -> None:
    """Per-class report, confusion PNG (exclusive classes) and metrics.json into `out` (videos whose class
    the model does not know are left out of the per-class table; they count as errors in top-1)."""
    out.mkdir(parents=True, exist_ok=True)
    pairs = head.confusion_pairs(m)
    if pairs is None:  # labels that are not exclusive: per-class AP and F1 instead of a confusion matrix
        rows = head.class_rows(m, names)
        text = ap_table(rows)
        result.update(per_class=rows, report=text, out_dir=str(out))
    else:
        rows, cm, text = classification_report(*pairs, names)
        result.update(per_class=rows, report=text, confusion=cm.tolist(), out_dir=str(out))
        score = f"{head.primary} {m[head.primary]:.3f}"
        plot_confusion(cm, names, out / "confusion.png", f"{title} {score}")
    (out / "report.txt").write_text(text + "\n")
    (out / "metrics.json").write_text(
        json.dumps({k: v for k, v in result.items() if k != "report"}, indent=1) + "\n"
    )


def ap_table(rows: list[dict[str, Any]]) -> str:
    """The multi-label per-class table: AP, F1 at the threshold, videos with the label."""
    width = max(12, *(len(r["class"]) for r in rows))
    lines = [f"{'class':<{width}}      AP      f1  support"]
    lines += [f"{r['class']:<{width}} {r['ap']:7.3f} {r['f1']:7.3f} {r['support']:8d}" for r in rows]
    return "\n".join(lines)


def eval_metrics(result: dict[str, Any], prefix: str) -> dict[str, float]:
    """`{prefix}/{metric}` for the head's metrics (top1, top5 / map, f1 / ...), `/n` and per-class
    `{prefix}/{precision,recall,f1,ap}/{class}`."""
    metrics = {f"{prefix}/{k}": float(result[k]) for k in head_of(result).metric_names if k in result}
    metrics[f"{prefix}/n"] = float(result["n"])
    for t, v in result.get("segment_map", {}).items():
        metrics[f"{prefix}/segment_map_{t}"] = v
    for r in result.get("per_class", []):
        for m in ("precision", "recall", "f1", "ap"):
            if m in r:
                metrics[f"{prefix}/{m}/{r['class']}"] = r[m]
    return metrics


def metric_prefix(model_dir: str | Path, split: str) -> str:
    """`test` for the model a run reports (its best, or its only one); `test_final` for `RUN/model` when the
    run also kept `RUN/best`, so evaluating both does not overwrite one with the other. `model_dir`: where the
    run keeps it (a local path or a URL)."""
    has_best = storage.isfile(storage.join(storage.parent(model_dir), "best", "config.json"))
    return f"{split}_final" if storage.name(model_dir) == "model" and has_best else split


def log_to_mlflow(
    result: dict[str, Any], experiment: str, uri: str | None, run: tuple[str, str] | None = None
) -> str:
    """Log a test evaluation: into the fine-tuning run the model belongs to (`run` = (store URI, run id), from
    `RUN/mlflow_run.json` or the registry), as `test/*` metrics + report + confusion PNG, so the runs table
    compares fine-tunes side by side; else into a new run named after the model (`RUN_NAME/best`)."""
    model = Path(result["model_dir"])
    if run is not None and (uri is None or uri == run[0]):
        return _log_into_run(result, model, *run)
    from pretrain.engine.config import TrackingConfig
    from pretrain.engine.tracking import Tracker, default_uri

    out = Path(result["out_dir"])
    name = f"{model.resolve().parent.name}/{model.name}"
    cfg = TrackingConfig(experiment=experiment, uri=uri or default_uri(model.resolve().parent), run_name=name)
    tracker = Tracker(cfg, out, True)
    tracker.log_params(
        {
            "model": result["model"],
            "model_dir": result["model_dir"],
            "split": result["split"],
            "views": result["views"],
            "method": result["method"],
        }
    )
    tracker.log_metrics(eval_metrics(result, result["split"]), 0)
    for f in _report_files(out):
        tracker.log_artifact(f, "eval")
    tracker.close()
    return tracker.describe()


def _report_files(out: Path) -> list[Path]:
    """The files an evaluation wrote (labels that are not exclusive have no confusion matrix picture)."""
    return [out / f for f in ("confusion.png", "report.txt", "metrics.json") if (out / f).is_file()]


def _log_into_run(result: dict[str, Any], model: Path, uri: str, run_id: str) -> str:
    """Metrics at the model's training step, tags, and the report files under `eval/<model>_<split>/`."""
    import time
    import warnings

    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    from finetune.model_dir import model_extra

    split, out = result["split"], Path(result["out_dir"])
    # a model in a bucket is named as the run has it (RUN_URL/best), not by its local copy in the cache
    where = result["model"] if storage.is_url(result["model"]) else model
    name = storage.name(where)
    prefix = metric_prefix(where, split)
    step = int(model_extra(model).get("step") or 0)
    now = int(time.time() * 1000)
    try:
        client = MlflowClient(uri)
        metrics = [Metric(k, float(v), now, step) for k, v in eval_metrics(result, prefix).items()]
        tags = [RunTag(f"{prefix}.views", str(result["views"])), RunTag(f"{prefix}.model", str(where))]
        client.log_batch(run_id, metrics=metrics, tags=tags)
        for f in _report_files(out):
            client.log_artifact(run_id, str(f), f"eval/{name}_{split}")
    except Exception as e:  # the evaluation itself is done and written; MLflow is best effort
        warnings.warn(f"MLflow logging into run {run_id} at {uri} failed: {e}", stacklevel=2)
        return f"MLflow: not logged ({type(e).__name__}); the report is in {out}"
    return f"MLflow: {prefix}/* metrics and eval/{name}_{split}/ logged into the fine-tuning run {run_id} at {uri}"


def comparison_table(results: list[dict[str, Any]]) -> str:
    """Models side by side on one split: their head's first two metrics (top-1 / top-5, mAP / F1, ...)."""
    names = head_of(results[0]).metric_names[:2] if results else ("top1", "top5")
    cols = " ".join(f"{n:>7}" for n in names)
    lines = [f"{'model':<40} {'method':<8} {'views':<6} {'videos':>6} {cols}"]
    for r in results:
        name = str(r["model"])[-40:]
        vals = " ".join(f"{100 * r.get(n, float('nan')):6.1f}%" for n in names)
        lines.append(f"{name:<40} {r.get('method') or '-':<8} {r['views']:<6} {r['n']:>6d} {vals}")
    return "\n".join(lines)
