"""Forward+backward time and peak memory of tubelet's MaskedVideoAutoencoder vs transformers' VideoMAEForPreTraining.

Same config, same weights (exported with ``to_hf_model``), same batch and tube mask, same process and the same
torch thread count for both; the fp32 losses must agree (1e-3) or the run stops. Each round alternates the two
models ``--iters`` times and gives one ratio (median HF step time / median ours); the reported ratio is the
median of ``--rounds`` rounds. The same ratio in process CPU time is printed too: on a machine shared with
other jobs it moves far less than wall time (with ``--threads 1`` it is the work each step does; with more
threads it includes OpenMP threads spinning at barriers). Peak memory: the growth of the process's peak resident set during one
step (activations, gradients, temporaries) from the model without gradients, median of 3 steps per model,
in a child process whose glibc returns every block >= 64 KiB to the system on free (so the resident set
follows the live tensors); the timing process keeps the default allocator, since under that setting every
activation of both models would pay a page fault and zero-fill, as in no user's process. Not part of the default test run:

    .venv/bin/python tests/bench/bench_models.py [--preset vit-s,vit-b --frames 16 --size 112 --batch 2]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from pretrain.models import MAEConfig, MaskedVideoAutoencoder, compile_model, make_mask
from pretrain.models.hf import to_hf_model


def _rss_kib() -> tuple[int, int]:
    """(current, peak) resident set of this process in KiB."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def _track_frees() -> bool:
    """glibc: serve every allocation ≥ 64 KiB by mmap, so a freed tensor leaves the resident set."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024) == 1  # M_MMAP_THRESHOLD
    except OSError:
        return False


def step_peak_mib(model: torch.nn.Module, step: Callable[[], float]) -> float:
    """Peak resident growth of one call of ``step`` from the model without gradients (weights + inputs
    resident): activations, gradients and temporaries. Linux: the peak is reset through clear_refs."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before, _ = _rss_kib()
    step()
    _, peak = _rss_kib()
    return (peak - before) / 1024


def build(
    args: argparse.Namespace, preset: str
) -> tuple[dict[str, torch.nn.Module], dict[str, Callable[[], float]]]:
    """Ours and HF's model of one preset (same weights) and one training step of each on the same batch and
    mask, warmed up; stops if the two losses differ (not the same function)."""
    torch.manual_seed(0)
    cfg = MAEConfig.from_preset(preset, num_frames=args.frames, img_size=args.size)
    cfg.decoder_final_norm_eps = 1e-5  # HF's fixed value, so the two models compute the same function
    ours = MaskedVideoAutoencoder(cfg).train()
    hf = to_hf_model(ours).train()
    if args.compile:  # `model.compile`: ours per block through inductor; HF stays eager (its default)
        compile_model(ours)
    g = torch.Generator().manual_seed(0)
    x_BCTHW = torch.randn(args.batch, 3, args.frames, args.size, args.size, generator=g)
    x_BTCHW = x_BCTHW.permute(0, 2, 1, 3, 4).contiguous()
    mask = make_mask("tube", args.batch, cfg.encoder.grid_size, args.mask_ratio, g)

    def step_ours() -> float:
        ours.zero_grad(set_to_none=True)
        loss = ours(x_BCTHW, mask).loss
        loss.backward()
        return loss.item()

    def step_hf() -> float:
        hf.zero_grad(set_to_none=True)
        loss = hf(x_BTCHW, bool_masked_pos=mask).loss
        loss.backward()
        return loss.item()

    if args.compile:
        step_ours()  # compilation, outside the timed rounds
    l_ours, l_hf = step_ours(), step_hf()  # warm-up, and a sanity check that both compute the same loss
    if abs(l_ours - l_hf) > 1e-3:
        raise SystemExit(
            f"bench_models: losses differ (ours {l_ours:.6f}, hf {l_hf:.6f}): not the same model"
        )
    return {"ours": ours, "hf": hf}, {"ours": step_ours, "hf": step_hf}


def bench_preset(args: argparse.Namespace, preset: str) -> float:
    """Print one preset's timing line; return the time ratio HF / ours."""
    models, steps = build(args, preset)
    ratios, cpu_ratios, medians = [], [], {"ours": [], "hf": []}
    for _ in range(args.rounds):
        times: dict[str, list[float]] = {"ours": [], "hf": []}
        cpu: dict[str, list[float]] = {"ours": [], "hf": []}
        for _ in range(args.iters):
            for name, fn in steps.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        for name in times:
            medians[name].append(statistics.median(times[name]) * 1e3)
        ratios.append(medians["hf"][-1] / medians["ours"][-1])
        cpu_ratios.append(statistics.median(cpu["hf"]) / statistics.median(cpu["ours"]))
    ratio = statistics.median(ratios)
    print(
        f"bench_models: ours {statistics.median(medians['ours']):.1f} ms, hf {statistics.median(medians['hf']):.1f} ms, "
        f"ratio hf/ours {ratio:.2f} (rounds {' '.join(f'{r:.2f}' for r in ratios)}; target >= 1.25), "
        f"in CPU time {statistics.median(cpu_ratios):.2f} (rounds {' '.join(f'{r:.2f}' for r in cpu_ratios)}) "
        f"[{preset} {args.frames}x{args.size} batch {args.batch} tube mask {args.mask_ratio}, "
        f"hf attn={models['hf'].config._attn_implementation}, {torch.get_num_threads()} threads both, "
        f"ours compiled {args.compile}, median of {args.rounds} rounds x {args.iters}]",
        flush=True,
    )
    return ratio


