"""Fine-tuning benchmark on the synthetic motion set, on the demo's data and on a domain-shifted copy.

Rows (all at the same fine-tune budget, every row through the real CLIs: `data_shards synth/build`,
`pretrain`, `finetune`, `finetune evaluate --json`, one after the other):

- the tiny ViT from scratch vs from masked pretraining, per PEFT method (full, linear, LoRA, adapter, BitFit);
- the model families from scratch at about the tiny ViT's parameter count (125–188 k) with a from-scratch recipe
  (every layer at lr 3e-3, no layer decay): ViT-tiny, R(2+1)D-tiny, CNN+GRU-tiny, and the dynamic convolutions
  of issue 27: TAda2D-tiny (a 2-D ResNet whose 3×3 convs are calibrated per frame), R(2+1)D with a K=4 kernel
  mixture and R(2+1)D with selective temporal kernels (3 | 5). The two dynamic R(2+1)D rows are *parameter
  matched* to the plain R(2+1)D-tiny (187 k) by narrower stages (`model.encoder.widths`): a kernel mixture at the
  preset widths has 4× the parameters (741 k), selective kernels 1.5× (279 k).

Two sets, same classes (the direction / kind of motion), 400 videos each, 32 px, 24 frames, 4 classes, split
70 / 15 / 15:

- `demo`: `synth` domain 0 (the demo's data), seed 0;
- `shifted`: `synth --domain 3 --seed 1` ("sepia": brown-grey tones instead of colour, a coarser background
  texture, 0.7× slower motion) — other clips (seed 1) in another look. (`--domain 2`, "stripes": high-contrast
  shapes moving 1.5× faster, is easier than the demo set: the tiny ViT from scratch and pretrained both reached
  100.0 % test top-1 on each of 3 seeds there, so it cannot tell the rows apart.)

Protocol (transfer): the masked pretraining runs **once, on the demo set's train split only** (the demo's
config: tiny MAE, 1500 steps × 32 clips, no labels). On each set every row is fine-tuned on that set's train
split (best model by its val split) and tested on its test split, so on `shifted` the pretrained ViT transfers
a representation learned on domain 0 to domain 3, while the scratch rows train on domain 3 directly. On the
shifted set run the rows the comparison needs (`SHIFTED`: ViT scratch and pretrained full, R(2+1)D, TAda2D, the
two dynamic R(2+1)D); the PEFT and CNN+GRU rows run on the demo set only.

Full fine-tunes run with `--seeds` seeds each (small-budget training from scratch varies a lot between
seeds), the PEFT methods with the first. Reported in one table: per set and row, the mean test top-1 and each
seed's, total parameters, analytic forward MFLOPs per clip (backbone + head: the stable cost), trainable %, and
the fine-tune wall time per seed (one process: start-up, training, its val evaluations, export; the test
evaluation not included; on a shared machine it varies severalfold between identical runs). The pretraining's wall time is printed once: it
is the pretrained rows' extra cost. Not in the default test run; 30–60 min on 2 cores (43 fine-tunes):

    .venv/bin/python tests/bench/bench_finetune.py [--work /tmp/ftbench] [--steps 300] [--videos 400]
    .venv/bin/python tests/bench/bench_finetune.py --shards S --pretrain RUN_DIR   # reuse existing ones
    .venv/bin/python tests/bench/bench_finetune.py --only scratch/tada2d,scratch/r2plus1d_km --seeds 1
        # some rows only (no pretraining when none of them starts from it)
    .venv/bin/python tests/bench/bench_finetune.py --sets demo      # the demo set only
    .venv/bin/python tests/bench/bench_finetune.py --sets demo --only pretrained/full \
        --pretrain-override mask.decoder_kind=running_cell          # pretrained with VideoMAE V2 dual masking

Target: the pretrained full fine-tune beats the scratch one at the same budget (mean over the seeds) on every
set run. The last line sums the table up.
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
R2P1D = [*FROM_SCRATCH, "model.backbone=r2plus1d", "model.preset=tiny"]

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
    # the model families from scratch at the tiny ViT's parameter scale and the same budget, with a
    # from-scratch recipe (layer decay is a fine-tuning rule: at 0.75 it starves a CNN's stem): every layer
    # at lr 3e-3, the best val top-1 of {1e-3, 3e-3, 1e-2} on seed 0 for each family
    ("scratch/vit", False, "full", [*FROM_SCRATCH]),
    ("scratch/r2plus1d", False, "full", R2P1D),
    (
        "scratch/cnn_gru",
        False,
        "full",
        [*FROM_SCRATCH, "model.backbone=cnn_rnn", "model.preset=tiny", "model.rnn=gru"],
    ),
    # dynamic convolutions at the same budget and parameter count (issue 27): TAda2D-tiny (169 k) and
    # R(2+1)D with its block convs made dynamic, the stage widths narrowed so that the net has R(2+1)D-tiny's
    # 187 k parameters: K=4 kernel mixture at widths 8/12/16/24 (188 k), selective temporal kernels 3 | 5 at
    # 12/20/26/40 (187 k)
    ("scratch/tada2d", False, "full", [*FROM_SCRATCH, "model.backbone=tada2d", "model.preset=tiny"]),
    (
        "scratch/r2plus1d_km",
        False,
        "full",
        [*R2P1D, "model.dynamic=kernel_mixture", "model.encoder.widths=[8,12,16,24]"],
    ),
    (
        "scratch/r2plus1d_sk",
        False,
        "full",
        [*R2P1D, "model.dynamic=selective_kernel", "model.encoder.widths=[12,20,26,40]"],
    ),
]
# what each row is, for the table
LABELS = {
    "scratch/full": "ViT-tiny scratch (demo recipe)",
    "pretrained/full": "ViT-tiny pretrained, full",
    "pretrained/linear": "ViT-tiny pretrained, linear",
    "pretrained/lora": "ViT-tiny pretrained, LoRA",
    "pretrained/adapter": "ViT-tiny pretrained, adapter",
    "pretrained/bitfit": "ViT-tiny pretrained, BitFit",
    "scratch/vit": "ViT-tiny scratch (CNN recipe)",
    "scratch/r2plus1d": "R(2+1)D-tiny",
    "scratch/cnn_gru": "CNN+GRU-tiny",
    "scratch/tada2d": "TAda2D-tiny",
    "scratch/r2plus1d_km": "R(2+1)D kernel mixture",
    "scratch/r2plus1d_sk": "R(2+1)D selective kernel",
}
# the rows that also run on the domain-shifted set: the issue-27 comparison
SHIFTED = (
    "scratch/full",
    "pretrained/full",
    "scratch/r2plus1d",
    "scratch/tada2d",
    "scratch/r2plus1d_km",
    "scratch/r2plus1d_sk",
)
FAMILIES = (
    "scratch/vit",
    "scratch/r2plus1d",
    "scratch/cnn_gru",
    "scratch/tada2d",
    "scratch/r2plus1d_km",
    "scratch/r2plus1d_sk",
)
SETS = ("demo", "shifted")


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


def make_shards(out: Path, work: Path, videos: int, domain: int, seed: int) -> None:
    """`synth` + `build` of one set into `out` (skipped when it holds a manifest)."""
    if (out / "manifest.json").is_file():
        return
    raw = work / f"raw_{out.name}"
    sh([PY, "-m", "data_shards", "synth", "--out", str(raw), "--videos", str(videos), "--classes", "4",
        "--frames", "24", "--size", "32", "--codec", "vp9", "--domain", str(domain), "--seed", str(seed)],
       work / f"synth_{out.name}.log")  # fmt: skip
    sh([PY, "-m", "data_shards", "build", str(raw / "labels.csv"), "--out", str(out),
        "--val-fraction", "0.15", "--test-fraction", "0.15", "--quiet"], work / f"build_{out.name}.log")  # fmt: skip


def forward_mflops(model: Path) -> float:
    """Analytic forward MFLOPs of one clip through a model directory's classifier (backbone + head)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from pretrain.models.flops import classifier_forward_flops_per_clip
    from pretrain.models.io import read_model_config

    return classifier_forward_flops_per_clip(read_model_config(model)[1]) / 1e6


