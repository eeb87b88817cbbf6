"""The GPU paths in one call (`bash tests/gpu/run.sh` runs this after installing what is missing):

1. DALI `device="mixed"` (NVDEC) decode vs PyAV on the same H.264 and VP9 clips (mean |difference| in grey
   levels, same keys in the same order);
2. attention in bf16, forward and backward: torch SDPA's flash kernel and the flash_attn package (when
   installed) against the fp32 math reference (max |difference|);
3. the masked-video training step, ours vs transformers' `VideoMAEForPreTraining` (issue 28): the same
   config and weights (`to_hf_model`), batch and tube mask 0.9, ViT-S and ViT-B at 16x112, batch 32;
   equal losses (fp32), then fwd+bwd under bf16 autocast (both on SDPA), CUDA-event median of
   `--mae-steps` alternating steps, and each step's peak memory above what was resident before it;
4. a short bf16 ZeRO-2 ViT-B 16x224 pretraining through `python -m pretrain`, fed by the synthetic
   backend and by DALI from H.264 shards (tests/bench/bench_pretrain_gpu.py): clips/s, MFU, data wait.

The cheap checks run first, and the DALI ones after the synthetic pretraining, so that a failure or a hang
in one (each pretraining run is a subprocess with a `--timeout`) leaves the others' figures. Prints one
line per check and one SUMMARY line (MFU, DALI-fed / synthetic throughput ratio, parity errors, ours vs HF
time and memory ratios); exit 0 when every check that ran passed. Without CUDA it runs up to the first
CUDA-only step (imports, the parity shards) and exits 0 with a SKIP line. Budget: about 4 minutes on one
H200 after the wheels are installed.

    python tests/gpu/verify.py [--steps 40] [--micro 32] [--unique 32 --repeats 16] [--mae-batch 32]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from data_shards import format as fmt  # noqa: E402
from data_shards.loader import SamplingSpec, build_loader  # noqa: E402
from data_shards.loader.fixtures import make_sample, make_shard_set  # noqa: E402
from data_shards.shardio import write_shard  # noqa: E402
from data_shards.synth import MOTIONS, SynthSpec  # noqa: E402

PARITY_SPEC = SamplingSpec(frames=8, stride=2, size=32, train=False)
PARITY_SIZE = 128  # NVDEC's smallest VP9 frame is 128x128 (H.264: 48x16)
MAX_DECODE_DIFF = 2.0  # grey levels, mean over every pixel (colour conversion differs slightly)
MAX_ATTN_FWD, MAX_ATTN_BWD = 2e-2, 5e-2  # bf16 vs fp32 math, as tests/gpu/test_attention_cuda.py
MAX_LOSS_DIFF_FP32 = 1e-3  # ours vs HF, same weights, batch and mask (tests/bench/bench_models.py)
MAX_LOSS_REL_BF16 = 5e-2  # the same under bf16 autocast (different op order, bf16 rounding)
MAE_PRESETS = {"vit-s": "vits", "vit-b": "vitb"}


class Report:
    """Each check's numbers, failures and the summary line."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.failed: list[str] = []

    def run(self, name: str, check: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            got = check()
        except (Exception, SystemExit) as e:  # one broken check must not hide the others' figures
            traceback.print_exc()
            self.failed.append(f"{name}: {type(e).__name__}: {e}")
            print(f"FAIL {name} ({time.perf_counter() - t0:.0f}s): {e}", flush=True)
            return
        self.values.update(got)
        shown = " ".join(f"{k}={v}" for k, v in got.items())
        print(f"ok   {name} ({time.perf_counter() - t0:.0f}s): {shown}", flush=True)

    def summary(self, device: str, seconds: float) -> str:
        order = ("mfu_synthetic", "mfu_dali", "clips_s_synthetic", "clips_s_dali", "dali_vs_synthetic",
                 "data_wait_dali", "decode_diff_h264", "decode_diff_vp9",
                 "attn_sdpa_fwd", "attn_sdpa_bwd", "attn_flash_fwd", "attn_flash_bwd",
                 "mae_vs_hf_vits", "mae_mem_vs_hf_vits", "mae_vs_hf_vitb", "mae_mem_vs_hf_vitb")  # fmt: skip
        parts = [f"{k}={self.values.get(k, 'n/a')}" for k in order]
        state = "PASS" if not self.failed else f"FAIL({len(self.failed)})"
        return f"SUMMARY tests/gpu/run.sh [{device}] {state} " + " ".join(parts) + f" time={seconds:.0f}s"


# ------------------------------------------------------------------------------------------ shards


def parity_shards(root: Path) -> dict[str, Path]:
    """Small H.264 and VP9 sets (real encodes, CPU): the same clips for DALI and PyAV."""
    return {
        c: make_shard_set(root / c, codec=c, shards=1, per_shard=8, frames=16, size=PARITY_SIZE)
        for c in ("h264", "vp9")
    }


def _encode(args: tuple[int, SynthSpec, str]) -> fmt.Sample:
    i, spec, tmp = args
    return make_sample(i, spec, Path(tmp))


def pretrain_shards(root: Path, unique: int, repeats: int, frames: int, size: int) -> Path:
    """`unique` clips encoded once (in parallel), each stored `repeats` times under distinct keys: the
    decoder works as on `unique * repeats` videos, the encoding costs `unique`."""
    root.mkdir(parents=True, exist_ok=True)
    spec = SynthSpec(videos=unique, classes=4, frames=frames, size=size, codec="h264", seed=1)
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        clips = list(pool.map(_encode, [(i, spec, str(root)) for i in range(unique)]))
    infos = []
    for r in range(repeats):
        samples = []
        for c in clips:
            vid = f"{c.meta['id']}#copy{r}"
            samples.append(
                fmt.Sample(fmt.sample_key(vid), c.video, c.video_ext, c.label, {**c.meta, "id": vid})
            )
        infos.append(write_shard(root / fmt.shard_name("train", r), samples))
    n = sum(i.samples for i in infos)
    split = fmt.SplitInfo(samples=n, shards=len(infos), bytes=sum(i.bytes for i in infos))
    fmt.Manifest(
        classes=list(MOTIONS[:4]), shards=infos, splits={"train": split}, options={"synthetic": True}
    ).save(root)
    return root


# ------------------------------------------------------------------------------------------ checks


def decode_parity(sets: dict[str, Path]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    mean = torch.tensor(PARITY_SPEC.mean).view(3, 1, 1, 1) * 255
    std = torch.tensor(PARITY_SPEC.std).view(3, 1, 1, 1) * 255
    for codec, folder in sets.items():
        gpu = build_loader(folder, "train", batch_size=4, spec=PARITY_SPEC, backend="dali", device="cuda")
        if gpu.backend != "dali-mixed":
            raise AssertionError(f"{codec}: expected the DALI mixed (NVDEC) backend, got {gpu.backend}")
        a = list(gpu)
        b = list(build_loader(folder, "train", batch_size=4, spec=PARITY_SPEC, backend="pyav", num_workers=0))
        if [x["key"] for x in a] != [x["key"] for x in b]:
            raise AssertionError(f"{codec}: DALI and PyAV batches hold different keys")
        va = torch.cat([x["video"].float().cpu() for x in a]) * std + mean
        vb = torch.cat([x["video"].float() for x in b]) * std + mean
        diff = (va - vb).abs().mean().item()
        out[f"decode_diff_{codec}"] = f"{diff:.3f}"
        if diff >= MAX_DECODE_DIFF:
            raise AssertionError(
                f"{codec}: DALI vs PyAV mean |diff| {diff:.3f} >= {MAX_DECODE_DIFF} grey levels"
            )
    return out


def _attention_errors(fn: Callable[..., torch.Tensor]) -> tuple[float, float]:
    """Max |bf16 kernel - fp32 math| over the output and the three input gradients (ViT-B geometry)."""
    from pretrain.models.attention import attend

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(2, 12, 1568 // 8, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
        for _ in range(3)
    )
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attend(q32, k32, v32, "math")
    out = fn(q, k, v)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad.bfloat16())
    fwd = (out.float() - ref).abs().max().item()
    bwd = max((a.grad.float() - b.grad).abs().max().item() for a, b in ((q, q32), (k, k32), (v, v32)))
    return fwd, bwd


def attention_parity() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pretrain.models.attention import attend, flash_attn_available

    def sdpa_flash(q, k, v):  # type: ignore[no-untyped-def]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return attend(q, k, v, "sdpa")

    runs = {"sdpa": sdpa_flash}
    if flash_attn_available():
        runs["flash"] = lambda q, k, v: attend(q, k, v, "flash_attn")
    out: dict[str, Any] = {} if flash_attn_available() else {"attn_flash_fwd": "not-installed"}
    for name, fn in runs.items():
        fwd, bwd = _attention_errors(fn)
        out[f"attn_{name}_fwd"], out[f"attn_{name}_bwd"] = f"{fwd:.2e}", f"{bwd:.2e}"
        if fwd > MAX_ATTN_FWD or bwd > MAX_ATTN_BWD:
            raise AssertionError(f"{name}: bf16 vs fp32 max |diff| fwd {fwd:.3g} bwd {bwd:.3g}")
    return out


def _bench_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "bench_pretrain_gpu", REPO / "tests" / "bench" / "bench_pretrain_gpu.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pretraining(backend: str, shards: Path | None, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """bf16 ZeRO-2 ViT-B through `python -m pretrain`, `backend` "synthetic" (the model's ceiling) or "dali"
    (NVDEC from the shards); its `--timeout` bounds the subprocess."""
    bench = _bench_module()
    opts = argparse.Namespace(
        shards=shards, steps=args.steps, warmup=args.warmup, micro=args.micro, timeout=args.timeout
    )
    r = bench.bench(backend, 2, opts, tmp)
    if not math.isfinite(r["loss"]) or not r["clips_per_s"] > 0:
        raise AssertionError(f"{backend}: loss {r['loss']}, {r['clips_per_s']} clips/s")
    return {
        f"mfu_{backend}": f"{r['mfu'] * 100:.1f}%",
        f"clips_s_{backend}": f"{r['clips_per_s']:.1f}",
        f"data_wait_{backend}": f"{r['data_wait_frac'] * 100:.1f}%",
        f"peak_gib_{backend}": f"{r['peak_mem_gib']:.1f}",
        f"loss_{backend}": f"{r['loss']:.4f}",
    }


def dali_vs_synthetic(values: dict[str, str]) -> dict[str, Any]:
    if "clips_s_synthetic" not in values or "clips_s_dali" not in values:
        raise AssertionError("needs both pretraining runs (one of them failed)")
    return {"dali_vs_synthetic": f"{float(values['clips_s_dali']) / float(values['clips_s_synthetic']):.3f}"}


def mae_vs_hf(
    preset: str, *, batch: int, steps: int, frames: int = 16, size: int = 112, device: str = "cuda"
) -> dict[str, Any]:
    """Our MaskedVideoAutoencoder vs transformers' VideoMAEForPreTraining on one training step (fwd+bwd).

    Same config and weights (`to_hf_model`), input, and tube mask 0.9 (tests/bench/bench_models.py's
    set-up). First one fp32 step each: the losses must agree (same function). Then bf16 autocast for both
    (the usual mixed-precision training of either; both run torch SDPA): 2 warm-up steps each, then
    `steps` alternating timed steps (CUDA events), median; and, per model, the peak memory of one step
    above what was allocated before it (activations + gradients; the two models' weights are the same).
    Ratios are HF / ours: above 1 means ours is faster / smaller."""
    from pretrain.models import MAEConfig, MaskedVideoAutoencoder, make_mask
    from pretrain.models.hf import to_hf_model

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    cfg = MAEConfig.from_preset(preset, num_frames=frames, img_size=size)
    cfg.decoder_final_norm_eps = 1e-5  # HF's fixed value, so the two models compute the same function
    ours = MaskedVideoAutoencoder(cfg).train()
    hf = to_hf_model(ours).train()
    models: dict[str, Any] = {"ours": ours.to(dev), "hf": hf.to(dev)}
    hf_attn = str(hf.config._attn_implementation)
    del ours, hf  # only `models` holds them: freed on return
    g = torch.Generator().manual_seed(0)
    x_BCTHW = torch.randn(batch, 3, frames, size, size, generator=g).to(dev)
    x_BTCHW = x_BCTHW.permute(0, 2, 1, 3, 4).contiguous()
    mask = make_mask("tube", batch, cfg.encoder.grid_size, 0.9, g).to(dev)
    key = MAE_PRESETS.get(preset, preset.replace("-", ""))

    def step(name: str, amp: bool) -> torch.Tensor:
        model = models[name]
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            if name == "ours":
                loss = model(x_BCTHW, mask).loss
            else:
                loss = model(x_BTCHW, bool_masked_pos=mask).loss
        loss.backward()
        return loss.detach()

    l32 = {n: step(n, False).item() for n in ("ours", "hf")}
    if abs(l32["ours"] - l32["hf"]) > MAX_LOSS_DIFF_FP32:
        raise AssertionError(f"{preset}: fp32 losses differ: ours {l32['ours']:.6f}, hf {l32['hf']:.6f}")
    for _ in range(2):  # warm-up (kernel selection, allocator)
        l16 = {n: step(n, True).item() for n in ("ours", "hf")}
    if abs(l16["ours"] - l16["hf"]) > MAX_LOSS_REL_BF16 * abs(l16["hf"]):
        raise AssertionError(f"{preset}: bf16 losses differ: ours {l16['ours']:.6f}, hf {l16['hf']:.6f}")

    peak: dict[str, float] = {}
    for name in ("ours", "hf"):
        models[name].zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        step(name, True)
        if cuda:
            torch.cuda.synchronize(dev)
            peak[name] = (torch.cuda.max_memory_allocated(dev) - base) / 2**30

    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(steps):
        for name in ("ours", "hf"):
            if cuda:
                t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0.record()
                step(name, True)
                t1.record()
                t1.synchronize()
                times[name].append(t0.elapsed_time(t1))
            else:
                c0 = time.perf_counter()
                step(name, True)
                times[name].append((time.perf_counter() - c0) * 1e3)
    ms = {n: statistics.median(t) for n, t in times.items()}
    out = {
        f"mae_vs_hf_{key}": f"{ms['hf'] / ms['ours']:.2f}",
        f"mae_ms_{key}": f"ours:{ms['ours']:.1f},hf:{ms['hf']:.1f}",
        f"mae_loss_{key}": f"ours:{l32['ours']:.5f},hf:{l32['hf']:.5f}",
    }
    if cuda:
        out[f"mae_mem_vs_hf_{key}"] = f"{peak['hf'] / peak['ours']:.2f}"
        out[f"mae_gib_{key}"] = f"ours:{peak['ours']:.2f},hf:{peak['hf']:.2f}"
    out[f"mae_hf_attn_{key}"] = hf_attn
    models.clear()
    if cuda:
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------- main


def environment() -> str:
    """Versions from package metadata (importing DeepSpeed here would cost seconds before a CPU skip)."""
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda or 'none'}"]
    dists = (
        "deepspeed",
        "nvidia-dali-cuda130",
        "nvidia-dali-cuda120",
        "av",
        "webdataset",
        "transformers",
        "flash-attn",
    )
    for dist in dists:
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            if "dali" not in dist:
                parts.append(f"{dist} missing")
    return ", ".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per pretraining run")
    p.add_argument("--warmup", type=int, default=10, help="leading steps left out of the medians")
    p.add_argument("--micro", type=int, default=32, help="clips per GPU per step")
    p.add_argument("--unique", type=int, default=32, help="distinct clips encoded for the DALI-fed run")
    p.add_argument("--repeats", type=int, default=16, help="times each is stored (distinct keys)")
    p.add_argument("--timeout", type=float, default=180, help="seconds allowed to each pretraining run")
    p.add_argument("--mae-presets", default="vit-s,vit-b", help="ours vs HF: encoder presets (comma list)")
    p.add_argument("--mae-batch", type=int, default=32, help="ours vs HF: clips per step")
    p.add_argument("--mae-steps", type=int, default=10, help="ours vs HF: timed steps per model")
    args = p.parse_args()
    t0 = time.perf_counter()
    print(f"[gpu] {environment()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tubelet-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        sets = parity_shards(tmp / "parity")
        counts = {c: fmt.load_manifest(f).splits["train"].samples for c, f in sets.items()}
        print(f"[gpu] parity shards: {counts} clips (H.264, VP9; encoded on the CPU)", flush=True)
        if not torch.cuda.is_available():
            print(
                "SKIP tests/gpu/run.sh: CUDA is not available (no GPU visible to torch "
                f"{torch.__version__}); ran up to the first CUDA-only step (imports, parity shards)",
                flush=True,
            )
            return 0
        # encoded by forked workers before this process touches CUDA (a fork after CUDA init is unsafe)
        shards = pretrain_shards(tmp / "pretrain", args.unique, args.repeats, frames=64, size=224)
        print(
            f"[gpu] pretraining shards: {args.unique} clips x {args.repeats} copies, 64 frames, 224 px",
            flush=True,
        )
        device = torch.cuda.get_device_name(0)
        report = Report()
        report.run("attention parity bf16 fwd+bwd", attention_parity)
        for preset in args.mae_presets.split(","):
            report.run(
                f"masked-video step ours vs HF {preset} 16x112 batch {args.mae_batch} bf16 autocast",
                lambda p=preset: mae_vs_hf(p, batch=args.mae_batch, steps=args.mae_steps),
            )
        report.run(
            "pretraining ViT-B bf16 ZeRO-2 synthetic", lambda: pretraining("synthetic", None, args, tmp)
        )
        report.run("decode parity DALI mixed vs PyAV", lambda: decode_parity(sets))
        report.run("pretraining ViT-B bf16 ZeRO-2 DALI", lambda: pretraining("dali", shards, args, tmp))
        report.run("DALI-fed / synthetic", lambda: dali_vs_synthetic(report.values))
    print(report.summary(device, time.perf_counter() - t0), flush=True)
    for f in report.failed:
        print(f"  failed: {f}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
