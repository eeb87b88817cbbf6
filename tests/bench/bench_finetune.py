"""Fine-tuning benchmark on the synthetic motion set: test top-1 after the same fine-tune budget for
from-scratch vs masked-pretrained starts, and per PEFT method (full, linear, LoRA, adapter, BitFit).

Everything runs through the real CLIs (`data_shards synth/build`, `pretrain`, `finetune`, `finetune
evaluate --json`), one after the other. Not part of the default test run; several minutes on 2 cores:

    .venv/bin/python tests/bench/bench_finetune.py [--work /tmp/ftbench] [--steps 300] [--videos 200]
    .venv/bin/python tests/bench/bench_finetune.py --shards S --pretrain RUN_DIR   # reuse existing ones

Target: the pretrained full fine-tune beats the scratch one at the same budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable

# (name, init from the pretraining run?, method, extra overrides): LR per method family, the rest shared
RUNS: list[tuple[str, bool, str, list[str]]] = [
    ("scratch/full", False, "full", []),
    ("pretrained/full", True, "full", []),
    (
        "pretrained/linear",
        True,
        "linear",
        ["optim.lr=1e-2", "optim.layer_decay=1.0", "optim.weight_decay=0.0"],
    ),
    (
        "pretrained/lora",
        True,
        "lora",
        ["optim.lr=2e-3", "optim.layer_decay=1.0", "finetune.lora_targets=[qkv,proj,fc1,fc2,patch_embed]"],
    ),
    (
        "pretrained/adapter",
        True,
        "adapter",
        ["optim.lr=2e-3", "optim.layer_decay=1.0", "finetune.adapter_width=16"],
    ),
    ("pretrained/bitfit", True, "bitfit", ["optim.lr=2e-3", "optim.layer_decay=1.0"]),
]


def sh(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n  see {log}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/tubelet_ftbench"))
    p.add_argument("--videos", type=int, default=200)
    p.add_argument("--shards", type=Path, default=None, help="existing shard folder (train/val/test)")
    p.add_argument("--pretrain", type=Path, default=None, help="existing pretraining run dir")
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--steps", type=int, default=300, help="fine-tune budget (optimizer steps) of every run")
    p.add_argument("--only", default=None, help="comma-separated run names")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    cfg = REPO / "finetune" / "configs" / "tiny_cpu.yaml"

    shards = a.shards or a.work / "shards"
    if not (shards / "manifest.json").is_file():
        raw = a.work / "raw"
        sh([PY, "-m", "data_shards", "synth", "--out", str(raw), "--videos", str(a.videos), "--classes", "4",
            "--frames", "32", "--size", "64", "--codec", "vp9"], a.work / "synth.log")  # fmt: skip
        sh([PY, "-m", "data_shards", "build", str(raw / "labels.csv"), "--out", str(shards),
            "--val-fraction", "0.15", "--test-fraction", "0.15", "--quiet"], a.work / "build.log")  # fmt: skip
    pre = a.pretrain or a.work / "pretrain"
    if not (pre / "checkpoints").is_dir():
        t = sh([PY, "-m", "pretrain", "--config", str(REPO / "pretrain/configs/tiny_cpu.yaml"), f"data.shards={shards}",
                f"train.run_dir={pre}", f"train.steps={a.pretrain_steps}", "train.visualize_every=0",
                "tracking.enabled=false"], a.work / "pretrain.log")  # fmt: skip
        print(f"pretraining: {a.pretrain_steps} steps in {t:.0f} s", flush=True)

    rows = []
    only = set(a.only.split(",")) if a.only else None
    for name, pretrained, method, extra in RUNS:
        if only and name not in only:
            continue
        run = a.work / "runs" / name.replace("/", "_")
        if run.exists():
            import shutil

            shutil.rmtree(run)
        t = sh([PY, "-m", "finetune", "--config", str(cfg), f"data.shards={shards}", f"train.run_dir={run}",
                f"finetune.init={pre if pretrained else 'null'}", f"finetune.method={method}", f"train.steps={a.steps}",
                "tracking.enabled=false", *extra], a.work / f"{run.name}.log")  # fmt: skip
        out = subprocess.run(
            [PY, "-m", "finetune", "evaluate", "--model", str(run / "model"), "--shards", str(shards), "--split", "test",
             "--json", "--no-mlflow"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        )  # fmt: skip
        line = next((x for x in out.stdout.splitlines()[::-1] if x.startswith("{")), None)
        if line is None:
            raise SystemExit(f"evaluate failed for {run}:\n{out.stderr[-2000:]}")
        res = json.loads(line)
        info = json.loads((run / "model" / "config.json").read_text())["extra"]["finetune"]
        rows.append((name, info["trainable_pct"], res["top1"], res["top5"], res["n"], t))
        print(
            f"{name:<20} trainable {info['trainable_pct']:7.3f}%  test top-1 {100 * res['top1']:5.1f}%  ({t:.0f} s)",
            flush=True,
        )

    print(
        f"\nfine-tune budget: {a.steps} steps × batch 8 (tiny ViT, 32 px, 8 frames); test split, 2 clips × 1 crop"
    )
    print(f"{'run':<20} {'trainable':>10} {'top-1':>7} {'top-5':>7} {'videos':>6} {'wall':>6}")
    for name, pct, top1, top5, n, t in rows:
        print(f"{name:<20} {pct:9.3f}% {100 * top1:6.1f}% {100 * top5:6.1f}% {n:>6d} {t:5.0f}s")
    by = {r[0]: r[2] for r in rows}
    if "scratch/full" in by and "pretrained/full" in by:
        gain = 100 * (by["pretrained/full"] - by["scratch/full"])
        verdict = "PASS" if gain > 0 else "FAIL"
        print(
            f"bench_finetune: {verdict} pretrained full {100 * by['pretrained/full']:.1f}% vs scratch "
            f"{100 * by['scratch/full']:.1f}% test top-1 ({gain:+.1f} pts) at {a.steps} steps"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
