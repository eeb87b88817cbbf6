"""The training loop: `Trainer(task, cfg).train()`.

Read `train()` first: step → log → pictures → evaluate → checkpoint, until the run is finished, preempted
or stopped early; the step that ends the run evaluates and checkpoints exactly once, inside the loop.
`train_step()` is one optimizer step: gradient accumulation and one collective. Everything resumable
(TrainState, RNG states, the task's and the loader's state, DeepSpeed's) goes through `save()` and
`_restore()`. `__init__` only builds.
"""

from __future__ import annotations

import enum
import itertools
import json
import math
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from data_shards import storage

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
    DeepSpeedRuntime,
    DistInfo,
    barrier,
    env_world_size,
    mean_over_ranks,
    min_over_ranks,
    reduce_sum,
)
from .metrics import MetricsLogger, StepStats, peak_flops_per_device
from .optim import VetoableAdamW, build_optimizer, lr_at, set_lr
from .remote import RunMirror, env_rank, shown
from .state import TrainState, mix_seed
from .task import Batch, StepOutput, Task, TaskContext
from .tracking import Tracker

EXPORTED = "exported.json"  # written once the final model is exported and logged


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite losses in a row); the last good checkpoint is kept."""


class Outcome(enum.Enum):
    """How `train()` ended. FINISHED and EARLY_STOPPED complete the run (final checkpoint, evaluation,
    export); PREEMPTED (SIGTERM/SIGINT) and PAUSED (`train.stop_at`) checkpoint and wait for `--resume`."""

    FINISHED = "finished"
    EARLY_STOPPED = "early_stopped"
    PREEMPTED = "preempted"
    PAUSED = "paused"

    @property
    def completed(self) -> bool:
        return self in (Outcome.FINISHED, Outcome.EARLY_STOPPED)


@dataclass
class RunResult:
    run_dir: Path
    step: int
    outcome: Outcome
    last_checkpoint: Path | None
    model_dir: Path | None
    tracking: str
    nonfinite_steps: int
    location: str | None = None  # the run directory's URL when `run_dir` is this machine's staging copy


@dataclass(frozen=True)
class Schedule:
    """Run length and learning rate, fixed once the train loader's length is known."""

    accum: int
    steps_per_epoch: int
    total_steps: int
    warmup: int
    peak_lr: float
    min_lr: float

    @classmethod
    def plan(cls, cfg: EngineConfig, world_size: int, micro_batches_per_epoch: int) -> Schedule:
        accum = grad_accum_steps(cfg, world_size)
        per_epoch = micro_batches_per_epoch // accum
        if per_epoch < 1:
            raise ConfigError(
                f"the train loader gives {micro_batches_per_epoch} micro-batches per rank per epoch, fewer than "
                f"one step's {accum}: lower train.global_batch_size or add data"
            )
        total = cfg.train.steps or math.ceil(cfg.train.epochs * per_epoch)
        o = cfg.optim
        warmup = o.warmup_steps if o.warmup_steps is not None else round((o.warmup_epochs or 0) * per_epoch)
        if warmup >= total:
            raise ConfigError(f"warmup ({warmup} steps) must be shorter than training ({total} steps)")
        return cls(accum, per_epoch, total, warmup, peak_lr(cfg), o.min_lr)

    def lr(self, step: int) -> float:
        return lr_at(step, self.peak_lr, self.warmup, self.total_steps, self.min_lr)


