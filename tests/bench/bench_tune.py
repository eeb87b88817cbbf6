"""ASHA vs random search with the same trials: how much compute does early stopping save?

    .venv/bin/python tests/bench/bench_tune.py [--shards S] [--init PRETRAINED] [--trials 12] [--steps 300]

Both studies run the same trials — a grid of `--trials` learning rates, log-spaced over [1e-4, 1e-2], on the
demo's fine-tune (`finetune/configs/tiny_cpu.yaml`, from `--init` or from scratch) — through
`python -m finetune tune`: once with no scheduler (every trial to the end: what random search over these
configurations spends) and once with ASHA (grace 1 evaluation, reduction factor 3), in the same seeded
random order. Compute is counted in
trial-steps (optimizer steps actually trained, summed over trials). Target: ASHA's best validation top-1 reaches
random search's best with <= 50 % of its compute. Prints the two studies' tables and one JSON summary line.
Without --shards the demo's set is made (synth 400 videos + build) under --work.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_finetune import make_shards  # noqa: E402


def study(a: argparse.Namespace, scheduler: str, shards: Path) -> tuple[list[dict], float]:
    lrs = [float(f"{x:.3g}") for x in np.logspace(-4, -2, a.trials)]
    np.random.default_rng(a.seed).shuffle(
        lrs
    )  # the order random search would draw them in (sorted is adversarial)
    space = a.work / f"space_{scheduler}.yaml"
    space.write_text(yaml.safe_dump({
        "study": {"num_samples": 1, "max_concurrent_trials": a.concurrent, "scheduler": scheduler,
                  "grace_period": 1, "reduction_factor": a.reduction_factor, "metric": "val/top1", "mode": "max"},
        "space": {"optim.lr": {"grid": lrs}},
    }))  # fmt: skip
    cmd = [PY, "-m", "finetune", "tune", "--config", str(REPO / "finetune/configs/tiny_cpu.yaml"),
           "--space", str(space), "--dir", str(a.work / f"study_{scheduler}"), f"data.shards={shards}",
           f"finetune.init={a.init or 'null'}", f"train.steps={a.steps}", f"train.eval_every={a.eval_every}",
           "optim.warmup_steps=10", f"tracking.uri=sqlite:///{a.work / 'mlflow.db'}", "--resume", "auto"]  # fmt: skip
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    with open(a.work / f"tune_{scheduler}.log", "w") as log:
        r = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"the {scheduler} study failed; see {a.work / f'tune_{scheduler}.log'}")
    rows = list(csv.DictReader((a.work / f"study_{scheduler}" / "trials.csv").open()))
    return rows, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/tubelet_tunebench"))
    p.add_argument("--shards", type=Path, default=None, help="an existing demo shard folder (train/val/test)")
    p.add_argument("--init", type=Path, default=None, help="a pretrained model dir (default: from scratch)")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--steps", type=int, default=300, help="per trial (the demo fine-tune's budget)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--concurrent", type=int, default=2)
    p.add_argument("--reduction-factor", type=int, default=3, help="ASHA's (keeps the top 1/rf at each rung)")
    p.add_argument("--seed", type=int, default=0, help="the order of the trials")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    shards = a.shards or a.work / "shards"
    make_shards(shards, a.work, 400, 0, 0)
    out = {}
    for scheduler in ("fifo", "asha"):
        rows, seconds = study(a, scheduler, shards)
        best = max(float(r["best_val_top1"]) for r in rows)
        compute = sum(int(r["steps"]) for r in rows)
        out[scheduler] = {"best_val_top1": best, "trial_steps": compute, "wall_s": round(seconds, 1),
                          "stopped_early": sum(r["status"] == "stopped early" for r in rows)}  # fmt: skip
        print(f"\n{scheduler}: best val top-1 {best:.3f}, {compute} trial-steps, {seconds:.0f} s")
        for r in rows:
            print(
                f"  lr {float(r['optim.lr']):<10.3g} {r['status']:<14} steps {r['steps']:>4}  best {float(r['best_val_top1']):.3f}"
            )
    ratio = out["asha"]["trial_steps"] / out["fifo"]["trial_steps"]
    reached = out["asha"]["best_val_top1"] >= out["fifo"]["best_val_top1"] - 1e-9
    summary = {"bench": "tune", "trials": a.trials, "steps": a.steps, **out, "compute_ratio": round(ratio, 3),
               "asha_reaches_random_best": reached, "target_met": reached and ratio <= 0.5}  # fmt: skip
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