def finetune_run(a: argparse.Namespace, where: str, shards: Path, pre: Path, row: tuple, seed: int) -> tuple:
    """One seed of one row on one set -> (set, name, seed, trainable %, top-1, videos, wall s, parameters,
    forward MFLOPs per clip). A run dir holding `bench.json` from the same settings is read back, not rerun:
    an interrupted benchmark resumes where it stopped."""
    name, pretrained, method, extra = row
    run = a.work / "runs" / where / f"{name.replace('/', '_')}_s{seed}"
    cmd = [PY, "-m", "finetune", "--config", str(REPO / "finetune/configs/tiny_cpu.yaml"),
           f"data.shards={shards}", f"train.run_dir={run}", f"finetune.init={pre if pretrained else 'null'}",
           f"finetune.method={method}", f"train.steps={a.steps}", f"train.seed={seed}", "tracking.enabled=false",
           *extra]  # fmt: skip
    done = run / "bench.json"
    if done.is_file() and json.loads(done.read_text())["cmd"] == cmd[1:]:
        out = tuple(json.loads(done.read_text())["row"])
        tag = "read back"
    else:
        shutil.rmtree(run, ignore_errors=True)
        run.parent.mkdir(parents=True, exist_ok=True)
        t = sh(cmd, run.parent / f"{run.name}.log")
        res = evaluate(run / "model", shards)
        info = json.loads((run / "model" / "config.json").read_text())["extra"]["finetune"]
        total = round(info["trainable_params"] * 100 / info["trainable_pct"])
        pct, mflops = info["trainable_pct"], forward_mflops(run / "model")
        out = (where, name, seed, pct, res["top1"], res["n"], t, total, mflops)
        done.write_text(json.dumps({"cmd": cmd[1:], "row": out}))
        tag = f"{t:.0f} s"
    print(f"{where:<8} {name:<20} seed {seed}  trainable {out[3]:7.3f}%  test top-1 {100 * out[4]:5.1f}%  ({tag})",
          flush=True)  # fmt: skip
    return out