class Runtime(Protocol):
    """The process group and the engine around the model (DeepSpeed, or an in-process stand-in in tests)."""

    def start(self, device: str, backend: str) -> DistInfo: ...
    def initialize(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]
    ) -> Any: ...


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits cleanly."""

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


@dataclass
class _Step:
    """What `train_step` hands back to the loop for a completed step."""

    stats: StepStats
    preempt: bool  # some rank was asked to stop (SIGTERM/SIGINT)
    batch: Batch


# the loader counts logged as data/<name> (`VideoLoader.stats`: skipped samples, object-storage traffic)
LOADER_COUNTS = ("skipped", "remote_gets", "remote_bytes", "cache_hits", "storage_retries")


class Trainer:
    """Builds the run in `__init__`; `train()` runs it; `evaluate()`, `save()` and `close()` are its parts."""

    def __init__(
        self, task: Task, cfg: EngineConfig, resume: str | None = None, runtime: Runtime | None = None
    ) -> None:
        cfg.validate(env_world_size())  # every config error precedes the process group
        _check_task_config(task, cfg)
        self.task, self.cfg = task, cfg
        self.mirror = RunMirror(cfg.train.run_dir, env_rank()) if storage.is_url(cfg.train.run_dir) else None
        if self.mirror is not None:  # a URL run dir: this rank works in a local staging copy of it
            self.mirror.pull(resume)
        self.run_dir = self.mirror.local if self.mirror else Path(cfg.train.run_dir)
        self.signature = resume_signature(cfg)
        self.resume = self._plan_resume(resume)
        runtime = runtime or DeepSpeedRuntime()
        self.dist = runtime.start(cfg.train.device, cfg.deepspeed.dist_backend)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _seed_everything(cfg.train.seed)  # same initial weights on every rank
        self.ctx = TaskContext(
            self.dist.rank, self.dist.world_size, self.dist.device, cfg.train.seed, self.run_dir
        )
        task.setup(self.ctx)
        model = task.build_model().to(self.dist.device)
        saved = self._read_saved(model)
        if saved is None:
            task.init_weights(model)
        self.state = TrainState()
        if saved is not None:
            self.state.load_state_dict(saved["train"])
        self.train_loader = task.train_loader(self.ctx, self.state.epoch)
        self.val_loader = task.val_loader(self.ctx)
        self.schedule = Schedule.plan(cfg, self.dist.world_size, len(self.train_loader))
        self.optimizer: VetoableAdamW = build_optimizer(model, cfg, self.dist.device)
        ds_json = deepspeed_config(cfg, self.dist.world_size)
        if self.resume is not None and self.resume.universal:
            ds_json["checkpoint"] = {"load_universal": True}
        self.engine = runtime.initialize(model, self.optimizer, ds_json)
        self._norm_buffers = _running_stats(model) if self.dist.world_size > 1 else []
        if saved is not None:
            self._restore(saved)
        self.tracker = Tracker(cfg.tracking, self.run_dir, self.dist.is_main)
        self.metrics = self._metrics_logger()
        self.last_checkpoint = ckpt_io.latest_complete(self.run_dir)
        self._metric_keys: list[str] | None = None
        self._skipped_in_a_row = 0
        self.preemption: Preemption | None = None
        if self.dist.is_main:
            self._record_run()

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> RunResult:
        """Optimizer steps until the run is finished, preempted or stopped early (see `Outcome`)."""
        self.preemption = Preemption()
        batches = self._batches()
        finished_before = self.state.step >= self.schedule.total_steps  # `--resume auto` on a finished run
        outcome: Outcome | None = Outcome.FINISHED if finished_before else None
        try:
            self.engine.train()
            while outcome is None:
                done = self.train_step(batches)
                if done is None:  # skipped: some rank saw a non-finite loss
                    continue
                self._log(done.stats)
                outcome = self._outcome(done.preempt)
                if self._due(self.cfg.train.visualize_every):
                    self.visualize(done.batch)
                if self._eval_due(outcome) and self.evaluate_and_report():
                    outcome = Outcome.EARLY_STOPPED
                if outcome or self._due(self.cfg.checkpoint.every):
                    self._checkpoint(outcome)
            self.metrics.close()  # the bar ends at its last step, before the export's and registration's lines
            model_dir = None
            if outcome.completed:
                model_dir = self._finished_model() if finished_before else self._export_final()
        except BaseException:
            self.close("FAILED")
            raise
        finally:
            self.preemption.restore()
        self.close("FINISHED" if outcome.completed else "KILLED")
        return RunResult(
            self.run_dir,
            self.state.step,
            outcome,
            self.last_checkpoint,
            model_dir,
            self.tracker.describe(self._shown(self.run_dir / "metrics.jsonl")),
            self.state.nonfinite,
            self.mirror.url if self.mirror else None,
        )

    def train_step(self, batches: Iterator[Batch]) -> _Step | None:
        """One optimizer step over `schedule.accum` micro-batches, then one collective carrying the loss,
        metrics, data wait, non-finite count and preemption flag of every rank (and the batch-norm running
        statistics, averaged so every rank holds the same model). A non-finite loss on any rank vetoes the
        update on every rank: the step is counted as skipped and None is returned."""
        lr = self.schedule.lr(self.state.step)
        set_lr(self.optimizer, lr)
        totals: torch.Tensor | None = None
        for i in range(self.schedule.accum):
            t0 = time.perf_counter()
            batch = next(batches)
            wait = time.perf_counter() - t0
            out = self.task.loss(self.engine, batch)
            self.engine.backward(out.loss)
            row = self._stats_row(out, wait)
            totals = row if totals is None else totals + row
            if i < self.schedule.accum - 1:
                self.engine.step()  # DeepSpeed accumulates; the update happens at the boundary below
        preempt = float(self.preemption is not None and self.preemption.requested)
        summed = self._reduce_step(torch.cat([totals, totals.new_tensor([preempt])]))
        skip = summed[0] > 0
        with self.optimizer.veto(skip):
            self.engine.step()
        if skip:
            self._count_skip()
            return None
        self._skipped_in_a_row = 0
        self.state.step += 1
        self.state.samples += self.cfg.train.global_batch_size
        return _Step(self._step_stats(summed, lr), summed[-1] > 0, batch)

    # ------------------------------------------------------------------------------------- evaluate
    def evaluate(self) -> dict[str, float]:
        """The task's metrics over the val loader (at most `train.eval_batches` per rank), rank-averaged."""
        assert self.val_loader is not None
        n = (
            len(self.val_loader)
            if not self.cfg.train.eval_batches
            else min(len(self.val_loader), self.cfg.train.eval_batches)
        )
        n = min_over_ranks(n, self.dist.device)  # ZeRO-3 forwards are collective: the same count everywhere
        self.engine.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(self.engine, itertools.islice(self.val_loader, n))
        self.engine.train()
        keys = sorted(metrics)
        return dict(zip(keys, mean_over_ranks([float(metrics[k]) for k in keys], self.dist.device)))

    def evaluate_and_report(self) -> bool:
        """Evaluate, log `val/*`, run the task's `after_evaluate` (collective); True = stop early."""
        with self.metrics.paused():
            metrics = self.evaluate()
            step = self.state.step
            self.tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step)
            outcome = self.task.after_evaluate(self.engine, metrics, step)
            if outcome.metrics:
                self.tracker.log_metrics(outcome.metrics, step)
            for path in outcome.artifacts:
                self.tracker.log_artifact(path, path.name)
        if outcome.stop:
            self.metrics.note(f"[tubelet] early stopping at step {step} (the task's after_evaluate)")
        return outcome.stop

    def visualize(self, batch: Batch) -> None:
        """The task's pictures of `batch` (collective forward), logged as artifacts by rank 0."""
        tag = ckpt_io.tag_for(self.state.step)
        with self.metrics.paused():
            self.engine.eval()
            with torch.no_grad():
                files = self.task.visualize(
                    self.engine, batch, self.run_dir / "images" / tag if self.dist.is_main else None
                )
            self.engine.train()
            for f in files:
                self.tracker.log_artifact(f, f"reconstructions/{tag}")

    # ------------------------------------------------------------------------------------ checkpoint
    def save(self) -> Path:
        """Collective: DeepSpeed's state + this rank's resume state; complete (marker written) on return."""
        rank_state = {
            "train": self.state.state_dict(),
            "rng": ckpt_io.rng_state(),
            "task": self.task.state_dict(),
            "loader": self.train_loader.state_dict(),
        }
        marker = {
            "signature": self.signature,
            "world_size": self.dist.world_size,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "micro_batch_size": self.cfg.train.micro_batch_size,
            "samples": self.state.samples,
            "epoch": self.state.epoch,
        }
        with self.metrics.paused():
            self.last_checkpoint = ckpt_io.save(
                self.engine,
                self.run_dir,
                self.state.step,
                self.dist.rank,
                rank_state,
                marker,
                self.cfg.checkpoint.keep_last,
                self.mirror,
            )
            if self.mirror is not None and self.dist.is_main:
                self.mirror.push_files()
        return self.last_checkpoint

    def close(self, status: str) -> None:
        """End tracking (MLflow status FINISHED / KILLED / FAILED) and the progress bar; a URL run dir gets
        rank 0's last files."""
        self.metrics.close()
        self.tracker.close(status)
        if self.mirror is not None and self.dist.is_main:
            self.mirror.push_files()

    # ----------------------------------------------------------------------------------------- parts
    def _batches(self) -> Iterator[Batch]:
        """Micro-batches forever; an exhausted loader starts the next epoch (`state.epoch` counts them)."""
        while True:
            self.train_loader.set_epoch(self.state.epoch)
            yield from self.train_loader
            self.state.epoch += 1

    def _reduce_step(self, stats: torch.Tensor) -> list[float]:
        """The step's one collective: sum `stats` over ranks (returned as floats) with the running statistics
        of the model's batch norms appended, written back as their mean (DDP would broadcast rank 0's; the
        mean keeps every rank's batches, and identical buffers make rank 0's checkpoint everyone's)."""
        if not self._norm_buffers:
            return reduce_sum(stats).tolist()
        flat = torch.cat([stats, *(b.detach().double().flatten() for b in self._norm_buffers)])
        reduced = reduce_sum(flat)
        offset = stats.numel()
        for b in self._norm_buffers:
            b.copy_(reduced[offset : offset + b.numel()].view_as(b) / self.dist.world_size)
            offset += b.numel()
        return reduced[: stats.numel()].tolist()

    def _stats_row(self, out: StepOutput, wait_s: float) -> torch.Tensor:
        """[non-finite?, loss, wait, (metric sum, metric count) per metric] on the device: no host sync."""
        if self._metric_keys is None:
            self._metric_keys = sorted(out.metrics)
        if sorted(out.metrics) != self._metric_keys:
            raise RuntimeError(
                f"{type(self.task).__name__}.loss returned metrics {sorted(out.metrics)}, earlier {self._metric_keys}: "
                "return the same keys every call (NaN when not measured)"
            )
        loss = out.loss.detach().double()
        finite = torch.isfinite(loss)
        parts = [(~finite).double(), torch.where(finite, loss, 0.0), loss.new_tensor(wait_s)]
        for k in self._metric_keys:
            v = torch.as_tensor(out.metrics[k], device=loss.device).detach().double()
            ok = torch.isfinite(v)
            parts += [torch.where(ok, v, 0.0), ok.double()]
        return torch.stack(parts)

    def _step_stats(self, summed: list[float], lr: float) -> StepStats:
        world = self.dist.world_size
        metrics = {}
        for i, k in enumerate(self._metric_keys or []):
            total, count = summed[3 + 2 * i], summed[4 + 2 * i]
            metrics[k] = total / count if count else math.nan
        return StepStats(
            loss=summed[1] / (self.schedule.accum * world), lr=lr, wait_s=summed[2] / world, metrics=metrics
        )

    def _count_skip(self) -> None:
        self.state.nonfinite += 1
        self._skipped_in_a_row += 1
        limit = self.cfg.train.max_consecutive_nonfinite
        self.metrics.note(
            f"[tubelet] step {self.state.step}: non-finite loss, step skipped ({self._skipped_in_a_row} in a row)"
        )
        if self._skipped_in_a_row >= limit:
            raise TrainingStopped(
                f"{self._skipped_in_a_row} consecutive non-finite losses at step {self.state.step} "
                f"(train.max_consecutive_nonfinite={limit}); stopping. Last good checkpoint: "
                f"{self.last_checkpoint or 'none'}. Lower optim.lr / enable optim.grad_clip, or check the data."
            )

    def _outcome(self, preempt: bool) -> Outcome | None:
        if self.state.step >= self.schedule.total_steps:
            return Outcome.FINISHED
        if self.state.step == self.cfg.train.stop_at:
            return Outcome.PAUSED
        return Outcome.PREEMPTED if preempt else None

    def _due(self, every: int) -> bool:
        return bool(every) and self.state.step % every == 0

    def _eval_due(self, outcome: Outcome | None) -> bool:
        """At the last step, and every `train.eval_every` steps before it (not when preempted or paused)."""
        if self.val_loader is None:
            return False
        return outcome is Outcome.FINISHED or (outcome is None and self._due(self.cfg.train.eval_every))

    def _log(self, stats: StepStats) -> None:
        self.metrics.add(stats)
        if self._due(self.cfg.train.log_every) or self.state.step == self.schedule.total_steps:
            s = self.state
            grad_norm = self.engine.get_global_grad_norm()
            self.metrics.log(
                s.step,
                epoch=s.epoch,
                samples=s.samples,
                nonfinite=s.nonfinite,
                grad_norm=grad_norm,
                data=self._loader_counts(),
            )

    def _loader_counts(self) -> dict[str, float]:
        """This rank's train-loader counts a run should see: skipped samples, and reads from object storage."""
        stats = getattr(self.train_loader, "stats", None) or {}
        return {k: float(stats[k]) for k in LOADER_COUNTS if k in stats}

    def _checkpoint(self, outcome: Outcome | None) -> None:
        """Save at this step unless it is already saved, or the run finished with `save_final` off."""
        if outcome is Outcome.FINISHED and not self.cfg.checkpoint.save_final:
            return
        if self.last_checkpoint is None or self.last_checkpoint.name != ckpt_io.tag_for(self.state.step):
            self.save()

    def _export_final(self) -> Path | None:
        """Rank 0 writes `<run_dir>/model` from the last checkpoint (tracking.log_model) and logs it."""
        if not self.cfg.tracking.log_model or self.last_checkpoint is None:
            return None
        barrier()
        model_dir = None
        if self.dist.is_main:
            if self.mirror is not None:  # the other ranks' ZeRO partitions, for the consolidation
                self.mirror.pull_checkpoint(self.last_checkpoint.name, every_rank=True)
            model_dir = ckpt_io.export(self.run_dir, self.run_dir / "model", self.task)
            self.task.log_model(model_dir, self.tracker)
            (self.run_dir / EXPORTED).write_text(
                json.dumps({"step": self.state.step, "model": "model"}) + "\n"
            )
        barrier()
        return model_dir

    def _finished_model(self) -> Path | None:
        """A run resumed after its last step trains nothing more: its model directory is the one it has, or,
        when it was stopped while exporting or logging it (no `exported.json`), the one exported now."""
        self.metrics.note(
            f"[tubelet] {self.run_dir} already finished at step {self.state.step}: nothing to train"
        )
        if not (self.run_dir / EXPORTED).is_file():
            return self._export_final()
        return self.run_dir / "model"

    def _shown(self, path: Path) -> str:
        """A path in the run directory as the user knows it: its URL when the run directory is one."""
        return shown(path, self.run_dir, self.mirror.url if self.mirror else None)

    def _plan_resume(self, resume: str | None) -> ckpt_io.ResumePlan | None:
        """The checkpoint to continue from (refused when incompatible) and how (before any process group)."""
        ckpt = ckpt_io.resolve_resume(resume, self.run_dir, self.cfg.train.run_dir)
        if ckpt is None:
            return None
        return ckpt_io.plan_resume(
            ckpt,
            self.signature,
            world_size=env_world_size(),
            zero_stage=self.cfg.deepspeed.zero_stage,
            micro_batch_size=self.cfg.train.micro_batch_size,
        )

    def _read_saved(self, model: torch.nn.Module) -> dict[str, Any] | None:
        """This rank's saved state (rank 0's when the world size changed: TrainState, loader position and
        task state are global; per-rank random streams are re-derived in `_restore`). On a re-partitioned
        resume, also the buffers and frozen weights the universal checkpoint lacks, into the bare model."""
        plan = self.resume
        if plan is None:
            return None
        if self.dist.is_main:
            print(f"[tubelet] {plan.describe(self._shown(plan.ckpt))}", flush=True)
        if plan.universal:
            ckpt_io.load_unoptimized_state(model, plan.ckpt)
        return ckpt_io.read_rank_state(plan.ckpt, self.dist.rank if plan.same_ranks else 0)

    def _restore(self, saved: dict[str, Any]) -> None:
        plan = self.resume
        assert plan is not None
        if plan.universal:
            ckpt_io.universal_checkpoint(plan.ckpt, self.dist.rank, self.mirror)
        ckpt_io.load_engine(self.engine, plan.ckpt, universal=plan.universal)
        self.task.load_state_dict(saved["task"])
        self.train_loader.load_state_dict(saved["loader"])
        if plan.same_ranks:
            ckpt_io.set_rng_state(saved["rng"])  # last: everything built so far may have drawn numbers
        else:  # the ranks that held these streams are gone: fresh ones, distinct per (rank, step)
            step = self.state.step
            _seed_everything(mix_seed(self.cfg.train.seed, self.dist.rank, step))
            self.task.reseed(step)

    def _metrics_logger(self) -> MetricsLogger:
        ds = self.cfg.deepspeed
        peak = peak_flops_per_device(self.dist.device, ds.bf16 or ds.fp16, self.cfg.tracking.peak_tflops)
        return MetricsLogger(
            self.tracker,
            global_batch=self.cfg.train.global_batch_size,
            world_size=self.dist.world_size,
            device=self.dist.device,
            flops_per_sample=float(self.task.flops_per_sample()),
            tokens_per_sample=float(self.task.tokens_per_sample()),
            peak_flops=peak,
            total_steps=self.schedule.total_steps,
            start_step=self.state.step,
            show=self.dist.is_main,
        )

    def _record_run(self) -> None:
        """Rank 0: the resolved config and DeepSpeed JSON in the run dir and the tracker, with parameters."""
        ds_json = deepspeed_config(self.cfg, self.dist.world_size)
        (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        (self.run_dir / "deepspeed.json").write_text(json.dumps(ds_json, indent=2) + "\n")
        s = self.schedule
        resolved = {
            "resolved.world_size": self.dist.world_size,
            "resolved.grad_accum_steps": s.accum,
            "resolved.total_steps": s.total_steps,
            "resolved.steps_per_epoch": s.steps_per_epoch,
            "resolved.warmup_steps": s.warmup,
            "resolved.peak_lr": s.peak_lr,
            "resolved.signature_hash": signature_hash(self.signature),
        }
        self.tracker.log_params({**flatten(to_dict(self.cfg)), **resolved, **self.task.tracking_params()})
        self.tracker.log_artifact(self.run_dir / "config.yaml")
        self.tracker.log_artifact(self.run_dir / "deepspeed.json")


def _running_stats(model: torch.nn.Module) -> list[torch.Tensor]:
    """Batch-norm running means/variances: per-rank state that the ranks must agree on."""
    return [b for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]


def _check_task_config(task: Task, cfg: EngineConfig) -> None:
    """Config keys only some tasks honour, refused (naming the key) for a task that would ignore them."""
    if cfg.tracking.register_as and type(task).log_model is Task.log_model:
        raise ConfigError(
            f"tracking.register_as={cfg.tracking.register_as!r}: {type(task).__name__} logs its model as plain "
            "files, not as an MLflow model that can be registered; unset tracking.register_as"
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(task: Task, cfg: EngineConfig, resume: str | None = None) -> RunResult:
    """Build a `Trainer` and train: what `python -m pretrain` / `python -m finetune` do."""
    return Trainer(task, cfg, resume).train()
