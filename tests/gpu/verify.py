"""The GPU paths in one call (`bash tests/gpu/run.sh` runs this after installing what is missing):

1. DALI `device="mixed"` (NVDEC) decode vs PyAV on the same H.264 and VP9 clips (mean |difference| in grey
   levels, same keys in the same order);
2. attention in bf16, forward and backward: torch SDPA's flash kernel and the flash_attn package (when
   installed) against the fp32 math reference (max |difference|);
3. a short bf16 ZeRO-2 ViT-B 16x224 pretraining through `python -m pretrain`, fed by DALI from shards and
   by the synthetic backend (tests/bench/bench_pretrain_gpu.py): clips/s, MFU, data wait.

Prints one line per check and one SUMMARY line (MFU, DALI-fed / synthetic throughput ratio, parity
errors); exit 0 when every check that ran passed. Without CUDA it runs up to the first CUDA-only step
(imports, the parity shards) and exits 0 with a SKIP line. Budget: about 8 minutes on one GPU.

    python tests/gpu/verify.py [--steps 40] [--micro 32] [--unique 32 --repeats 16]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
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
MAX_DECODE_DIFF = 2.0  # grey levels, mean over every pixel (colour conversion differs slightly)
MAX_ATTN_FWD, MAX_ATTN_BWD = 2e-2, 5e-2  # bf16 vs fp32 math, as tests/gpu/test_attention_cuda.py


class Report:
    """Each check's numbers, failures and the summary line."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.failed: list[str] = []

    def run(self, name: str, check: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            got = check()
        except Exception as e:  # one broken check must not hide the others' figures
            traceback.print_exc()
            self.failed.append(f"{name}: {type(e).__name__}: {e}")
            print(f"FAIL {name} ({time.perf_counter() - t0:.0f}s): {e}", flush=True)
            return
        self.values.update(got)
        shown = " ".join(f"{k}={v}" for k, v in got.items())
        print(f"ok   {name} ({time.perf_counter() - t0:.0f}s): {shown}", flush=True)

    def summary(self, device: str, seconds: float) -> str:
        order = ("mfu_synthetic", "mfu_dali", "dali_vs_synthetic", "decode_diff_h264", "decode_diff_vp9",
                 "attn_sdpa_fwd", "attn_sdpa_bwd", "attn_flash_fwd", "attn_flash_bwd")  # fmt: skip
        parts = [f"{k}={self.values.get(k, 'n/a')}" for k in order]
        state = "PASS" if not self.failed else f"FAIL({len(self.failed)})"
        return f"SUMMARY tests/gpu/run.sh [{device}] {state} " + " ".join(parts) + f" time={seconds:.0f}s"


# ------------------------------------------------------------------------------------------ shards


def parity_shards(root: Path) -> dict[str, Path]:
    """Small H.264 and VP9 sets (real encodes, CPU): the same clips for DALI and PyAV."""
    return {
        c: make_shard_set(root / c, codec=c, shards=1, per_shard=8, frames=16, size=64)
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


def pretraining(shards: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """bf16 ZeRO-2 ViT-B: synthetic input (the model's ceiling), then DALI-fed from the shards."""
    bench = _bench_module()
    opts = argparse.Namespace(shards=shards, steps=args.steps, warmup=args.warmup, micro=args.micro)
    syn = bench.bench("synthetic", 2, opts, tmp)
    dali = bench.bench("dali", 2, opts, tmp)
    for name, r in (("synthetic", syn), ("dali", dali)):
        if not math.isfinite(r["loss"]) or not r["clips_per_s"] > 0:
            raise AssertionError(f"{name}: loss {r['loss']}, {r['clips_per_s']} clips/s")
    return {
        "mfu_synthetic": f"{syn['mfu'] * 100:.1f}%",
        "mfu_dali": f"{dali['mfu'] * 100:.1f}%",
        "clips_s_synthetic": f"{syn['clips_per_s']:.1f}",
        "clips_s_dali": f"{dali['clips_per_s']:.1f}",
        "dali_vs_synthetic": f"{dali['clips_per_s'] / syn['clips_per_s']:.3f}",
        "dali_data_wait": f"{dali['data_wait_frac'] * 100:.1f}%",
        "peak_gib": f"{max(syn['peak_mem_gib'], dali['peak_mem_gib']):.1f}",
    }


# --------------------------------------------------------------------------------------------- main


def environment() -> str:
    """Versions from package metadata (importing DeepSpeed here would cost seconds before a CPU skip)."""
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda or 'none'}"]
    for dist in ("deepspeed", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "av", "webdataset", "flash-attn"):
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
        shards = pretrain_shards(tmp / "pretrain", args.unique, args.repeats, frames=32, size=224)
        print(f"[gpu] pretraining shards: {args.unique} clips x {args.repeats} copies, 224 px", flush=True)
        device = torch.cuda.get_device_name(0)
        report = Report()
        report.run("decode parity DALI mixed vs PyAV", lambda: decode_parity(sets))
        report.run("attention parity bf16 fwd+bwd", attention_parity)
        report.run("pretraining ViT-B bf16 ZeRO-2", lambda: pretraining(shards, args, tmp))
    print(report.summary(device, time.perf_counter() - t0), flush=True)
    for f in report.failed:
        print(f"  failed: {f}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
