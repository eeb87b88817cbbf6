"""`python -m pretrain --config FILE [key.sub=value ...] [--resume auto]` and `python -m pretrain export RUN OUT`.

Thin on purpose: parse → build the task → `engine.run` → report.
"""

from __future__ import annotations

import argparse
import sys

from pretrain.engine import export, load_config
from pretrain.engine.cli import (
    not_a_command,
    one_line_errors,
    strip_launcher_args,
    train_command,
    training_parser,
)


def main(argv: list[str] | None = None) -> int:
    argv = strip_launcher_args(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        return one_line_errors(lambda: _export(argv[1:]))
    if (typo := not_a_command(argv, ["export"], "python -m pretrain")) is not None:
        print(typo, file=sys.stderr)
        return 2
    p = training_parser(
        "python -m pretrain",
        "Masked-video pretraining (VideoMAE) on DeepSpeed",
        "pretrain/configs/tiny_cpu.yaml",
        "train.steps=50 data.shards=shards/",
        {"export": "a pretraining run's newest checkpoint -> a model directory (fp32, load_model)"},
    )
    args = p.parse_intermixed_args(argv)

    from pretrain.config import PretrainConfig
    from pretrain.data import DATA_ERRORS
    from pretrain.task import MaskedVideoTask

    return train_command(args, PretrainConfig, MaskedVideoTask, "tubelet", data_errors=DATA_ERRORS)


def _export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain export", description="checkpoint → model directory")
    p.add_argument("run_dir", help="a run directory, local or a URL (s3://...)")
    p.add_argument("out_dir", help="where the model directory goes, local or a URL")
    args = p.parse_args(argv)
    from pretrain.config import PretrainConfig
    from pretrain.engine.dist import prepare_env
    from pretrain.sources import run_to_export
    from pretrain.task import MaskedVideoTask

    prepare_env("cpu")  # consolidation runs on CPU; DS_ACCELERATOR before deepspeed is imported
    run = run_to_export(args.run_dir, args.out_dir, "pretrain")
    cfg = load_config(PretrainConfig, run / "config.yaml")
    out = export(run, args.out_dir, MaskedVideoTask(cfg))
    shown = out if isinstance(out, str) else out.resolve()
    print(f"[tubelet] model directory: {shown} (load with pretrain.models.load_model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
