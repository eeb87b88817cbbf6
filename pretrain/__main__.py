"""`python -m pretrain --config FILE [key.sub=value ...] [--resume auto]` and `python -m pretrain export RUN OUT`.

Thin on purpose: parse → build the task → `engine.run` → report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.engine import ConfigError, TrainingStopped, export, load_config, run
from pretrain.engine.dist import env_world_size


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return _export(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m pretrain", description="Masked-video pretraining (VideoMAE) on DeepSpeed"
    )
    p.add_argument("--config", required=True, help="YAML file, e.g. pretrain/configs/tiny_cpu.yaml")
    p.add_argument(
        "--resume", default=None, help="auto (newest complete checkpoint, else fresh) or a checkpoint dir"
    )
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.steps=50 data.shards=shards/")
    args = p.parse_intermixed_args(argv)

    from pretrain.task import MaskedVideoTask, PretrainConfig

    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        cfg.validate(env_world_size())
        result = run(MaskedVideoTask(cfg), cfg, resume=args.resume)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    if result.run_dir and _is_main():
        state = "stopped early (preemption or train.stop_at)" if result.preempted else "finished"
        print(f"\n[tubelet] {state} at step {result.step}; run dir: {result.run_dir.resolve()}")
        if result.preempted:
            print("[tubelet] continue with the same command plus --resume auto")
        if result.last_checkpoint:
            print(f"[tubelet] checkpoint: {result.last_checkpoint.resolve()}")
        if result.model_dir:
            print(f"[tubelet] model: {result.model_dir.resolve()}")
        print(f"[tubelet] {result.tracking}")
    return 0


def _export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain export", description="checkpoint → model directory")
    p.add_argument("run_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    args = p.parse_args(argv)
    from pretrain.engine.dist import prepare_env
    from pretrain.task import MaskedVideoTask, PretrainConfig

    prepare_env("cpu")  # consolidation runs on CPU; DS_ACCELERATOR before deepspeed is imported
    cfg = load_config(PretrainConfig, args.run_dir / "config.yaml")
    out = export(args.run_dir, args.out_dir, MaskedVideoTask(cfg))
    print(f"[tubelet] model directory: {out.resolve()} (load with pretrain.models.load_model)")
    return 0


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
