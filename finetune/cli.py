"""The `python -m finetune` command line: one parser per job, each calling that job's library function.

python -m finetune --config finetune/configs/tiny_cpu.yaml finetune.init=runs/tiny_cpu data.shards=S
python -m finetune evaluate --model runs/ft/model --shards S --split test [--json]
python -m finetune predict --model runs/ft/model a.mp4 b.webm [--top-k 5] [--json]
python -m finetune export runs/ft OUT_DIR [--hf OUT_HF]
python -m finetune continual --config finetune/configs/tiny_cpu_continual.yaml data.shards=S [--resume auto]
python -m finetune serve --model runs/ft/best|models:/NAME/VERSION|models:/NAME@ALIAS [--port 8000]
python -m finetune embed --model runs/ft/best --shards S --split test --out emb.parquet [--query a.mp4]
python -m finetune update --config finetune/configs/update.yaml model=NAME videos=NEW/labels.csv
python -m finetune rollback NAME [--tracking-uri URI]
python -m finetune tune --config finetune/configs/tiny_cpu.yaml --space finetune/configs/tune_space.yaml data.shards=S
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_shards import storage
from pretrain.engine import RunResult, export, load_config
from pretrain.engine.cli import (
    is_main_rank,
    not_a_command,
    one_line_errors,
    strip_launcher_args,
    train_command,
    training_parser,
)


def main(argv: list[str] | None = None) -> int:
    argv = strip_launcher_args(sys.argv[1:] if argv is None else argv)
    sub = {  # name: (command, what it does: listed under `python -m finetune --help`)
        "evaluate": (_evaluate, "multi-view metrics of model directories on a split of shards"),
        "predict": (_predict, "predict video files, folders or glob patterns with a model"),
        "export": (_export, "a fine-tuning run's newest checkpoint -> a model directory"),
        "embed": (_embed, "one embedding per video; nearest neighbours"),
        "continual": (_continual, "fine-tune over a sequence of experiences without forgetting"),
        "tune": (_tune, "hyperparameter search on Ray Tune"),
        "serve": (_serve, "HTTP inference on Ray Serve (/predict, /embed, /health, /metadata)"),
        "update": (_update, "one update round: shard new videos, re-fine-tune, gate, register, promote"),
        "rollback": (_rollback, "move the registered model's champion alias back one version"),
    }
    if argv[:1] and argv[0] in sub:
        command = sub[argv[0]][0]
        return one_line_errors(lambda: command(argv[1:]))
    if (typo := not_a_command(argv, sub, "python -m finetune")) is not None:
        print(typo, file=sys.stderr)
        return 2
    p = training_parser(
        "python -m finetune",
        "Video classification fine-tuning (full / PEFT)",
        "finetune/configs/tiny_cpu.yaml",
        "finetune.method=lora data.shards=S",
        {name: what for name, (_, what) in sub.items()},
    )
    args = p.parse_intermixed_args(argv)

    from finetune.config import FinetuneConfig
    from finetune.task import BEST_DIR, ClassificationTask
    from pretrain.data import DATA_ERRORS

    def report_best(task: ClassificationTask, result: RunResult) -> None:
        best = result.run_dir / BEST_DIR
        if task.best_step >= 0 and best.is_dir():
            where = f"{result.location}/{BEST_DIR}" if result.location else best.resolve()
            print(
                f"[finetune] best model (val {task.head.primary} {task.best_score:.4f} at step {task.best_step}): {where}"
            )

    return train_command(args, FinetuneConfig, ClassificationTask, "finetune", report_best, DATA_ERRORS)


def _evaluate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m finetune evaluate", description="multi-view evaluation of model dirs"
    )
    p.add_argument(
        "--model", action="append", required=True, help="model dir or models:/NAME/VERSION|@ALIAS (repeat)"
    )
    p.add_argument("--shards", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--clips", type=_positive_int, default=None, help="temporal clips per video (default: as exported)")
    p.add_argument(
        "--crops", type=int, default=None, choices=[1, 3], help="spatial crops (default: as exported)"
    )
    p.add_argument("--stride", type=_positive_int, default=None, help="frame stride (default: as trained)")
    p.add_argument("--batch-size", type=_positive_int, default=15)
    p.add_argument("--backend", default="auto", choices=["auto", "dali", "pyav"])
    p.add_argument("--num-workers", type=_natural_int, default=1)
    p.add_argument("--out", default=None, help="report folder (default: MODEL/eval_SPLIT); one model only")
    p.add_argument("--json", action="store_true", help="one JSON line per model: model, top1, top5, n, ...")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="default: $MLFLOW_TRACKING_URI, else the model's own run store (RUN/mlflow_run.json), else "
        "sqlite beside the run",
    )
    p.add_argument("--experiment", default="tubelet-eval", help="for models that belong to no MLflow run")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.out is not None and len(a.model) > 1:
        p.error("--out takes one model (each model's report goes to MODEL/eval_SPLIT without it)")
    from finetune.reports import comparison_table

    uri = a.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    results = [_evaluate_one(model, a, uri) for model in a.model]
    if len(results) > 1 and not a.json and is_main_rank():
        print("\n" + comparison_table(results))
    return 0


def _evaluate_one(model: str, a: argparse.Namespace, uri: str | None) -> dict:
    """Evaluate one model (a directory or a registry version), print it, log it to its MLflow run."""
    from finetune.evaluate import evaluate_model_dir
    from finetune.reports import log_to_mlflow

    src = _resolve(model, uri)
    r = evaluate_model_dir(
        src.model_dir,
        a.shards,
        a.split,
        clips=a.clips,
        crops=a.crops,
        stride=a.stride,
        batch_size=a.batch_size,
        backend=a.backend,
        num_workers=a.num_workers,
        out_dir=a.out if len(a.model) == 1 else None,
    )
    r["model"], r["model_dir"] = model, str(src.model_dir)  # reported by the name the user gave
    if not is_main_rank():
        return r
    if a.json:
        drop = ("per_class", "report", "confusion", "out_dir")
        print(json.dumps({k: v for k, v in r.items() if k not in drop}), flush=True)
    else:
        from finetune.heads import make_head

        head = make_head(r["head"])
        what = "videos" if head.per_video else "clips"
        print(f"\n{model} — {a.split}: {head.summary_line(r)}  ({r['n']} {what}, {r['views']} views)")
        if r.get("unknown_classes"):
            print(
                f"note: the shards' classes {r['unknown_classes']} are not the model's: their videos count as "
                "wrong (it cannot predict them); build shards with its classes to score it on those alone"
            )
        if r.get("report"):
            print(r["report"])
            if "confusion" in r:
                print(f"confusion matrix: {Path(r['out_dir']) / 'confusion.png'}")
    if not a.no_mlflow and r.get("out_dir"):
        where = log_to_mlflow(r, a.experiment, a.tracking_uri or (uri if not src.run else None), src.run)
        if not a.json:
            print(f"[finetune] {where}")
    return r


def _resolve(source: str, uri: str | None) -> Any:
    """A model directory for `--model` (a directory or a registry version); a bad one ends the command with
    the reason and exit code 2."""
    from finetune.registry import resolve_model

    try:
        return resolve_model(source, uri)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: --model {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _predict(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune predict", description="classify video files")
    p.add_argument("--model", required=True, help="model dir | models:/NAME/VERSION | models:/NAME@ALIAS")
    p.add_argument("videos", nargs="+", help="video files, folders of videos, or glob patterns ('*.mp4')")
    p.add_argument("--top-k", type=_positive_int, default=5, help="labels per video (>= 1)")
    p.add_argument("--clips", type=_positive_int, default=None, help="temporal clips per video (default: as exported)")
    p.add_argument("--crops", type=int, default=None, choices=[1, 3])
    p.add_argument("--stride", type=_positive_int, default=None)
    p.add_argument("--json", action="store_true", help="JSON lines")
    p.add_argument("--tracking-uri", default=None, help="MLflow store of models:/ sources")
    p.add_argument(
        "--summary",
        default=None,
        metavar="DIR",
        help="temporal models: write DIR/<video>_summary.mp4, the best-scoring segments joined in time order",
    )
    p.add_argument("--summary-seconds", type=float, default=5.0, help="length of a summary at most")
    _limit_args(p)
    a = p.parse_intermixed_args(argv)
    from finetune.predict import expand_inputs, predict_files, print_predictions

    videos = expand_inputs(a.videos)
    model = _resolve(a.model, a.tracking_uri).model_dir
    summary = (Path(a.summary), a.summary_seconds) if a.summary else None
    results = predict_files(
        model,
        videos,
        top_k=a.top_k,
        clips=a.clips,
        crops=a.crops,
        stride=a.stride,
        limits=_limits(a),
        summary=summary,
    )
    failed = print_predictions(results, a.json)
    return 1 if failed else 0


def _limit_args(p: argparse.ArgumentParser) -> None:
    """What one file may make the decoder do (refused from its headers, before decoding a frame)."""
    p.add_argument(
        "--max-pixels", type=int, default=3840 * 2160, help="per frame (default 4K UHD); 0 = no limit"
    )
    p.add_argument(
        "--max-decode-seconds", type=float, default=3600.0, help="video duration (default 1 h); 0 = no limit"
    )


def _limits(a: argparse.Namespace) -> Any:
    from data_shards.loader.pyav import DecodeLimits

    return DecodeLimits(a.max_pixels or None, a.max_decode_seconds or None)


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`, refused by name below it (never replaced by a default)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: give an integer >= {low}")
        return value

    parse.__name__ = "int"  # argparse's "invalid int value" for text that is no number
    return parse


_positive_int, _natural_int = _int_at_least(1), _int_at_least(0)


def _serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m finetune serve",
        description="HTTP video classification on Ray Serve: POST /predict, /embed; GET /health, /metadata",
    )
    p.add_argument("--model", required=True, help="model dir | models:/NAME/VERSION | models:/NAME@ALIAS")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=_positive_int, default=1)
    p.add_argument("--max-batch-size", type=_positive_int, default=8, help="videos per forward (1 = no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, help="how long a batch waits to fill")
    p.add_argument("--max-ongoing-requests", type=int, default=None, help="per replica (default 2 x batch)")
    p.add_argument("--max-upload-mb", type=float, default=64.0, help="larger request bodies get 413")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--clips", type=_positive_int, default=None, help="temporal clips per video (default: as exported)")
    p.add_argument("--crops", type=int, default=None, choices=[1, 3])
    p.add_argument(
        "--ray-address", default=None, help="HOST:PORT of an existing Ray cluster (default: local)"
    )
    p.add_argument("--tracking-uri", default=None, help="MLflow store of models:/ sources")
    _limit_args(p)
    p.add_argument(
        "--auth-token",
        default=os.environ.get("TUBELET_SERVE_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' on every endpoint but /health "
        "(default: $TUBELET_SERVE_TOKEN; prefer the variable: arguments show in ps)",
    )
    p.add_argument(
        "--reload-interval",
        type=float,
        default=10.0,
        help="seconds between checks of a models:/NAME@ALIAS source; a moved alias is loaded and swapped in "
        "(0 = never)",
    )
    p.add_argument("--capture", default=None, help="DIR or URL: store accepted uploads with their prediction")
    p.add_argument("--capture-rate", type=float, default=1.0, help="fraction of accepted uploads captured")
    p.add_argument(
        "--capture-max-bytes", type=int, default=1 << 30, help="stop capturing past this many video bytes"
    )
    a = p.parse_args(argv)
    from finetune.serve import ServeConfig, run
    from pretrain.engine import ConfigError

    try:
        run(ServeConfig(**{k: v for k, v in vars(a).items()}))
    except (ConfigError, FileNotFoundError, ValueError, ConnectionError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _embed(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m finetune embed",
        description="one embedding per video (pooled features, mean of the eval views); nearest neighbours",
    )
    p.add_argument("--model", required=True, help="model dir | models:/NAME/VERSION | models:/NAME@ALIAS")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="embed every video of --split of these shards")
    src.add_argument("--index", type=Path, help="an embeddings file written before (.parquet / .npy)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", type=Path, default=None, help="FILE.parquet, or FILE.npy + FILE.keys.jsonl")
    p.add_argument("--query", nargs="*", default=[], help="video files: print their nearest neighbours")
    p.add_argument("-k", type=_positive_int, default=5, help="neighbours per query")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--backend", default="auto", choices=["auto", "dali", "pyav"])
    p.add_argument("--num-workers", type=_natural_int, default=1)
    p.add_argument("--tracking-uri", default=None, help="MLflow store of models:/ sources")
    a = p.parse_args(argv)
    from finetune import embed
    from finetune.predict import Predictor, VideoInputError

    src = _resolve(a.model, a.tracking_uri)
    predictor = Predictor(src.model_dir)
    identity = embed.model_identity(src.model_dir, a.model, src.version)
    if a.shards:
        emb = embed.embed_split(
            predictor,
            a.shards,
            a.split,
            batch_size=a.batch_size,
            backend=a.backend,
            num_workers=a.num_workers,
        )
        emb.model = identity
        agree, chance = embed.neighbour_agreement(emb)
        where = f" → {embed.save(emb, a.out).resolve()}" if a.out else ""
        print(
            f"[embed] {len(emb)} videos of {a.split}, {emb.vectors_ND.shape[1]}-dim{where}\n[embed] nearest "
            f"neighbour has the same label: {100 * agree:.1f}% (chance {100 * chance:.1f}%)",
            flush=True,
        )
    else:
        emb = embed.load(a.index)
        if a.query:
            embed.check_same_model(emb, a.index, identity)
    failed = 0
    for q in a.query:
        try:
            (vec,) = predictor.embeddings([predictor.decode(Path(q).read_bytes())])
        except (OSError, VideoInputError) as e:
            print(f"error: {q}: {e}", file=sys.stderr)
            failed += 1
            continue
        print(json.dumps({"query": q, "neighbours": embed.neighbours(emb, vec.numpy(), a.k)}), flush=True)
    return 1 if failed else 0


def _continual(argv: list[str]) -> int:
    from finetune.continual.run import main as continual_main

    return continual_main(argv)


def _update(argv: list[str]) -> int:
    from finetune.update.round import main as update_main

    return update_main(argv)


def _tune(argv: list[str]) -> int:
    from finetune.tune.study import main as tune_main

    return tune_main(argv)


def _rollback(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m finetune rollback",
        description="move the registered model's 'champion' alias back to the champion before it",
    )
    p.add_argument("name", help="the registered model")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="default: $MLFLOW_TRACKING_URI, else the default store here that registers NAME "
        "(./mlflow.db, runs/mlflow.db, runs/update/mlflow.db)",
    )
    a = p.parse_args(argv)
    from mlflow.exceptions import MlflowException

    from finetune.registry import registry_store
    from finetune.update.promote import rollback

    uri = registry_store(f"models:/{a.name}@champion", a.tracking_uri)
    try:
        old, new = rollback(uri, a.name)
    except MlflowException as e:  # the store unreachable, an unsupported URI
        print(f"error: MLflow at {uri}: {' '.join(str(e).split())[:500]}", file=sys.stderr)
        return 2
    print(f"[rollback] {a.name}: champion {old} -> {new} (a server following @champion reloads it)")
    return 0


def _export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m finetune export", description="fine-tuning run → model directory"
    )
    p.add_argument("run_dir", help="a fine-tuning run directory, local or a URL (s3://...)")
    p.add_argument("out_dir", help="where the model directory goes, local or a URL")
    p.add_argument("--hf", type=Path, default=None, help="also write HF VideoMAEForVideoClassification here")
    p.add_argument(
        "--onnx", action="store_true", help="also write OUT_DIR/model.onnx, checked against onnxruntime"
    )
    a = p.parse_args(argv)
    if a.hf is not None and a.hf.exists() and not a.hf.is_dir():  # transformers only asserts
        p.error(f"--hf {a.hf}: a file; give a folder for the HF model")
    from finetune.config import FinetuneConfig
    from finetune.export import export_hf
    from finetune.task import ClassificationTask
    from pretrain.engine.dist import prepare_env
    from pretrain.models.io import RUN_MODEL_NAME, read_model_config
    from pretrain.sources import run_to_export

    prepare_env("cpu")
    run = run_to_export(a.run_dir, a.out_dir, "classification")
    cfg = load_config(FinetuneConfig, run / "config.yaml")
    _, clf_cfg, _ = read_model_config(run / RUN_MODEL_NAME)  # the run's architecture: the init is not read
    with storage.staged_dir(a.out_dir) as local:  # a URL gets the finished directory (with model.onnx)
        out = export(run, local, ClassificationTask(cfg, clf_cfg))
        failed = _export_onnx(out) if a.onnx else 0
        if a.hf is not None:
            try:
                hf = export_hf(out, a.hf)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            print(f"[finetune] HF VideoMAEForVideoClassification: {hf.resolve()}")
    print(f"[finetune] model directory: {a.out_dir if storage.is_url(a.out_dir) else out.resolve()}")
    return failed


def _export_onnx(model_dir: Path) -> int:
    """model.onnx beside the model directory's weights + the onnxruntime parity report; 1 when it fails."""
    from finetune.onnx_export import PARITY_ATOL, check_parity, export_onnx

    try:
        path = export_onnx(model_dir)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    r = check_parity(model_dir, path)
    diffs = ", ".join(f"batch {b}: {d:.2e}" for b, d in r["max_abs_diff"].items())
    print(f"[finetune] ONNX: {path.resolve()}")
    print(f"[finetune] onnxruntime vs PyTorch, max abs diff on logits: {diffs} (tolerance {PARITY_ATOL:g})")
    print(f"[finetune] dynamic batch axis: {'yes' if r['dynamic_batch'] else 'NO (fixed at export)'}")
    if not r["ok"]:
        print("error: the ONNX graph does not match the model (see above)", file=sys.stderr)
    return 0 if r["ok"] else 1
