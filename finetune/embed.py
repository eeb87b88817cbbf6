"""`python -m finetune embed`: one embedding per video of a shard split, and nearest neighbours by cosine.

The embedding is the classifier's pooled feature (`forward_features`, before the head), averaged over the
video's eval views — the same `Predictor` sampling as `predict` / `serve` / `evaluate`. Written as Parquet
(`key`, `label`, `label_name`, `embedding`) or as `.npy` + a `.keys.jsonl` beside it (key, label, label_name
per row). A query video is decoded and embedded the same way and compared by cosine similarity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune.predict import Predictor

MODEL_META_KEY = b"tubelet.model"  # Parquet schema metadata: the model that made the embeddings


@dataclass
class Embeddings:
    """Rows in key order: `vectors_ND` float32, with each video's shard key and label (−1: unlabeled), and
    `model`: which model made them (`model_identity`), so a query by another model is refused."""

    keys: list[str]
    labels: np.ndarray
    label_names: list[str | None]
    vectors_ND: np.ndarray
    model: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.keys)


def model_identity(model_dir: str | Path, source: str, version: str | None = None) -> dict[str, Any]:
    """The model as given (`source`: a directory or a registry name), its registry version, and the sha256 of
    its weight files: embeddings from two models live in different spaces, the hash tells them apart."""
    import hashlib

    digest = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return {"source": source, "version": version, "sha256": digest.hexdigest()}


def check_same_model(emb: Embeddings, index: str | Path, identity: dict[str, Any]) -> None:
    """Refuse to query `index` with another model than the one that built it (ValueError naming both)."""
    if emb.model is None:
        raise ValueError(
            f"{index} does not record which model built it (written by an older tubelet): rebuild it with "
            "embed --shards ... --out, so queries can be checked against its model"
        )
    if emb.model.get("sha256") != identity["sha256"]:
        raise ValueError(
            f"{index} was built by {_named(emb.model)}, not by {_named(identity)}: "
            "embeddings of different models are not comparable; query with the model that built the index"
        )


def _named(identity: dict[str, Any]) -> str:
    """A model as the user gave it, with its registry version when it has one."""
    version = identity.get("version")
    return f"{identity.get('source')}" + (f" (version {version})" if version else "")


def embed_split(
    predictor: Predictor,
    shards: str | Path,
    split: str,
    *,
    batch_size: int = 16,
    backend: str = "auto",
    num_workers: int = 1,
) -> Embeddings:
    """Every video of `split`: features of each eval view, averaged per video (padding dropped)."""
    from data_shards.format import load_manifest
    from data_shards.loader import build_loader
    from finetune.evaluate import average_per_video, collect_outputs

    predictor.check_embeds()
    views = predictor.views_per_video
    loader = build_loader(
        shards,
        split,
        batch_size=max(views, batch_size // views * views),
        spec=predictor.spec,
        backend=backend,
        num_workers=num_workers,
        drop_last=False,
    )
    keys, feats, labels = collect_outputs(lambda b: predictor.clip_outputs(b["video"], features=True), loader)
    if not keys:
        raise ValueError(f"{shards}: split {split!r} has no videos")
    order, vectors, video_labels = average_per_video(keys, feats, labels)
    names = load_manifest(shards).classes or []
    label_names = [names[i] if 0 <= i < len(names) else None for i in video_labels.tolist()]
    return Embeddings(order, video_labels.numpy(), label_names, vectors.numpy().astype(np.float32))


def save(emb: Embeddings, path: str | Path) -> Path:
    """`.parquet` (one row per video, the embedding as a list column) or `.npy` + `<stem>.keys.jsonl`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "key": emb.keys,
                "label": pa.array(emb.labels, pa.int64()),
                "label_name": emb.label_names,
                "embedding": pa.array(list(emb.vectors_ND), pa.list_(pa.float32())),
            }
        )
        if emb.model is not None:
            table = table.replace_schema_metadata({MODEL_META_KEY: json.dumps(emb.model).encode()})
        pq.write_table(table, path)
    elif path.suffix == ".npy":
        np.save(path, emb.vectors_ND)
        rows = [
            json.dumps({"key": k, "label": int(lb), "label_name": n})
            for k, lb, n in zip(emb.keys, emb.labels, emb.label_names)
        ]
        keys_file(path).write_text("\n".join(rows) + "\n")
        if emb.model is not None:
            model_file(path).write_text(json.dumps(emb.model) + "\n")
    else:
        raise ValueError(f"{path}: write .parquet, or .npy (+ a .keys.jsonl beside it)")
    return path


def keys_file(npy: Path) -> Path:
    return npy.with_suffix(".keys.jsonl")


def model_file(npy: Path) -> Path:
    return npy.with_suffix(".model.json")


def load(path: str | Path) -> Embeddings:
    """What `save` wrote (`.npy` never with pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such embeddings file (write one with embed --shards ... --out FILE)"
        )
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        meta = (table.schema.metadata or {}).get(MODEL_META_KEY)
        t = table.to_pydict()
        vectors = np.asarray(t["embedding"], dtype=np.float32)
        labels = np.asarray(t["label"], np.int64)
        return Embeddings(t["key"], labels, t["label_name"], vectors, json.loads(meta) if meta else None)
    if path.suffix == ".npy":
        rows = [json.loads(line) for line in keys_file(path).read_text().splitlines() if line]
        vectors = np.load(path, allow_pickle=False).astype(np.float32)
        labels = np.asarray([r["label"] for r in rows], np.int64)
        model = json.loads(model_file(path).read_text()) if model_file(path).is_file() else None
        return Embeddings([r["key"] for r in rows], labels, [r["label_name"] for r in rows], vectors, model)
    raise ValueError(f"{path}: expected a .parquet or .npy embeddings file")


def _unit(x_ND: np.ndarray) -> np.ndarray:
    return x_ND / np.maximum(np.linalg.norm(x_ND, axis=-1, keepdims=True), 1e-12)


def neighbours(emb: Embeddings, query_D: np.ndarray, k: int = 5) -> list[dict[str, Any]]:
    """The `k` most cosine-similar videos to `query_D`, best first."""
    sims = _unit(emb.vectors_ND) @ _unit(query_D[None])[0]
    best = np.argsort(-sims, kind="stable")[: max(1, k)]
    return [
        {"key": emb.keys[i], "label": emb.label_names[i], "cosine": round(float(sims[i]), 6)} for i in best
    ]


def neighbour_agreement(emb: Embeddings) -> tuple[float, float]:
    """(fraction of labelled videos whose nearest other video by cosine has the same label, the same
    fraction expected by chance for these class counts): how well the embedding groups the classes."""
    ok = emb.labels >= 0
    x, y = _unit(emb.vectors_ND[ok]), emb.labels[ok]
    n = len(y)
    if n < 2:
        return float("nan"), float("nan")
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    agree = float(np.mean(y[sims.argmax(1)] == y))
    counts = np.bincount(y)
    chance = float((counts * (counts - 1)).sum() / (n * (n - 1)))
    return agree, chance