def step_peaks(args: argparse.Namespace, preset: str) -> dict[str, float]:
    """Each model's step peak in MiB, measured in a fresh process of this script whose glibc returns every
    freed block >= 64 KiB (set before any tensor exists; the timed process keeps the default allocator)."""
    argv = [
        sys.executable,
        __file__,
        "--memory-of",
        preset,
        "--frames",
        str(args.frames),
        "--size",
        str(args.size),
    ]
    argv += ["--batch", str(args.batch), "--mask-ratio", str(args.mask_ratio), "--threads", str(args.threads)]
    out = subprocess.run(argv + ["--compile"] * args.compile, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_dual(args: argparse.Namespace, preset: str) -> float:
    """VideoMAE V2 dual masking's step gain: ours with the decoder reconstructing a running-cell
    `--decoder-ratio` of the tokens vs ours reconstructing every hidden one, alternating in the same rounds
    (HF has no dual masking: the function differs, so this is ours against ours). Returns plain / dual."""
    torch.manual_seed(0)
    ours = MaskedVideoAutoencoder(MAEConfig.from_preset(preset, num_frames=args.frames, img_size=args.size))
    grid = ours.cfg.encoder.grid_size
    g = torch.Generator().manual_seed(0)
    x_BCTHW = torch.randn(args.batch, 3, args.frames, args.size, args.size, generator=g)
    mask = make_mask("tube", args.batch, grid, args.mask_ratio, g)
    dec_mask = make_mask("running_cell", args.batch, grid, args.decoder_ratio, g)

    def step(decoder_mask: torch.Tensor | None) -> None:
        ours.zero_grad(set_to_none=True)
        ours(x_BCTHW, mask, decoder_mask).loss.backward()

    times: dict[str, list[float]] = {"plain": [], "dual": []}
    step(None), step(dec_mask)  # warm-up
    for _ in range(args.rounds * args.iters):
        for name, m in (("plain", None), ("dual", dec_mask)):
            t0 = time.perf_counter()
            step(m)
            times[name].append(time.perf_counter() - t0)
    plain, dual = (statistics.median(times[k]) * 1e3 for k in ("plain", "dual"))
    print(
        f"bench_models: {preset} dual masking (running cell, decoder keeps {1 - args.decoder_ratio:.2f} of the "
        f"tokens): {dual:.1f} ms vs {plain:.1f} ms reconstructing every hidden token: {plain / dual:.2f}x "
        f"[{args.frames}x{args.size} batch {args.batch}, median of {args.rounds * args.iters} steps each]",
        flush=True,
    )
    return plain / dual


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="vit-s,vit-b", help="comma-separated presets")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--mask-ratio", type=float, default=0.9)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="ours with model.compile (per-block torch.compile)")
    p.add_argument("--memory-of", default="", help=argparse.SUPPRESS)  # internal: see step_peaks
    p.add_argument(
        "--decoder-ratio",
        type=float,
        default=0.0,
        help="also time VideoMAE V2 dual masking (running cell: 0.25/0.5/0.75; needs an even token grid, e.g. --size 224)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_of:  # the child `step_peaks` starts
        if not _track_frees():
            print(
                "bench_models: mallopt unavailable: memory figures include freed blocks glibc kept",
                file=sys.stderr,
            )
        models, steps = build(args, args.memory_of)
        peaks = {
            name: statistics.median(step_peak_mib(models[name], fn) for _ in range(3))
            for name, fn in steps.items()
        }
        print(json.dumps(peaks))
        return
    summary = []
    for preset in args.preset.split(","):
        ratio = bench_preset(args, preset)
        mem = step_peaks(args, preset)
        mem_ratio = mem["hf"] / max(mem["ours"], 1e-9)
        print(
            f"bench_models: {preset} step peak memory ours {mem['ours']:.1f} MiB, hf {mem['hf']:.1f} MiB, "
            f"ratio hf/ours {mem_ratio:.2f} (target >= 1)",
            flush=True,
        )
        summary.append(f"{preset}={ratio:.2f} mem_{preset}={mem_ratio:.2f}")
        if args.decoder_ratio:
            summary.append(f"dual_{preset}={bench_dual(args, preset):.2f}")
    print(f"SUMMARY bench_models {args.frames}x{args.size} batch {args.batch}: " + " ".join(summary))


if __name__ == "__main__":
    main()
