"""The engine's config sections (typed dataclasses) and the resume signature they carry.

A stage's config is a dataclass that extends `EngineConfig` with its own sections (pretraining adds
`data`, `model`, `mask`, `clip`; fine-tuning its own). Fields marked `resume=True` in their metadata (or
inside a section so marked) form the *resume signature*: a checkpoint whose signature differs is refused.
What may change on resume is left out on purpose: the number of ranks, `train.micro_batch_size` and
`deepspeed.zero_stage` (1-3) are re-partitioned (`checkpoint.plan_resume` says what that costs).
The engine's sections say nothing about videos: what to read and how is the task's business.
Each section checks itself (`check`): every message names the key (`section.field`) and the fix; all of it
runs before any process starts. A stage validates its own sections in its config's `validate` after
calling the engine's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A config key, value or combination is invalid; the message names the key and the fix."""


def require(ok: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `ok`: the one-line form every section check uses."""
    if not ok:
        raise ConfigError(message)


def resume_key(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A field that must match between a checkpoint and the run resuming from it."""
    return field(default=default, metadata={"resume": True}, **kw)


def resume_section(factory: Any) -> Any:
    """A whole section (every leaf under it) that must match on resume, e.g. the model architecture."""
    return field(default_factory=factory, metadata={"resume": True})


@dataclass
class TrainConfig:
    """Loop length and batch geometry. `global_batch_size` = micro × world size × grad accumulation."""

    run_dir: str = "runs/default"  # checkpoints, config.yaml, metrics.jsonl: a path every node sees, or a URL
    steps: int | None = None  # optimizer steps; exactly one of steps / epochs
    epochs: float | None = None  # passes over the train split instead of steps (fractions allowed)
    stop_at: int | None = (
        None  # end THIS job at that step with a checkpoint (job time slots); schedule unchanged
    )
    global_batch_size: int = resume_key(8)  # clips per optimizer step, over all ranks and accumulation steps
    micro_batch_size: int = 8  # per rank per forward; may change on resume (another world size)
    seed: int = resume_key(0)  # every random draw (init, crops, masks, mixup) is keyed by it
    log_every: int = 1  # steps between metric lines (metrics.jsonl, MLflow, the bar)
    eval_every: int = 0  # steps; 0 = only at the end (when the task has a val loader)
    eval_batches: int = 0  # per rank; 0 = the whole val split
    visualize_every: int = 0  # steps; 0 = off. The task renders, the engine logs the files.
    max_consecutive_nonfinite: int = 5  # stop the run after this many skipped steps in a row
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when torch sees it, else CPU

    def check(self, world_size: int) -> None:
        require(
            (self.steps is None) != (self.epochs is None),
            "set exactly one of train.steps and train.epochs (e.g. train.steps=100)",
        )
        require(self.steps is None or self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        require(self.epochs is None or self.epochs > 0, f"train.epochs must be > 0, got {self.epochs}")
        require(
            self.stop_at is None or self.stop_at >= 1,
            f"train.stop_at must be >= 1 (a global step), got {self.stop_at}",
        )
        require(
            self.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {self.micro_batch_size}"
        )
        require(
            self.global_batch_size >= 1, f"train.global_batch_size must be >= 1, got {self.global_batch_size}"
        )
        per_step = self.micro_batch_size * world_size
        require(
            self.global_batch_size % per_step == 0 and self.global_batch_size > 0,
            f"train.global_batch_size={self.global_batch_size} is not divisible by train.micro_batch_size="
            f"{self.micro_batch_size} × world size {world_size}; set train.global_batch_size to a multiple of "
            f"{per_step} (gradient accumulation = global / (micro × world))",
        )
        require(self.log_every >= 1, "train.log_every must be >= 1")
        for name in ("eval_every", "eval_batches", "visualize_every"):
            require(getattr(self, name) >= 0, f"train.{name} must be >= 0 (0 = off)")
        require(self.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite must be >= 1")


@dataclass
class OptimConfig:
    """AdamW + linear warmup + cosine, per step. `lr` wins over `base_lr` × global batch / base_batch_size."""

    lr: float | None = None  # peak learning rate; None: base_lr × global_batch_size / base_batch_size
    base_lr: float = 1.5e-4  # the peak LR at base_batch_size (linear scaling rule)
    base_batch_size: int = 256  # linear scaling rule reference (VideoMAE: 256)
    min_lr: float = 0.0  # where the cosine ends (clamped to the peak)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW
    eps: float = 1e-8  # AdamW
    weight_decay: float = 0.05  # decoupled (AdamW); none on biases, norms, embeddings and tokens
    layer_decay: float = resume_key(1.0)  # <1: layer-wise LR decay from the head to the embeddings
    warmup_steps: int | None = None  # exactly one of warmup_steps / warmup_epochs (or neither: 0)
    warmup_epochs: float | None = None  # linear warmup in passes over the train split
    grad_clip: float = 0.0  # 0 = off
    fused: bool | None = None  # torch AdamW fused kernel; None = on CUDA

    def check(self, t: TrainConfig) -> None:
        require(self.lr is None or self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        require(
            self.base_lr > 0 and self.base_batch_size >= 1,
            "optim.base_lr must be > 0 and optim.base_batch_size >= 1",
        )
        require(self.min_lr >= 0, "optim.min_lr must be >= 0")
        require(
            (self.warmup_steps or 0) >= 0 and (self.warmup_epochs or 0) >= 0,
            "optim.warmup_steps and optim.warmup_epochs must be >= 0",
        )
        require(0 < self.layer_decay <= 1, f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")
        require(
            self.warmup_steps is None or self.warmup_epochs is None,
            "set at most one of optim.warmup_steps and optim.warmup_epochs",
        )
        require(
            t.steps is None or self.warmup_steps is None or self.warmup_steps < t.steps,
            f"optim.warmup_steps={self.warmup_steps} >= train.steps={t.steps}: warmup must end before training does",
        )
        require(
            self.grad_clip >= 0 and self.weight_decay >= 0,
            "optim.grad_clip and optim.weight_decay must be >= 0",
        )
        require(all(0 <= b < 1 for b in self.betas), f"optim.betas must be in [0, 1), got {list(self.betas)}")


@dataclass
class DeepSpeedSection:
    """What goes into the generated DeepSpeed JSON (see `deepspeed_json.deepspeed_config`)."""

    zero_stage: int = 2  # may change on resume between 1, 2 and 3 (universal checkpoint)
    bf16: bool = resume_key(False)  # bf16 mixed precision (GPU)
    fp16: bool = resume_key(False)  # fp16 with loss scaling (GPU); neither: fp32
    overlap_comm: bool = True  # ZeRO: overlap gradient reduction with the backward pass
    contiguous_gradients: bool = True  # ZeRO: copy gradients into one buffer as they are produced
    reduce_bucket_size: int = 50_000_000  # ZeRO: elements reduced per bucket
    allgather_bucket_size: int = 50_000_000  # ZeRO 1-2: elements gathered per bucket
    stage3_prefetch_bucket_size: int = 50_000_000  # ZeRO-3: parameter elements prefetched ahead
    stage3_param_persistence_threshold: int = 100_000  # ZeRO-3: parameters this small stay unpartitioned
    # cpu: ZeRO-Offload (optimizer state in host memory; zero_stage >= 1)
    offload_optimizer: Literal["none", "cpu"] = "none"
    fp16_initial_scale_power: int = 16  # fp16: the first loss scale is 2^this
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU

    def check(self) -> None:
        require(
            self.zero_stage in (0, 1, 2, 3),
            f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}",
        )
        require(
            not (self.bf16 and self.fp16),
            "deepspeed.bf16 and deepspeed.fp16 are both true: pick one (or neither for fp32)",
        )
        require(
            self.offload_optimizer == "none" or self.zero_stage >= 1,
            "deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1",
        )


@dataclass
class CheckpointConfig:
    every: int = 0  # steps; 0 = only on preemption and at the end
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted (in the store too)
    save_final: bool = True  # also checkpoint the last step (off: only `every` and preemption)

    def check(self) -> None:
        require(self.keep_last >= 1, "checkpoint.keep_last must be >= 1")
        require(self.every >= 0, "checkpoint.every must be >= 0 (0 = only at the end and on preemption)")


def _db_path(folder_uri: str) -> str:
    """An absolute path for a sqlite file inside the folder a folder-store URI names."""
    path = folder_uri.removeprefix("file://").removeprefix("file:")
    return os.path.join(os.path.abspath(path), "mlflow.db")


@dataclass
class TrackingConfig:
    enabled: bool = True  # MLflow (metrics.jsonl is always written)
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/../mlflow.db
    experiment: str = "tubelet"  # the MLflow experiment the run goes under
    run_name: str | None = None  # None: the run directory's name
    peak_tflops: float | None = None  # per device; None: table lookup (H100/H200/A100), NaN on CPU
    warn_every: int = 20  # warn once per this many failed MLflow calls
    log_model: bool = True  # export the final model directory and log it (Task.log_model)
    parent_run_id: str | None = None  # nest this run under another (continual learning: one per experience)
    # register the run's model as a new version of this registered model (tasks that log an MLflow model)
    register_as: str | None = None

    def given_uri(self) -> str | None:
        """The store the user named (`uri`, else $MLFLOW_TRACKING_URI); None: the default beside the run."""
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or None

    def check(self) -> None:
        uri = self.given_uri() or ""
        key = "tracking.uri" if self.uri else "MLFLOW_TRACKING_URI"
        bare_path = bool(uri) and "://" not in uri and not uri.startswith("databricks")
        folder_store = uri.startswith("file:") or bare_path
        allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true")
        require(
            not (self.enabled and folder_store and not allowed),
            f"{key}={uri}: a folder store, which MLflow 3 refuses (its file store is deprecated; the run would "
            f"go untracked): give a database, e.g. tracking.uri=sqlite:///{_db_path(uri)} (then `mlflow ui "
            "--backend-store-uri` with the same URI), or a server's http:// URL; MLFLOW_ALLOW_FILE_STORE=true "
            "keeps the folder store",
        )
        require(
            not self.register_as or (self.enabled and self.log_model),
            f"tracking.register_as={self.register_as!r} needs tracking.enabled=true and tracking.log_model=true "
            "(the registered version is the run's logged model)",
        )


@dataclass
class EngineConfig:
    """The engine's sections. A stage subclasses it and adds its own (data, model, mask, finetune, ...)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self, world_size: int = 1) -> None:
        """Impossible combinations, section by section; a stage extends it (calling super) for its own."""
        self.train.check(world_size)
        self.optim.check(self.train)
        self.deepspeed.check()
        if self.deepspeed.fp16:  # DeepSpeed's own refusal came as a ValueError traceback from initialize
            require(
                uses_cuda(self.train.device),
                "deepspeed.fp16=true needs a GPU (DeepSpeed's CPU accelerator has no fp16): on CPU use "
                "deepspeed.bf16=true or fp32",
            )
        self.checkpoint.check()
        self.tracking.check()


def uses_cuda(device: str) -> bool:
    """Whether `train.device` (auto / cpu / cuda) means CUDA here: auto takes it when there is one."""
    import torch

    return torch.cuda.is_available() if device == "auto" else device == "cuda"


def grad_accum_steps(cfg: EngineConfig, world_size: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * world_size)


def peak_lr(cfg: EngineConfig) -> float:
    """`optim.lr`, else the linear scaling rule: base_lr × global batch / base_batch_size."""
    o = cfg.optim
    return o.lr if o.lr is not None else o.base_lr * cfg.train.global_batch_size / o.base_batch_size


# ------------------------------------------------------------------------------------ resume signature


def resume_signature(cfg: Any, prefix: str = "", all_leaves: bool = False) -> dict[str, Any]:
    """Flat `key -> value` of every field marked `resume` (recursively); what a resume must match."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        marked = all_leaves or bool(f.metadata.get("resume"))
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            out.update(resume_signature(value, key + ".", marked))
        elif marked:
            out.update(_flat({key: list(value) if isinstance(value, tuple) else value}))
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def signature_hash(signature: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:16]


def signature_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys of the current signature whose values differ from the checkpoint's (or that it lacks). A key only
    the checkpoint has is no longer one that must match (e.g. `train.micro_batch_size` in older runs)."""
    keys = sorted(current)
    missing = object()
    return [
        f"{k}: checkpoint {saved.get(k, '<absent>')!r} vs now {current.get(k, '<absent>')!r}"
        for k in keys
        if saved.get(k, missing) != current.get(k, missing)
    ]
