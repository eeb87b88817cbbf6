"""The training loop: data → task loss → backward → step → log → checkpoint → eval. Nothing else.

`run(task, cfg)` is the whole engine for both stages. Setup (process group, DeepSpeed, loaders, resume)
comes first; the loop is the `while step < total_steps` block below and reads top to bottom.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint as ckpt_io
from .config import (
    ConfigError,
    EngineConfig,
    deepspeed_config,
    flatten,
    grad_accum_steps,
    peak_lr,
    resume_signature,
    signature_hash,
    to_dict,
    to_yaml,
)
from .dist import (
    DistInfo,
    any_true,
    barrier,
    env_world_size,
    import_deepspeed,
    init_distributed,
    mean_over_ranks,
    prepare_env,
)
from .optim import WarmupCosine, build_optimizer
from .task import Task, TaskContext
from .tracking import Tracker

# Peak dense FLOP/s per device (vendor datasheets, SXM parts): bf16/fp16 tensor, tf32 tensor, plain fp32.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
}


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (e.g. too many non-finite losses); the last good checkpoint is kept."""


@dataclass
class RunResult:
    run_dir: Path
    step: int
    preempted: bool
    last_checkpoint: Path | None
    model_dir: Path | None
    tracking: str
    nonfinite_steps: int


def peak_flops_per_device(cfg: EngineConfig, device: torch.device) -> float:
    """`tracking.peak_tflops` if set; else the table for the CUDA device; NaN when unknown (CPU)."""
    if cfg.tracking.peak_tflops is not None:
        return cfg.tracking.peak_tflops * 1e12
    if device.type != "cuda":
        return math.nan
    name = torch.cuda.get_device_name(device)
    precision = (
        "bf16"
        if (cfg.deepspeed.bf16 or cfg.deepspeed.fp16)
        else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
    )
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table[precision]
    return math.nan


def peak_memory_gib(device: torch.device) -> float:
    """CUDA max allocated, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`auto`: newest complete checkpoint (or a fresh start); a path: that checkpoint; None/none: fresh."""
    if resume in (None, "", "none", "never"):
        if ckpt_io.latest_complete(run_dir) is not None:
            raise ConfigError(
                f"{run_dir} already has checkpoints: pass --resume auto to continue that run, or set "
                "train.run_dir to a new directory"
            )
        return None
    if resume == "auto":
        return ckpt_io.latest_complete(run_dir)
    path = Path(resume)
    if not (path / ckpt_io.COMPLETE).is_file():
        raise ConfigError(
            f"--resume {resume}: not a complete checkpoint directory (no '{ckpt_io.COMPLETE}' marker)"
        )
    return path


def build_loader(
    task: Task, cfg: EngineConfig, split: str, train: bool, dist: DistInfo, epoch: int = 0
) -> Any:
    from data_shards.loader import build_loader as _build

    d = cfg.data
    kwargs: dict[str, Any] = dict(
        batch_size=cfg.train.micro_batch_size,
        spec=task.sampling_spec(split, train),
        backend=d.backend,
        rank=dist.rank,
        world_size=dist.world_size,
        seed=cfg.train.seed,
        device=dist.device,
        num_workers=d.num_workers,
        drop_last=train,
        max_skip_fraction=d.max_skip_fraction,
        epoch=epoch,
    )
    if d.backend == "synthetic" and d.shards is None:
        kwargs["num_samples"] = d.synthetic_size
    return _build(d.shards or "", split, **kwargs)


def has_split(cfg: EngineConfig, split: str | None) -> bool:
    if not split:
        return False
    if cfg.data.backend == "synthetic" or cfg.data.shards is None:
        return True
    from data_shards.format import load_manifest

    info = load_manifest(cfg.data.shards).splits.get(split)
    return info is not None and info.samples > 0


