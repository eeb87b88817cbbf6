"""Multi-view evaluation: the head's clip scores → per video (by key, padding ignored) → gathered over ranks.

`python -m finetune evaluate --model DIR [--model DIR2 ...] --shards S --split test` works on any model
directory (fine-tuned, merged or with a sidecar; an exported HF classifier after conversion) and writes
top-1 / top-5, a per-class classification report, a confusion-matrix PNG and a JSON summary, logs them to
MLflow, and with several `--model`s prints a comparison table (e.g. linear probe vs fine-tuned).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.heads import DEFAULT_HEAD, HEADS, Head

# ------------------------------------------------------------------------------------------- scoring


def collect_scores(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    dtype: torch.dtype,
    head: Head = HEADS[DEFAULT_HEAD],
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(keys, the head's clip scores [n, K] float32 CPU, labels [n]) over this rank's batches, padding
    dropped."""
    return collect_outputs(lambda x: head.clip_scores(model(x.to(device, dtype))), batches)


def collect_outputs(
    clip_outputs: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[dict[str, Any]]
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(keys, `clip_outputs(video)` rows on the CPU, labels) over the batches, loader padding dropped: the one
    loop of evaluation (scores) and embedding (features)."""
    keys: list[str] = []
    outs, labels = [], []
    for batch in batches:
        out = clip_outputs(batch["video"]).cpu()
        keep = ~batch["pad"].cpu() if "pad" in batch else torch.ones(len(out), dtype=torch.bool)
        keys += [k for k, ok in zip(batch["key"], keep.tolist()) if ok]
        outs.append(out[keep])
        labels.append(batch["label"].cpu()[keep])
    if not outs:
        return [], torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
    return keys, torch.cat(outs), torch.cat(labels)


def gather_scores(
    keys: list[str], probs: torch.Tensor, labels: torch.Tensor
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """All ranks' clip scores on every rank (all_gather_object: gloo and nccl alike); no-op on one rank."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()) or td.get_world_size() == 1:
        return keys, probs, labels
    parts: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(parts, (keys, probs.numpy(), labels.numpy()))
    all_keys = [k for ks, _, _ in parts for k in ks]
    mats = [torch.from_numpy(p) for _, p, _ in parts if len(p)]
    labs = [torch.from_numpy(lb) for _, _, lb in parts if len(lb)]
    if not mats:
        return [], torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
    return all_keys, torch.cat(mats), torch.cat(labs)


def average_per_video(
    keys: list[str], probs: torch.Tensor, labels: torch.Tensor, reduce: str = "mean"
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Clip rows combined per video key (`reduce`: "mean", or "amax"; order: sorted keys), with the video's
    label."""
    order = sorted(set(keys))
    index = {k: i for i, k in enumerate(order)}
    ids = torch.tensor([index[k] for k in keys], dtype=torch.int64)
    k = probs.shape[1] if probs.ndim == 2 else 0
    out = torch.zeros(len(order), k, dtype=torch.float64).scatter_reduce(
        0, ids.unsqueeze(1).expand(-1, k), probs.double(), reduce=reduce, include_self=False
    )
    video_labels = torch.zeros(len(order), dtype=torch.int64)
    video_labels[ids] = labels
    return order, out.float(), video_labels


def summarize(
    keys: list[str], probs: torch.Tensor, labels: torch.Tensor, head: Head = HEADS[DEFAULT_HEAD]
) -> dict[str, Any]:
    """The head's metrics (single label: top-1 / top-5 / NLL) of the per-video scores."""
    vkeys, vprobs, vlabels = average_per_video(keys, probs, labels, head.view_reduce)
    if not vkeys:
        return {**head.metrics(vprobs, vlabels), "n": 0}
    return {
        **head.metrics(vprobs, vlabels),
        "n": len(vkeys),
        "keys": vkeys,
        "probs": vprobs,
        "labels": vlabels,
    }


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


def label_mapping(
    model_names: list[str] | None, shard_names: list[str] | None, model_dir: Any
) -> torch.Tensor | None:
    """Shard label → the model's head index: None when they are the same classes in the same order; a map
    when the model knows a subset (continual learning: the classes seen so far; -1 = not in the head, always
    counted wrong). Classes the shards do not have are an error naming both lists."""
    if not model_names or not shard_names or list(model_names) == list(shard_names):
        return None
    unknown = sorted(set(model_names) - set(shard_names))
    if unknown:
        raise ValueError(
            f"{model_dir} was trained on classes {model_names}, the shards have {shard_names} (missing "
            f"{unknown}): evaluate it on shards built with its classes (data_shards build --classes ...)"
        )
    index = {n: i for i, n in enumerate(model_names)}
    return torch.tensor([index.get(n, -1) for n in shard_names], dtype=torch.int64)


def _mapped(batches: Iterable[dict[str, Any]], mapping: torch.Tensor | None) -> Iterable[dict[str, Any]]:
    for b in batches:
        yield b if mapping is None else {**b, "label": mapping[b["label"].cpu()]}


def evaluate_model_dir(
    model_dir: str | Path,
    shards: str | Path,
    split: str = "test",
    *,
    clips: int | None = None,
    crops: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    backend: str = "auto",
    num_workers: int = 1,
    out_dir: str | Path | None = None,
    device: str = "cpu",
    labels: list[int] | None = None,
) -> dict[str, Any]:
    """Evaluate one model directory on a shard split (collective when several ranks run it); `labels`
    restricts the split to those classes (shard label ids)."""
    from data_shards.format import load_manifest
    from data_shards.loader import build_loader
    from finetune.model_dir import open_model_dir
    from pretrain.engine.dist import join_process_group

    group = join_process_group()
    rank, world = group.rank, group.world_size
    dev = torch.device(device)
    opened = open_model_dir(model_dir, device=dev, clips=clips, crops=crops, stride=stride)
    model, extra, spec, head = opened.model, opened.extra, opened.spec, opened.head
    manifest = load_manifest(shards)
    mapping = label_mapping(model.cfg.class_names, manifest.classes, model_dir)
    names = model.cfg.class_names or manifest.classes or [str(i) for i in range(model.cfg.num_classes)]
    views = spec.views_per_video
    loader = build_loader(
        shards,
        split,
        batch_size=max(views, batch_size // views * views),
        spec=spec,
        backend=backend,
        rank=rank,
        world_size=world,
        device=dev,
        num_workers=num_workers,
        drop_last=False,
        **({"labels": labels} if labels is not None else {}),
    )
    with torch.no_grad():
        scores = collect_scores(model, _mapped(loader, mapping), dev, torch.float32, head)
    m = summarize(*gather_scores(*scores), head)
    result: dict[str, Any] = {
        "model": str(model_dir),
        "model_dir": str(model_dir),
        "split": split,
        "top1": m["top1"],
        "top5": m["top5"],
        "loss": m["loss"],
        "n": m["n"],
        "views": f"{spec.eval_clips}x{spec.eval_crops}",
        "method": extra.get("finetune", {}).get("method"),
        "skipped": loader.stats["skipped"],
    }
    if m["n"] and rank == 0:
        out = Path(out_dir) if out_dir else Path(model_dir) / f"eval_{split}"
        write_report(result, m, list(names), out, f"{Path(model_dir).name} {split}", head)
    return result


def write_report(
    result: dict[str, Any],
    m: dict[str, Any],
    names: list[str],
    out: Path,
    title: str,
    head: Head = HEADS[DEFAULT_HEAD],
) -> None:
    """Per-class report, confusion PNG and metrics.json into `out` (videos whose class the model does not
    know are left out of the per-class table; they count as errors in top-1)."""
    known = m["labels"] >= 0
    preds = head.predictions(m["probs"])
    rows, cm, text = classification_report(m["labels"][known], preds[known], names)
    result.update(per_class=rows, report=text, confusion=cm.tolist(), out_dir=str(out))
    out.mkdir(parents=True, exist_ok=True)
    plot_confusion(cm, names, out / "confusion.png", f"{title} top-1 {m['top1']:.3f}")
    (out / "report.txt").write_text(text + "\n")
    (out / "metrics.json").write_text(
        json.dumps({k: v for k, v in result.items() if k != "report"}, indent=1) + "\n"
    )


def eval_metrics(result: dict[str, Any], prefix: str) -> dict[str, float]:
    """`{prefix}/top1`, `/top5`, `/n` and per-class `{prefix}/{precision,recall,f1}/{class}`."""
    metrics = {
        f"{prefix}/top1": result["top1"],
        f"{prefix}/top5": result["top5"],
        f"{prefix}/n": float(result["n"]),
    }
    for r in result.get("per_class", []):
        for m in ("precision", "recall", "f1"):
            metrics[f"{prefix}/{m}/{r['class']}"] = r[m]
    return metrics


def metric_prefix(model_dir: Path, split: str) -> str:
    """`test` for the model a run reports (its best, or its only one); `test_final` for `RUN/model` when the
    run also kept `RUN/best`, so evaluating both does not overwrite one with the other."""
    has_best = (model_dir.parent / "best" / "config.json").is_file()
    return f"{split}_final" if model_dir.name == "model" and has_best else split


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
    for f in ("confusion.png", "report.txt", "metrics.json"):
        tracker.log_artifact(out / f, "eval")
    tracker.close()
    return tracker.describe()


def _log_into_run(result: dict[str, Any], model: Path, uri: str, run_id: str) -> str:
    """Metrics at the model's training step, tags, and the report files under `eval/<model>_<split>/`."""
    import time
    import warnings

    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    from finetune.model_dir import model_extra

    split, out = result["split"], Path(result["out_dir"])
    prefix = metric_prefix(model, split)
    step = int(model_extra(model).get("step") or 0)
    now = int(time.time() * 1000)
    try:
        client = MlflowClient(uri)
        metrics = [Metric(k, float(v), now, step) for k, v in eval_metrics(result, prefix).items()]
        tags = [RunTag(f"{prefix}.views", str(result["views"])), RunTag(f"{prefix}.model", str(model))]
        client.log_batch(run_id, metrics=metrics, tags=tags)
        for f in ("confusion.png", "report.txt", "metrics.json"):
            client.log_artifact(run_id, str(out / f), f"eval/{model.name}_{split}")
    except Exception as e:  # the evaluation itself is done and written; MLflow is best effort
        warnings.warn(f"MLflow logging into run {run_id} at {uri} failed: {e}", stacklevel=2)
        return f"MLflow: not logged ({type(e).__name__}); the report is in {out}"
    return f"MLflow: {prefix}/* metrics and eval/{model.name}_{split}/ logged into the fine-tuning run {run_id} at {uri}"


def comparison_table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<40} {'method':<8} {'views':<6} {'videos':>6} {'top-1':>7} {'top-5':>7}"]
    for r in results:
        name = str(r["model"])[-40:]
        lines.append(
            f"{name:<40} {r.get('method') or '-':<8} {r['views']:<6} {r['n']:>6d} {100 * r['top1']:6.1f}% {100 * r['top5']:6.1f}%"
        )
    return "\n".join(lines)
