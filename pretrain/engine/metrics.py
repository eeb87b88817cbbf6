"""`MetricsLogger`: owns the timing window between two log steps and turns it into the logged metrics.

The trainer hands it one `StepStats` per optimizer step (already averaged over micro-batches and ranks by
the step's single collective), so logging itself needs no communication. Time spent evaluating,
checkpointing or rendering is excluded from throughput (`paused()`).
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .tracking import Tracker

# Peak dense FLOP/s per device (vendor datasheets, SXM parts): bf16/fp16 tensor, tf32 tensor, plain fp32.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
}


def peak_flops_per_device(device: torch.device, low_precision: bool, override_tflops: float | None) -> float:
    """`override_tflops` if set; else the table for the CUDA device; NaN when unknown (CPU)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return math.nan
    name = torch.cuda.get_device_name(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    precision = "bf16" if low_precision else ("tf32" if tf32 else "fp32")
    return next((t[precision] for key, t in PEAK_FLOPS.items() if key in name), math.nan)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA max allocated, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass
class StepStats:
    """One completed optimizer step, averaged over its micro-batches and all ranks."""

    loss: float
    lr: float
    wait_s: float  # mean over ranks of the seconds spent waiting for data in this step
    metrics: dict[str, float] = field(default_factory=dict)


class MetricsLogger:
    """Accumulate `StepStats` between log steps; `log()` writes jsonl/MLflow and moves the progress bar."""

    def __init__(
        self,
        tracker: Tracker,
        *,
        global_batch: int,
        world_size: int,
        device: torch.device,
        flops_per_sample: float,
        tokens_per_sample: float,
        peak_flops: float,
        total_steps: int,
        start_step: int,
        show: bool,
    ) -> None:
        self.tracker, self.device = tracker, device
        self.global_batch, self.world_size = global_batch, world_size
        self.flops_per_sample, self.tokens_per_sample = flops_per_sample, tokens_per_sample
        self.peak = peak_flops
        self._bar_args = dict(total=total_steps, initial=start_step, disable=not show, dynamic_ncols=True)
        self._bar: tqdm | None = None
        self._reset()

    @property
    def bar(self) -> tqdm:
        """The rank-0 progress bar, opened with the first step (not when the trainer is merely built)."""
        if self._bar is None:
            self._bar = tqdm(desc="train", **self._bar_args)
        return self._bar

    def _reset(self) -> None:
        self.t0, self.excluded = time.perf_counter(), 0.0
        self.steps, self.loss, self.wait = 0, 0.0, 0.0
        self.extra: dict[str, list[float]] = {}  # name -> [sum, count] over steps where it was measured
        self.lr = math.nan

    def add(self, stats: StepStats) -> None:
        self.steps += 1
        self.loss += stats.loss
        self.wait += stats.wait_s
        self.lr = stats.lr  # the LR this step used
        for k, v in stats.metrics.items():
            acc = self.extra.setdefault(k, [0.0, 0])
            if math.isfinite(v):
                acc[0] += v
                acc[1] += 1
        self.bar.update(1)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside is not training time (evaluation, checkpoints, images)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t

    def log(
        self,
        step: int,
        *,
        epoch: int,
        samples: int,
        nonfinite: int,
        grad_norm: float | None,
        data: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """The window's averages and throughput at `step`; starts a new window. `data`: the loader's running
        counts (skipped samples, object-storage reads, cache hits, retries), logged as `data/<name>`."""
        n = max(self.steps, 1)
        elapsed = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
        clips_s = self.steps * self.global_batch / elapsed
        mfu = self.flops_per_sample * clips_s / (self.world_size * self.peak)
        metrics = {
            "loss": self.loss / n,
            "lr": self.lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "clips_per_s": clips_s,
            "tokens_per_s": clips_s * self.tokens_per_sample,
            "data_wait_frac": self.wait / elapsed,
            "mfu": mfu if math.isfinite(self.peak) else math.nan,
            "peak_mem_gib": peak_memory_gib(self.device),
            "epoch": float(epoch),
            "samples": float(samples),
            "nonfinite_total": float(nonfinite),
            **{
                f"train/{k}": total / count if count else math.nan for k, (total, count) in self.extra.items()
            },
            **{f"data/{k}": float(v) for k, v in (data or {}).items()},
        }
        self.tracker.log_metrics(metrics, step)
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.4f}", lr=f"{self.lr:.2e}", clips_s=f"{clips_s:.1f}", refresh=False
        )
        self._reset()
        return metrics

    def note(self, message: str) -> None:
        """A line above the progress bar (rank 0 only)."""
        if not self._bar_args["disable"]:
            tqdm.write(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