class _Preemption:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.requested = True
        print(f"[tubelet] {signal.Signals(signum).name}: checkpointing at the next step boundary", flush=True)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def run(task: Task, cfg: EngineConfig, resume: str | None = None) -> RunResult:
    """Train `task` under `cfg` (validated here again: every config error precedes the process group)."""
    cfg.validate(env_world_size())
    run_dir = Path(cfg.train.run_dir)
    resume_from = resolve_resume(resume, run_dir)
    signature = resume_signature(cfg)
    if resume_from is not None:
        ckpt_io.check_compatible(resume_from, signature, env_world_size())

    # ---- build ---------------------------------------------------------------------------------
    device = prepare_env(cfg.train.device)
    dist = init_distributed(device, cfg.deepspeed.dist_backend)
    deepspeed = import_deepspeed()
    run_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg.train.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # same initial weights on every rank
    task.setup(TaskContext(dist.rank, dist.world_size, device, seed, run_dir))
    model = task.build_model().to(device)

    loader = build_loader(task, cfg, cfg.data.train_split, True, dist)
    accum = grad_accum_steps(cfg, dist.world_size)
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch < 1:
        raise ConfigError(
            f"{cfg.data.train_split} split gives {len(loader)} micro-batches per rank per epoch, fewer than one "
            f"step's {accum}: lower train.global_batch_size or add data"
        )
    total_steps = cfg.train.steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    o = cfg.optim
    warmup = o.warmup_steps if o.warmup_steps is not None else round((o.warmup_epochs or 0) * steps_per_epoch)
    if warmup >= total_steps:
        raise ConfigError(f"warmup ({warmup} steps) must be shorter than training ({total_steps} steps)")
    optimizer = build_optimizer(model, cfg, device)
    scheduler = WarmupCosine(optimizer, peak_lr(cfg), warmup, total_steps, o.min_lr)
    ds_json = deepspeed_config(cfg, dist.world_size)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_json
    )

    resolved = {
        "resolved.world_size": dist.world_size,
        "resolved.grad_accum_steps": accum,
        "resolved.total_steps": total_steps,
        "resolved.steps_per_epoch": steps_per_epoch,
        "resolved.warmup_steps": warmup,
        "resolved.peak_lr": peak_lr(cfg),
        "resolved.signature_hash": signature_hash(signature),
    }
    tracker = Tracker(cfg.tracking, run_dir, dist.is_main)
    if dist.is_main:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_json, indent=2) + "\n")
        task_params = getattr(task, "tracking_params", None)  # optional hook: e.g. trainable parameter counts
        tracker.log_params({**flatten(to_dict(cfg)), **resolved, **(task_params() if task_params else {})})
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(run_dir / "deepspeed.json")

    step, samples, epoch, nonfinite_total = 0, 0, 0, 0
    if resume_from is not None:
        state = ckpt_io.load(engine, resume_from, dist.rank)
        step, samples, epoch = state["step"], state["samples"], state["epoch"]
        nonfinite_total = state["nonfinite_total"]
        ckpt_io.set_rng_state(state["rng"])
        task.load_state_dict(state["task"])
        loader.set_epoch(epoch)
        loader.load_state_dict(state["loader"])
    else:
        loader.set_epoch(epoch)

    def save() -> Path:
        rank_state = {
            "step": step,
            "samples": samples,
            "epoch": epoch,
            "nonfinite_total": nonfinite_total,
            "rng": ckpt_io.rng_state(),
            "task": task.state_dict(),
            "loader": loader.state_dict(),
        }
        marker = {
            "signature": signature,
            "world_size": dist.world_size,
            "zero_stage": cfg.deepspeed.zero_stage,
            "samples": samples,
            "epoch": epoch,
        }
        return ckpt_io.save(engine, run_dir, step, dist.rank, rank_state, marker, cfg.checkpoint.keep_last)

    val_split = cfg.data.val_split if has_split(cfg, cfg.data.val_split) else None
    early_stopped = False

    def after_evaluate(metrics: dict[str, float]) -> bool:
        """Log val metrics; the optional `task.after_evaluate` hook may keep a best model / stop early."""
        tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step)
        hook = getattr(task, "after_evaluate", None)
        if hook is None:
            return False
        outcome = hook(engine, metrics, step)  # collective: every rank calls it with the same metrics
        if outcome.metrics:
            tracker.log_metrics(outcome.metrics, step)
        for path in outcome.artifacts:
            tracker.log_artifact(path, path.name)
        return bool(outcome.stop)

    def evaluate() -> dict[str, float]:
        val = build_loader(task, cfg, val_split, False, dist)
        n = len(val) if not cfg.train.eval_batches else min(len(val), cfg.train.eval_batches)
        n = _min_over_ranks(n, device) if dist.world_size > 1 else n  # ZeRO-3 forwards are collective
        engine.eval()
        with torch.no_grad():
            metrics = task.evaluate(engine, _take(val, n))
        engine.train()
        keys = sorted(metrics)
        return dict(zip(keys, mean_over_ranks([float(metrics[k]) for k in keys], device)))

    # ---- loop ----------------------------------------------------------------------------------
    flops_per_sample = float(task.flops_per_sample())
    tokens_per_sample = float(getattr(task, "tokens_per_sample", lambda: math.nan)())
    peak = peak_flops_per_device(cfg, device)
    preempt = _Preemption()
    data_iter = iter(loader)
    last_ckpt: Path | None = ckpt_io.latest_complete(run_dir)
    consecutive_bad = 0
    window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0, "loss": 0.0, "extra": {}}
    bar = tqdm(total=total_steps, initial=step, disable=not dist.is_main, dynamic_ncols=True, desc="train")
    stopped: str | None = None
    engine.train()
    try:
        while step < total_steps:
            good, step_loss, step_metrics, batch, lr_used = 0, 0.0, {}, None, math.nan
            while good < accum:  # one optimizer step = `accum` micro-batches with a finite loss
                t_wait = time.perf_counter()
                try:
                    batch = next(data_iter)
                except StopIteration:
                    epoch += 1
                    loader.set_epoch(epoch)
                    data_iter = iter(loader)
                    batch = next(data_iter)
                window["wait"] += time.perf_counter() - t_wait

                out = task.loss(engine, batch)
                if any_true(not bool(torch.isfinite(out.loss.detach()).all()), device):
                    nonfinite_total += 1
                    consecutive_bad += 1
                    if dist.is_main:
                        tqdm.write(
                            f"[tubelet] step {step}: non-finite loss, micro-batch skipped ({consecutive_bad} in a row)"
                        )
                    if consecutive_bad >= cfg.train.max_consecutive_nonfinite:
                        stopped = (
                            f"{consecutive_bad} consecutive non-finite losses at step {step} "
                            f"(train.max_consecutive_nonfinite={cfg.train.max_consecutive_nonfinite}); stopping. "
                            f"Last good checkpoint: {last_ckpt or 'none'}. Lower optim.lr / enable "
                            "optim.grad_clip, or check the data."
                        )
                        raise TrainingStopped(stopped)
                    continue
                consecutive_bad = 0
                lr_used = float(max(engine.get_lr()))  # the top layer's (lr_scale 1)
                engine.backward(out.loss)
                engine.step()
                good += 1
                step_loss += float(out.loss.detach()) / accum
                for k, v in out.metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + float(v) / accum
            step += 1
            samples += cfg.train.global_batch_size
            window["steps"] += 1
            window["loss"] += step_loss
            window["lr"] = lr_used
            for k, v in step_metrics.items():
                window["extra"][k] = window["extra"].get(k, 0.0) + v

            if step % cfg.train.log_every == 0 or step == total_steps:
                _log(
                    engine,
                    tracker,
                    bar,
                    window,
                    step,
                    epoch,
                    samples,
                    cfg,
                    dist,
                    device,
                    flops_per_sample,
                    tokens_per_sample,
                    peak,
                    nonfinite_total,
                )
            else:
                bar.update(1)

            if cfg.train.visualize_every and step % cfg.train.visualize_every == 0:
                out_dir = run_dir / "images" / ckpt_io.tag_for(step) if dist.is_main else None
                engine.eval()
                with torch.no_grad():
                    files = task.visualize(engine, batch, out_dir)
                engine.train()
                for f in files:
                    tracker.log_artifact(f, f"reconstructions/{ckpt_io.tag_for(step)}")

            preempted = any_true(preempt.requested, device) or step == cfg.train.stop_at
            if preempted or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                last_ckpt = save()
            if preempted:
                break
            due = val_split and cfg.train.eval_every and step % cfg.train.eval_every == 0
            if due and step < total_steps and after_evaluate(evaluate()):
                early_stopped = True
                if dist.is_main:
                    tqdm.write(f"[tubelet] early stopping at step {step} (the task's after_evaluate hook)")
                break

        preempted = step < total_steps and not early_stopped
        if not preempted:
            if cfg.checkpoint.save_final and (last_ckpt is None or last_ckpt.name != ckpt_io.tag_for(step)):
                last_ckpt = save()
            if val_split and not early_stopped:
                after_evaluate(evaluate())
        model_dir = None
        if not preempted and cfg.tracking.log_model and last_ckpt is not None:
            barrier()
            if dist.is_main:
                model_dir = export(last_ckpt.parent.parent, run_dir / "model", task)
                tracker.log_artifact(model_dir, "model")
            barrier()
        bar.close()
        tracker.close("KILLED" if preempted else "FINISHED")
        return RunResult(run_dir, step, preempted, last_ckpt, model_dir, tracker.describe(), nonfinite_total)
    except BaseException:
        bar.close()
        tracker.close("FAILED")
        raise
    finally:
        preempt.restore()