def report(
    rows: list[tuple], a: argparse.Namespace, pretrain_s: float | None
) -> dict[tuple[str, str], float]:
    """The one table: a line per (set, row), mean and per-seed test top-1 and the cost -> the means."""
    print(f"\nfine-tune budget: {a.steps} steps × batch 8 (32 px, 8 frames) per row and seed; test split, "
          f"2 clips × 1 crop; demo = synth domain 0 seed 0, shifted = synth --domain {a.domain} --seed 1; "
          f"pretraining on the demo train split only: "
          + (f"{pretrain_s:.0f} s" if pretrain_s is not None else "reused"))  # fmt: skip
    print(f"{'set':<8} {'run':<20} {'model':<30} {'params':>8} {'MFLOPs':>6} {'trainable':>10} {'top-1 mean':>10} "
          f"{'per seed':>21} {'wall s/seed':>11} {'videos':>6}")  # fmt: skip
    mean: dict[tuple[str, str], float] = {}
    for where, name in dict.fromkeys((r[0], r[1]) for r in rows):
        mine = [r for r in rows if (r[0], r[1]) == (where, name)]
        mean[where, name] = statistics.mean(r[4] for r in mine)
        per_seed = " / ".join(f"{100 * r[4]:.1f}" for r in mine)
        wall = statistics.mean(r[6] for r in mine)
        print(f"{where:<8} {name:<20} {LABELS[name]:<30} {mine[0][7]:>8,d} {mine[0][8]:>6.1f} {mine[0][3]:9.3f}% "
              f"{100 * mean[where, name]:9.1f}% {per_seed:>21} {wall:>11.0f} {mine[0][5]:>6d}")  # fmt: skip
    return mean


