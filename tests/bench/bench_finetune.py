"""Fine-tuning benchmark on the synthetic motion set: test top-1 after the same fine-tune budget for
from-scratch vs masked-pretrained starts, per PEFT method (full, linear, LoRA, adapter, BitFit), and the
three model families from scratch with a from-scratch recipe (tiny ViT, R(2+1)D-tiny, CNN+GRU-tiny: one
parameter scale, plus the dynamic-convolution CNNs: TAda2D-tiny, R(2+1)D-tiny with a kernel mixture or selective
temporal kernels): does masked pretraining of a ViT beat a supervised 3D-CNN at the same budget?

Everything runs through the real CLIs (`data_shards synth/build`, `pretrain`, `finetune`, `finetune
evaluate --json`), one after the other, on the demo's data (32 px, 24 frames, 4 classes) and the demo's
pretraining config (tiny MAE, 1500 steps × 32 clips on the train split, no labels). Scratch and
pretrained full fine-tuning run with `--seeds` fine-tune seeds each (small-budget training from scratch
varies a lot between seeds); the PEFT methods with the first. Not in the default test run; about
20 minutes on 2 cores:

    .venv/bin/python tests/bench/bench_finetune.py [--work /tmp/ftbench] [--steps 300] [--videos 400]
    .venv/bin/python tests/bench/bench_finetune.py --shards S --pretrain RUN_DIR   # reuse existing ones
    .venv/bin/python tests/bench/bench_finetune.py --only scratch/tada2d,scratch/r2plus1d_km --seeds 1
        # some rows only (no pretraining when none of them starts from it)

Target: the pretrained full fine-tune beats the scratch one at the same budget (mean over the seeds).
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

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable

FROM_SCRATCH = ["optim.lr=3e-3", "optim.layer_decay=1.0"]

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
        ["optim.lr=1e-2", "optim.layer_decay=1.0", "finetune.adapter_width=16"],
    ),
    ("pretrained/bitfit", True, "bitfit", ["optim.lr=1e-2", "optim.layer_decay=1.0"]),
    # the three model families from scratch at the tiny ViT's parameter scale and the same budget, with a
    # from-scratch recipe (layer decay is a fine-tuning rule: at 0.75 it starves a CNN's stem): every layer
    # at lr 3e-3, the best val top-1 of {1e-3, 3e-3, 1e-2} on seed 0 for each family
    ("scratch/vit", False, "full", [*FROM_SCRATCH]),
    ("scratch/r2plus1d", False, "full", [*FROM_SCRATCH, "model.backbone=r2plus1d", "model.preset=tiny"]),
    (
        "scratch/cnn_gru",
        False,
        "full",
        [*FROM_SCRATCH, "model.backbone=cnn_rnn", "model.preset=tiny", "model.rnn=gru"],
    ),
    # dynamic convolutions at the same scale and budget (issue 27): TAda2D-tiny (a 2-D ResNet whose 3×3 convs
    # are calibrated per frame) and R(2+1)D-tiny with its block convs made dynamic (K=4 kernel mixture;
    # selective temporal kernel 3 | 5)
    ("scratch/tada2d", False, "full", [*FROM_SCRATCH, "model.backbone=tada2d", "model.preset=tiny"]),
    (
        "scratch/r2plus1d_km",
        False,
        "full",
        [*FROM_SCRATCH, "model.backbone=r2plus1d", "model.preset=tiny", "model.dynamic=kernel_mixture"],
    ),
    (
        "scratch/r2plus1d_sk",
        False,
        "full",
        [*FROM_SCRATCH, "model.backbone=r2plus1d", "model.preset=tiny", "model.dynamic=selective_kernel"],
    ),
]
FAMILIES = (
    "scratch/vit",
    "scratch/r2plus1d",
    "scratch/cnn_gru",
    "scratch/tada2d",
    "scratch/r2plus1d_km",
    "scratch/r2plus1d_sk",
)


def sh(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n  see {log}")
    return time.perf_counter() - t0


def evaluate(model: Path, shards: Path) -> dict:
    """`finetune evaluate --json` on the test split -> its JSON line."""
    out = subprocess.run(
        [PY, "-m", "finetune", "evaluate", "--model", str(model), "--shards", str(shards), "--split", "test",
         "--json", "--no-mlflow"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
    )  # fmt: skip
    line = next((x for x in out.stdout.splitlines()[::-1] if x.startswith("{")), None)
    if line is None:
        raise SystemExit(f"evaluate failed for {model}:\n{out.stderr[-2000:]}")
    return json.loads(line)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/tubelet_ftbench"))
    p.add_argument("--videos", type=int, default=400)
    p.add_argument("--shards", type=Path, default=None, help="existing shard folder (train/val/test)")
    p.add_argument("--pretrain", type=Path, default=None, help="existing pretraining run dir")
    p.add_argument("--pretrain-steps", type=int, default=None, help="default: the config's")
    p.add_argument("--seeds", type=int, default=3, help="fine-tune seeds for scratch and pretrained full")
    p.add_argument("--steps", type=int, default=300, help="fine-tune budget (optimizer steps) of every run")
    p.add_argument("--only", default=None, help="comma-separated run names")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    cfg = REPO / "finetune" / "configs" / "tiny_cpu.yaml"

    shards = a.shards or a.work / "shards"
    if not (shards / "manifest.json").is_file():
        raw = a.work / "raw"
        sh([PY, "-m", "data_shards", "synth", "--out", str(raw), "--videos", str(a.videos), "--classes", "4",
            "--frames", "24", "--size", "32", "--codec", "vp9"], a.work / "synth.log")  # fmt: skip
        sh([PY, "-m", "data_shards", "build", str(raw / "labels.csv"), "--out", str(shards),
            "--val-fraction", "0.15", "--test-fraction", "0.15", "--quiet"], a.work / "build.log")  # fmt: skip
    pre = a.pretrain or a.work / "pretrain"
    only = set(a.only.split(",")) if a.only else None
    needs_pretrain = any(p for n, p, _, _ in RUNS if only is None or n in only)
    if needs_pretrain and not (pre / "checkpoints").is_dir():
        steps = [f"train.steps={a.pretrain_steps}"] if a.pretrain_steps else []
        t = sh([PY, "-m", "pretrain", "--config", str(REPO / "pretrain/configs/tiny_cpu.yaml"), f"data.shards={shards}",
                f"train.run_dir={pre}", "train.visualize_every=0", "tracking.enabled=false", *steps],
               a.work / "pretrain.log")  # fmt: skip
        print(f"pretraining: {t:.0f} s", flush=True)

    rows = []  # (name, seed, trainable %, top-1, top-5, videos, wall s, total parameters)
    for name, pretrained, method, extra in RUNS:
        if only and name not in only:
            continue
        for seed in range(a.seeds if method == "full" else 1):
            run = a.work / "runs" / f"{name.replace('/', '_')}_s{seed}"
            shutil.rmtree(run, ignore_errors=True)
            t = sh([PY, "-m", "finetune", "--config", str(cfg), f"data.shards={shards}", f"train.run_dir={run}",
                    f"finetune.init={pre if pretrained else 'null'}", f"finetune.method={method}",
                    f"train.steps={a.steps}", f"train.seed={seed}", "tracking.enabled=false", *extra],
                   a.work / f"{run.name}.log")  # fmt: skip
            res = evaluate(run / "model", shards)
            info = json.loads((run / "model" / "config.json").read_text())["extra"]["finetune"]
            total = round(info["trainable_params"] * 100 / info["trainable_pct"])
            rows.append((name, seed, info["trainable_pct"], res["top1"], res["top5"], res["n"], t, total))
            print(f"{name:<20} seed {seed}  trainable {info['trainable_pct']:7.3f}%  "
                  f"test top-1 {100 * res['top1']:5.1f}%  ({t:.0f} s)", flush=True)  # fmt: skip

    print(
        f"\nfine-tune budget: {a.steps} steps × batch 8 (tiny ViT, 32 px, 8 frames); test split, 2 clips × 1 crop"
    )
    print(
        f"{'run':<20} {'seeds':>5} {'params':>8} {'trainable':>10} {'top-1 mean':>11} {'per seed':>20} {'videos':>6}"
    )
    mean: dict[str, float] = {}
    for name in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == name]
        mean[name] = statistics.mean(r[3] for r in mine)
        per_seed = " ".join(f"{100 * r[3]:.1f}" for r in mine)
        print(
            f"{name:<20} {len(mine):>5} {mine[0][7]:>8,d} {mine[0][2]:9.3f}% {100 * mean[name]:10.1f}% "
            f"{per_seed:>20} {mine[0][5]:>6d}"
        )
    families = ", ".join(f"{n.split('/')[1]} {100 * mean[n]:.1f}%" for n in FAMILIES if n in mean)
    if "scratch/full" not in mean or "pretrained/full" not in mean:
        print(
            f"bench_finetune: families from scratch (lr 3e-3, no layer decay) at {a.steps} steps: {families}"
        )
    else:
        gain = 100 * (mean["pretrained/full"] - mean["scratch/full"])
        verdict = "PASS" if gain > 0 else "FAIL"
        print(
            f"bench_finetune: {verdict} pretrained full {100 * mean['pretrained/full']:.1f}% vs scratch "
            f"{100 * mean['scratch/full']:.1f}% test top-1 ({gain:+.1f} pts, mean of {a.seeds} seeds) at {a.steps} steps"
            + (f"; families from scratch (lr 3e-3, no layer decay): {families}" if families else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