def _take(loader: Any, n: int) -> Any:
    for i, batch in enumerate(loader):
        if i >= n:
            break
        yield batch


def _min_over_ranks(n: int, device: torch.device) -> int:
    import torch.distributed as td

    t = torch.tensor([n], dtype=torch.int64, device=device)
    td.all_reduce(t, op=td.ReduceOp.MIN)
    return int(t.item())


def _log(
    engine: Any,
    tracker: Tracker,
    bar: Any,
    window: dict[str, Any],
    step: int,
    epoch: int,
    samples: int,
    cfg: EngineConfig,
    dist: DistInfo,
    device: torch.device,
    flops_per_sample: float,
    tokens_per_sample: float,
    peak: float,
    nonfinite_total: int,
) -> None:
    """Average the window's loss/metrics over ranks, compute throughput, write jsonl/MLflow, move the bar."""
    n = window["steps"]
    elapsed = max(time.perf_counter() - window["t0"], 1e-9)
    keys = sorted(window["extra"])
    vals = mean_over_ranks(
        [window["loss"] / n, window["wait"] / elapsed] + [window["extra"][k] / n for k in keys], device
    )
    clips_s = n * cfg.train.global_batch_size / elapsed
    grad_norm = engine.get_global_grad_norm()
    lr = window["lr"]  # the LR this step used (the scheduler has already moved on)
    metrics = {
        "loss": vals[0],
        "lr": float(lr),
        "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
        "clips_per_s": clips_s,
        "tokens_per_s": clips_s * tokens_per_sample,
        "data_wait_frac": vals[1],
        "mfu": flops_per_sample * clips_s / (dist.world_size * peak) if peak == peak else math.nan,
        "peak_mem_gib": peak_memory_gib(device),
        "epoch": float(epoch),
        "samples": float(samples),
        "nonfinite_total": float(nonfinite_total),
        **{f"train/{k}": v for k, v in zip(keys, vals[2:])},
    }
    tracker.log_metrics(metrics, step)
    bar.set_postfix(loss=f"{vals[0]:.4f}", lr=f"{float(lr):.2e}", clips_s=f"{clips_s:.1f}", refresh=False)
    bar.update(step - bar.n)
    window.update(t0=time.perf_counter(), wait=0.0, steps=0, loss=0.0, extra={})


def export(run_dir: Path, out_dir: Path, task: Task) -> Path:
    """Consolidate the newest complete checkpoint of `run_dir` into fp32 weights and let the task write
    its model directory (for MAE: `save_model` → model.safetensors + config.json)."""
    ckpt = ckpt_io.find_export_checkpoint(Path(run_dir))
    state = ckpt_io.consolidated_state_dict(ckpt)
    model = task.build_model()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
        raise RuntimeError(
            f"{ckpt}: weights do not match the task's model: missing {missing}, unexpected {unexpected}"
        )
    marker = ckpt_io.read_marker(ckpt)
    return task.export(
        model,
        Path(out_dir),
        {"step": marker["step"], "samples": marker.get("samples"), "checkpoint": str(ckpt)},
    )
