"""Continual-learning benchmark: class-incremental, 4 experiences × 2 classes of the 8-class synthetic motion
set, every strategy at the same compute (steps per experience × clips per micro-batch), several seeds.

Everything runs through the real CLIs (`data_shards synth/build`, `pretrain`, `finetune continual`), one
after the other. The encoder starts from the demo's tiny MAE, pretrained without labels on the train split
(or `--pretrain RUN_DIR`); each strategy then fine-tunes it experience by experience. Prints a table
(average accuracy and forgetting after the last experience, BWT, forward transfer; mean ± std over seeds)
and one summary line with the targets: replay (or replay+LwF) cuts naive's forgetting by at least half and
reaches at least 80 % of joint's average accuracy. Not in the default test run; about 35 min on 2 cores:

    .venv/bin/python tests/bench/bench_continual.py [--work /tmp/clbench] [--seeds 3] [--steps 120]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from finetune.continual.strategies import STRATEGY_NAMES

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
STRATEGIES = STRATEGY_NAMES  # every strategy, in the registry's order


def sh(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "DS_ACCELERATOR": "cpu"}
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n  see {log}")
    return time.perf_counter() - t0


def prepare(a: argparse.Namespace) -> tuple[Path, Path]:
    """The 8-class shard set and the pretrained tiny MAE (made once, reused from --work)."""
    shards = a.shards or a.work / "shards"
    if not (shards / "manifest.json").is_file():
        raw = a.work / "raw"
        sh([PY, "-m", "data_shards", "synth", "--out", str(raw), "--videos", str(a.videos), "--classes", "8",
            "--frames", "24", "--size", "32", "--codec", "vp9"], a.work / "synth.log")  # fmt: skip
        sh([PY, "-m", "data_shards", "build", str(raw / "labels.csv"), "--out", str(shards),
            "--test-fraction", "0.2", "--quiet"], a.work / "build.log")  # fmt: skip
    pre = a.pretrain or a.work / "pretrain"
    if not (pre / "checkpoints").is_dir():
        t = sh([PY, "-m", "pretrain", "--config", str(REPO / "pretrain/configs/tiny_cpu.yaml"), f"data.shards={shards}",
                f"train.run_dir={pre}", "data.val_split=null", "train.visualize_every=0", "tracking.enabled=false"],
               a.work / "pretrain.log")  # fmt: skip
        print(f"pretraining: {t:.0f} s", flush=True)
    model = pre / "model"
    if not (model / "config.json").is_file():
        sh([PY, "-m", "pretrain", "export", str(pre), str(model)], a.work / "export.log")
    return shards, model


def run_strategy(a: argparse.Namespace, shards: Path, init: Path, strategy: str, seed: int) -> dict:
    run = a.work / "runs" / f"{strategy}_s{seed}"
    shutil.rmtree(run, ignore_errors=True)
    t = sh([PY, "-m", "finetune", "continual", "--config", str(REPO / "finetune/configs/tiny_cpu_continual.yaml"),
            f"data.shards={shards}", f"finetune.init={init}", f"train.run_dir={run}", f"continual.strategy={strategy}",
            "continual.experiences=[[0,1],[2,3],[4,5],[6,7]]", "continual.classes_per_experience=null",
            f"train.steps={a.steps}", f"train.seed={seed}", "tracking.enabled=false"], a.work / f"{run.name}.log")  # fmt: skip
    out = json.loads((run / "continual.json").read_text())
    out["seconds"] = t
    return out


def mean_std(values: list[float | None]) -> tuple[float, float]:
    v = [x for x in values if x is not None]
    if not v:
        return float("nan"), float("nan")
    return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def report(results: dict[str, list[dict]], a: argparse.Namespace) -> None:
    print(
        f"\nclass-incremental, 4 experiences × 2 classes, {a.steps} steps × 16 clips per experience, {a.seeds} seeds"
    )
    print(
        f"{'strategy':<20} {'avg accuracy':>14} {'forgetting':>14} {'BWT':>8} {'fwd transfer':>13} {'min/run':>8}"
    )
    summary = {}
    for s, runs in results.items():
        acc, forg = mean_std([r["average_accuracy"] for r in runs]), mean_std([r["forgetting"] for r in runs])
        bwt, fwt = mean_std([r["bwt"] for r in runs]), mean_std([r["forward_transfer"] for r in runs])
        summary[s] = (acc[0], forg[0])
        print(
            f"{s:<20} {100 * acc[0]:6.1f} ± {100 * acc[1]:4.1f} {100 * forg[0]:6.1f} ± {100 * forg[1]:4.1f} "
            f"{100 * bwt[0]:8.1f} {100 * fwt[0]:13.1f} {statistics.mean(r['seconds'] for r in runs) / 60:8.1f}"
        )
    if {"naive", "joint"} <= set(summary) and ({"replay", "replay_lwf"} & set(summary)):
        best = max((s for s in ("replay", "replay_lwf") if s in summary), key=lambda s: summary[s][0])
        cut = 1 - summary[best][1] / summary["naive"][1] if summary["naive"][1] > 0 else float("nan")
        share = summary[best][0] / summary["joint"][0]
        ok = cut >= 0.5 and share >= 0.8
        print(
            f"bench_continual: {'PASS' if ok else 'FAIL'} {best} cuts naive's forgetting by {100 * cut:.0f}% "
            f"(target >= 50%) and reaches {100 * share:.0f}% of joint's average accuracy (target >= 80%); "
            f"naive {100 * summary['naive'][0]:.1f}% / forgetting {100 * summary['naive'][1]:.1f}%, "
            f"joint {100 * summary['joint'][0]:.1f}%"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/tubelet_clbench"))
    p.add_argument("--videos", type=int, default=480)
    p.add_argument("--shards", type=Path, default=None)
    p.add_argument("--pretrain", type=Path, default=None, help="existing pretraining run dir")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per experience, every strategy")
    p.add_argument("--only", default=None, help="comma-separated strategies")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    shards, init = prepare(a)
    results: dict[str, list[dict]] = {}
    for strategy in a.only.split(",") if a.only else STRATEGIES:
        for seed in range(a.seeds):
            r = run_strategy(a, shards, init, strategy, seed)
            results.setdefault(strategy, []).append(r)
            print(
                f"{strategy:<20} seed {seed}: avg acc {100 * r['average_accuracy']:5.1f}%  forgetting "
                f"{100 * (r['forgetting'] or 0):5.1f}%  ({r['seconds']:.0f} s)",
                flush=True,
            )
    report(results, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
