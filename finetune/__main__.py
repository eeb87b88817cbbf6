"""`python -m finetune --config FILE [key=value ...] [--resume auto]` and the `evaluate`, `predict`,
`export` subcommands. Thin on purpose: parse → build the task → `engine.run` (or one library call) → report.

    python -m finetune --config finetune/configs/tiny_cpu.yaml finetune.init=runs/tiny_cpu data.shards=S
    python -m finetune evaluate --model runs/ft/model --shards S --split test [--json]
    python -m finetune predict --model runs/ft/model a.mp4 b.webm [--top-k 5] [--json]
    python -m finetune export runs/ft OUT_DIR [--hf OUT_HF]
    python -m finetune continual --config finetune/configs/tiny_cpu_continual.yaml data.shards=S [--resume auto]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pretrain.engine import RunResult, export, load_config
from pretrain.engine.cli import is_main_rank, strip_launcher_args, train_command, training_parser


def main(argv: list[str] | None = None) -> int:
    argv = strip_launcher_args(sys.argv[1:] if argv is None else argv)
    sub = {"evaluate": _evaluate, "predict": _predict, "export": _export, "continual": _continual}
    if argv[:1] and argv[0] in sub:
        return sub[argv[0]](argv[1:])
    p = training_parser(
        "python -m finetune",
        "Video classification fine-tuning (full / PEFT)",
        "finetune/configs/tiny_cpu.yaml",
        "finetune.method=lora data.shards=S",
    )
    args = p.parse_intermixed_args(argv)

    from finetune.config import FinetuneConfig
    from finetune.task import BEST_DIR, ClassificationTask

    def report_best(task: ClassificationTask, result: RunResult) -> None:
        best = result.run_dir / BEST_DIR
        if task.best_step >= 0 and best.is_dir():
            print(
                f"[finetune] best model (val top-1 {task.best_top1:.4f} at step {task.best_step}): {best.resolve()}"
            )

    return train_command(args, FinetuneConfig, ClassificationTask, "finetune", report_best)


def _evaluate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m finetune evaluate", description="multi-view evaluation of model dirs"
    )
    p.add_argument("--model", action="append", required=True, help="model directory (repeat to compare)")
    p.add_argument("--shards", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--clips", type=int, default=None, help="temporal clips per video (default: as exported)")
    p.add_argument(
        "--crops", type=int, default=None, choices=[1, 3], help="spatial crops (default: as exported)"
    )
    p.add_argument("--stride", type=int, default=None, help="frame stride (default: as trained)")
    p.add_argument("--batch-size", type=int, default=15)
    p.add_argument("--backend", default="auto", choices=["auto", "dali", "pyav"])
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--out", default=None, help="report folder (default: MODEL/eval_SPLIT); one model only")
    p.add_argument("--json", action="store_true", help="one JSON line per model: model, top1, top5, n, ...")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument(
        "--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite beside the run"
    )
    p.add_argument("--experiment", default="tubelet-eval")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    from finetune.evaluate import comparison_table, evaluate_model_dir, log_to_mlflow
    from pretrain.engine.tracking import default_uri

    results = []
    for model in a.model:
        r = evaluate_model_dir(
            model,
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
        results.append(r)
        if not is_main_rank():
            continue
        if a.json:
            keep = ("model", "split", "top1", "top5", "n", "loss", "views", "method", "skipped")
            print(json.dumps({k: r[k] for k in keep}), flush=True)
        else:
            print(
                f"\n{model} — {a.split}: top-1 {100 * r['top1']:.2f}%  top-5 {100 * r['top5']:.2f}%  "
                f"({r['n']} videos, {r['views']} views)"
            )
            if r.get("report"):
                print(r["report"])
                print(f"confusion matrix: {Path(r['out_dir']) / 'confusion.png'}")
        if not a.no_mlflow and r.get("out_dir"):
            uri = (
                a.tracking_uri
                or os.environ.get("MLFLOW_TRACKING_URI")
                or default_uri(Path(model).resolve().parent)
            )
            where = log_to_mlflow(r, a.experiment, uri)
            if not a.json:
                print(f"[finetune] {where}")
    if len(results) > 1 and not a.json and is_main_rank():
        print("\n" + comparison_table(results))
    return 0


def _predict(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune predict", description="classify video files")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("videos", nargs="+")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--clips", type=int, default=None)
    p.add_argument("--crops", type=int, default=None, choices=[1, 3])
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--json", action="store_true", help="JSON lines")
    a = p.parse_intermixed_args(argv)
    from finetune.predict import predict_files, print_predictions

    failed = print_predictions(
        predict_files(a.model, a.videos, top_k=a.top_k, clips=a.clips, crops=a.crops, stride=a.stride), a.json
    )
    return 1 if failed else 0


def _continual(argv: list[str]) -> int:
    from finetune.continual.run import main as continual_main

    return continual_main(argv)


def _export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m finetune export", description="fine-tuning run → model directory"
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--hf", type=Path, default=None, help="also write HF VideoMAEForVideoClassification here")
    a = p.parse_args(argv)
    from finetune.config import FinetuneConfig
    from finetune.export import export_hf
    from finetune.task import ClassificationTask
    from pretrain.engine.dist import prepare_env
    from pretrain.models.io import RUN_MODEL_NAME, read_model_config

    prepare_env("cpu")
    cfg = load_config(FinetuneConfig, a.run_dir / "config.yaml")
    _, clf_cfg, _ = read_model_config(
        a.run_dir / RUN_MODEL_NAME
    )  # the run's architecture: the init is not read
    out = export(a.run_dir, a.out_dir, ClassificationTask(cfg, clf_cfg))
    print(f"[finetune] model directory: {out.resolve()}")
    if a.hf is not None:
        try:
            hf = export_hf(out, a.hf)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"[finetune] HF VideoMAEForVideoClassification: {hf.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
