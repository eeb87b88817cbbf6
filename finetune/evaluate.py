"""Multi-view evaluation: the head's clip scores → per video (by key, padding ignored) → gathered over ranks.

`python -m finetune evaluate --model DIR [--model DIR2 ...] --shards S --split test` works on any model
directory (fine-tuned, merged or with a sidecar; an exported HF classifier after conversion) and scores it
here; what it leaves (per-class report, confusion PNG, `metrics.json`, MLflow logging, the comparison table of
several `--model`s) is `reports.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

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
    """(keys, the head's clip scores [n, K] (temporal: [n, T', K]) float32 CPU, the head's labels) over this
    rank's batches, padding dropped."""
    return collect_outputs(
        lambda b: head.clip_scores(
            model(b["video"].to(device, dtype), *[x.to(device, dtype) for x in head.inputs(b)])
        ),
        batches,
        lambda b, out: head.batch_labels(b, out.shape[-1]),
    )


def collect_outputs(
    clip_outputs: Callable[[dict[str, Any]], torch.Tensor],
    batches: Iterable[dict[str, Any]],
    labels_of: Callable[[dict[str, Any], torch.Tensor], torch.Tensor] = lambda b, out: b["label"],
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(keys, `clip_outputs(batch)` rows on the CPU, `labels_of(batch, outputs)`) over the batches, loader
    padding dropped: the one loop of evaluation (scores) and embedding (features)."""
    keys: list[str] = []
    outs, labels = [], []
    for batch in batches:
        out = clip_outputs(batch).cpu()
        keep = ~batch["pad"].cpu() if "pad" in batch else torch.ones(len(out), dtype=torch.bool)
        keys += [k for k, ok in zip(batch["key"], keep.tolist()) if ok]
        outs.append(out[keep])
        labels.append(labels_of(batch, out).cpu()[keep])
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
    labels (a class [n], or a multi-hot row [n, K])."""
    order = sorted(set(keys))
    index = {k: i for i, k in enumerate(order)}
    ids = torch.tensor([index[k] for k in keys], dtype=torch.int64)
    k = probs.shape[1] if probs.ndim == 2 else 0
    out = torch.zeros(len(order), k, dtype=torch.float64).scatter_reduce(
        0, ids.unsqueeze(1).expand(-1, k), probs.double(), reduce=reduce, include_self=False
    )
    video_labels = torch.zeros((len(order), *labels.shape[1:]), dtype=labels.dtype)
    video_labels[ids] = labels
    return order, out.float(), video_labels


def summarize(
    keys: list[str],
    probs: torch.Tensor,
    labels: torch.Tensor,
    head: Head = HEADS[DEFAULT_HEAD],
    threshold: float | None = None,
) -> dict[str, Any]:
    """The head's metrics (single label: top-1 / top-5 / NLL; multi-label: mAP, F1 at `threshold` or the
    best one) of the per-video scores (the temporal head: of every clip on its own)."""
    if head.per_video:
        vkeys, vprobs, vlabels = average_per_video(keys, probs, labels, head.view_reduce)
    else:
        vkeys, vprobs, vlabels = keys, probs, labels
    if not vkeys:
        return {**head.metrics(vprobs, vlabels, threshold), "n": 0}
    return {
        **head.metrics(vprobs, vlabels, threshold),
        "n": len(vkeys),
        "keys": vkeys,
        "probs": vprobs,
        "labels": vlabels,
    }


def label_mapping(
    model_names: list[str] | None, shard_names: list[str] | None, model_dir: Any, strict: bool = True
) -> torch.Tensor | None:
    """Shard label → the model's head index: None when they are the same classes in the same order; a map
    when the model knows a subset (continual learning: the classes seen so far; -1 = not in the head, always
    counted wrong). Classes the shards do not have are an error naming both lists, unless not `strict` (the
    update loop: a model that learned more classes since an older shard set was built)."""
    if not model_names or not shard_names or list(model_names) == list(shard_names):
        return None
    unknown = sorted(set(model_names) - set(shard_names))
    if unknown and strict:
        raise ValueError(
            f"{model_dir} was trained on classes {model_names}, the shards have {shard_names} (missing "
            f"{unknown}): evaluate it on shards built with its classes (data_shards build --classes ...)"
        )
    index = {n: i for i, n in enumerate(model_names)}
    return torch.tensor([index.get(n, -1) for n in shard_names], dtype=torch.int64)


def _mapped(batches: Iterable[dict[str, Any]], mapping: torch.Tensor | None) -> Iterable[dict[str, Any]]:
    """Shard label ids → the model's, in "label" and the label sets "labels" (−1 padding kept)."""
    for b in batches:
        if mapping is None:
            yield b
            continue
        sets = b["labels"].cpu()
        mapped_sets = torch.where(sets >= 0, mapping[sets.clamp_min(0)], sets)
        yield {**b, "label": mapping[b["label"].cpu()], "labels": mapped_sets}


def segment_metrics(model_dir: str | Path, loader: Any, stride: int | None = None) -> dict[str, float]:
    """Segment mAP at tIoU 0.3 / 0.5 / 0.7 of a temporal model: every video of the loader's split slid
    through the model as `predict` does (`Predictor.segments`), against the segments stored in the shards."""
    from finetune.predict import Predictor
    from finetune.temporal import Segment, segment_map

    predictor = Predictor(model_dir, stride=stride)
    index = {name: i for i, name in enumerate(predictor.labels)}
    predicted, truth = {}, {}
    for ref in loader.refs:
        found = predictor.segments(loader.reader.video_bytes(ref))["segments"]
        predicted[ref.ref] = [Segment(s["start"], s["end"], index[s["label"]], s["score"]) for s in found]
        truth[ref.ref] = [Segment(s, e, c) for s, e, c in ref.segments]
    return segment_map(predicted, truth)


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
    strict_classes: bool = True,
) -> dict[str, Any]:
    """Evaluate one model directory on a shard split (collective when several ranks run it); `labels`
    restricts the split to those classes (shard label ids); `strict_classes` (see `label_mapping`)."""
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
    mapping = (  # av_sync's classes are the sound's shifts, not the shards' classes
        None
        if head.kind == "av_sync"
        else label_mapping(model.cfg.class_names, manifest.classes, model_dir, strict_classes)
    )
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
    m = summarize(*gather_scores(*scores), head, extra.get("threshold"))
    result: dict[str, Any] = {
        "model": str(model_dir),
        "model_dir": str(model_dir),
        "split": split,
        "head": head.kind,
        **{k: m[k] for k in head.metric_names},
        "n": m["n"],
        "views": f"{spec.eval_clips}x{spec.eval_crops}",
        "method": extra.get("finetune", {}).get("method"),
        "skipped": loader.stats["skipped"],
    }
    if mapping is not None and (beyond := sorted(set(manifest.classes) - set(model.cfg.class_names))):
        result["unknown_classes"] = beyond  # their videos count as wrong: the model cannot predict them
    if m["n"] and rank == 0 and not head.per_video:  # a temporal model: its segments on whole videos
        result["segment_map"] = segment_metrics(model_dir, loader, stride)
    if m["n"] and rank == 0:
        out = Path(out_dir) if out_dir else Path(model_dir) / f"eval_{split}"
        from finetune.reports import write_report

        write_report(result, m, list(names), out, f"{Path(model_dir).name} {split}", head)
    return result