def summary(mean: dict[tuple[str, str], float], a: argparse.Namespace) -> str:
    """The last line: pretrained vs scratch ViT per set (the target) and the CNN rows per set."""
    parts, verdicts = [], []
    for where in dict.fromkeys(w for w, _ in mean):
        got = {n: 100 * v for (w, n), v in mean.items() if w == where}
        bits = []
        if "pretrained/full" in got and "scratch/full" in got:
            gain = got["pretrained/full"] - got["scratch/full"]
            verdicts.append(gain > 0)
            bits.append(f"ViT pretrained {got['pretrained/full']:.1f}% vs scratch {got['scratch/full']:.1f}% "
                        f"({gain:+.1f} pts)")  # fmt: skip
        fams = [f"{n.split('/')[1]} {got[n]:.1f}%" for n in FAMILIES if n in got]
        if fams:
            bits.append("from scratch " + ", ".join(fams))
        parts.append(f"{where}: " + "; ".join(bits))
    head = "" if not verdicts else ("PASS " if all(verdicts) else "FAIL ")
    return f"bench_finetune: {head}test top-1, mean of {a.seeds} seeds at {a.steps} steps | " + " | ".join(
        parts
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/tubelet_ftbench"))
    p.add_argument("--videos", type=int, default=400, help="videos per set")
    p.add_argument("--shards", type=Path, default=None, help="existing demo shard folder (train/val/test)")
    p.add_argument("--shifted-shards", type=Path, default=None, help="existing domain-shifted shard folder")
    p.add_argument("--domain", type=int, default=3, help="synth --domain of the shifted set (3: sepia)")
    p.add_argument("--sets", default="demo,shifted", help="comma-separated: demo, shifted")
    p.add_argument("--pretrain", type=Path, default=None, help="existing pretraining run dir")
    p.add_argument("--pretrain-steps", type=int, default=None, help="default: the config's")
    p.add_argument(
        "--pretrain-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a pretraining config override, e.g. mask.decoder_kind=running_cell (VideoMAE V2 dual masking)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds of every full fine-tune row")
    p.add_argument("--steps", type=int, default=300, help="fine-tune budget (optimizer steps) of every run")
    p.add_argument("--only", default=None, help="comma-separated run names")
    a = p.parse_args(argv)
    sets = a.sets.split(",")
    if unknown := set(sets) - set(SETS):
        p.error(f"--sets: unknown {sorted(unknown)}; choose from {SETS}")
    a.work.mkdir(parents=True, exist_ok=True)
    only = set(a.only.split(",")) if a.only else None
    # seed-major: every row's seed 0 first (a stopped run has the whole comparison on one seed), then seed 1 ...
    plan = [
        (w, r, seed)
        for w in sets
        for seed in range(a.seeds)
        for r in RUNS
        if (only is None or r[0] in only)
        and (w == "demo" or r[0] in SHIFTED)
        and (seed == 0 or r[2] == "full")
    ]

    shards = {
        "demo": a.shards or a.work / "shards",
        "shifted": a.shifted_shards or a.work / f"shards_domain{a.domain}",
    }
    make_shards(shards["demo"], a.work, a.videos, 0, 0)  # the pretraining reads the demo set in any case
    if "shifted" in sets:
        make_shards(shards["shifted"], a.work, a.videos, a.domain, 1)
    pre, pretrain_s = a.pretrain or a.work / "pretrain", None
    if any(r[1] for _, r, _ in plan) and not (pre / "checkpoints").is_dir():
        steps = [f"train.steps={a.pretrain_steps}"] if a.pretrain_steps else []
        pretrain_s = sh([PY, "-m", "pretrain", "--config", str(REPO / "pretrain/configs/tiny_cpu.yaml"),
                         f"data.shards={shards['demo']}", f"train.run_dir={pre}", "train.visualize_every=0",
                         "tracking.enabled=false", *steps, *a.pretrain_override], a.work / "pretrain.log")  # fmt: skip
        print(f"pretraining (demo set, train split{''.join(', ' + o for o in a.pretrain_override)}): "
              f"{pretrain_s:.0f} s", flush=True)  # fmt: skip

    t0 = time.perf_counter()
    rows = [finetune_run(a, where, shards[where], pre, row, seed) for where, row, seed in plan]
    mean = report(rows, a, pretrain_s)
    print(f"fine-tunes + evaluations: {time.perf_counter() - t0:.0f} s")
    print(summary(mean, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
