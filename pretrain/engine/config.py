"""Typed configuration: dataclass trees, YAML files, `key.sub=value` overrides, strict validation.

The loader works on ANY dataclass tree: an engine config is a dataclass whose sections include the
engine's own (`train`, `optim`, `deepspeed`, `checkpoint`, `tracking`, `data`; see `EngineConfig`) plus
whatever a task adds (pretraining adds `model` and `mask`; fine-tuning adds its own). Every error names
the key and the fix, and all of them happen before any process group starts.

Fields marked `resume=True` in their metadata (or inside a section so marked) form the *resume
signature*: a checkpoint from a run whose signature differs is refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key, value or combination is invalid; the message names the key and the fix."""


def resume_key(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A field that must match between a checkpoint and the run resuming from it."""
    return field(default=default, metadata={"resume": True}, **kw)


def resume_section(factory: Any) -> Any:
    """A whole section (every leaf under it) that must match on resume, e.g. the model architecture."""
    return field(default_factory=factory, metadata={"resume": True})


# ------------------------------------------------------------------------------------------- sections


@dataclass
class TrainConfig:
    """Loop length and batch geometry. `global_batch_size` = micro × world size × grad accumulation."""

    run_dir: str = "runs/default"  # checkpoints, config.yaml, metrics.jsonl; the same path on every node
    steps: int | None = None  # optimizer steps; exactly one of steps / epochs
    epochs: float | None = None
    stop_at: int | None = (
        None  # end THIS job at that step with a checkpoint (job time slots); schedule unchanged
    )
    global_batch_size: int = resume_key(8)
    micro_batch_size: int = resume_key(8)  # per rank per forward
    seed: int = resume_key(0)
    log_every: int = 1
    eval_every: int = 0  # steps; 0 = only at the end (when a val split exists)
    eval_batches: int = 0  # per rank; 0 = the whole val split
    visualize_every: int = 0  # steps; 0 = off. The task renders, the engine logs the files.
    max_consecutive_nonfinite: int = 5  # stop the run after this many non-finite losses in a row
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class OptimConfig:
    """AdamW + linear warmup + cosine, per step. `lr` wins over `base_lr` × global batch / base_batch_size."""

    lr: float | None = None
    base_lr: float = 1.5e-4
    base_batch_size: int = 256  # linear scaling rule reference (VideoMAE: 256)
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    layer_decay: float = resume_key(1.0)  # <1: layer-wise LR decay from the head to the embeddings
    warmup_steps: int | None = None  # exactly one of warmup_steps / warmup_epochs (or neither: 0)
    warmup_epochs: float | None = None
    grad_clip: float = 0.0  # 0 = off
    fused: bool | None = None  # torch AdamW fused kernel; None = on CUDA


@dataclass
class DeepSpeedSection:
    """What goes into the generated DeepSpeed JSON (see `deepspeed_config`)."""

    zero_stage: int = resume_key(2)
    bf16: bool = resume_key(False)
    fp16: bool = resume_key(False)
    pipeline_stages: int = 1  # DeepSpeed pipeline parallelism is not used by tubelet models; kept to refuse
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    offload_optimizer: Literal["none", "cpu"] = "none"
    fp16_initial_scale_power: int = 16
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU


@dataclass
class CheckpointConfig:
    every: int = 0  # steps; 0 = only on preemption and at the end
    keep_last: int = 2
    save_final: bool = True


@dataclass
class TrackingConfig:
    enabled: bool = True  # MLflow (metrics.jsonl is always written)
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/../mlflow.db
    experiment: str = "tubelet"
    run_name: str | None = None  # None: the run directory's name
    peak_tflops: float | None = None  # per device; None: table lookup (H100/H200/A100), NaN on CPU
    warn_every: int = 20  # warn once per this many failed MLflow calls
    log_model: bool = True  # export the final model directory and log it as an artifact


@dataclass
class DataConfig:
    """Where the shards are and how to read them; *what* to sample (frames, size) comes from the task."""

    shards: str | None = None  # shard folder (manifest.json); None only with backend=synthetic
    backend: Literal["auto", "dali", "pyav", "synthetic"] = resume_key("auto")
    train_split: str = resume_key("train")
    val_split: str | None = "val"  # None or a split absent from the manifest: no evaluation
    num_workers: int = 2
    max_skip_fraction: float = 0.01
    synthetic_size: int = 256  # clips per epoch for backend=synthetic


@dataclass
class EngineConfig:
    """The engine's sections. A stage subclasses it and adds its own sections (model, mask, peft, ...)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self, world_size: int = 1) -> None:
        """Impossible combinations; subclasses extend it (call super) for their sections."""
        validate_engine(self, world_size)


# ------------------------------------------------------------------------------------ loading & types


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert: int→float, list→tuple) `value` against type hint `tp`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}{extra}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {type(value).__name__} {value!r}")
        return build_dataclass(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _unknown(key: str, valid: list[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = (
        f" (did you mean {prefix}{close[0]}?)"
        if close
        else f"; valid keys under {prefix or 'the top level'}: {valid}"
    )
    return ConfigError(f"unknown key {prefix}{key}{hint}")


def build_dataclass(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """`cls(**data)` recursively, with every key checked against the tree and every value typed."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(key, sorted(fields), prefix)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from e


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["a.b=1e-3", "c=[1,2]"]` → nested dict; values parsed as YAML (so 1e-3, true, null, [1,2] work)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=50)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        value = _fix_yaml_numbers(yaml.safe_load(raw)) if raw.strip() else ""
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is set to a value and used as a section")
        node[parts[-1]] = value
    return out


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _fix_yaml_numbers(node: Any) -> Any:
    """YAML 1.1 loads `1e-3` (no dot, no exponent sign) as a string: turn such strings into floats."""
    if isinstance(node, dict):
        return {k: _fix_yaml_numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_numbers(v) for v in node]
    if isinstance(node, str) and "e" in node.lower() and _FLOAT_RE.match(node):
        return float(node)
    return node


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls` ← YAML file ← dotlist overrides; strict keys and types throughout."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file")
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        data = _fix_yaml_numbers(loaded)
    data = deep_merge(data, parse_overrides(overrides or []))
    return build_dataclass(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON/YAML-able dict (tuples as lists)."""

    def conv(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        return x

    return conv(dataclasses.asdict(cfg))


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
            out.update(flatten({key: to_dict_value(value)}))
    return out


def to_dict_value(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    return v


def signature_hash(signature: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:16]


def signature_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    missing = object()
    return [
        f"{k}: checkpoint {saved.get(k, '<absent>')!r} vs now {current.get(k, '<absent>')!r}"
        for k in keys
        if saved.get(k, missing) != current.get(k, missing)
    ]


# ---------------------------------------------------------------------------------------- validation


def grad_accum_steps(cfg: EngineConfig, world_size: int) -> int:
    per_step = cfg.train.micro_batch_size * world_size
    return cfg.train.global_batch_size // per_step


def validate_engine(cfg: EngineConfig, world_size: int) -> None:
    t, o, ds, ck, d = cfg.train, cfg.optim, cfg.deepspeed, cfg.checkpoint, cfg.data
    if (t.steps is None) == (t.epochs is None):
        raise ConfigError("set exactly one of train.steps and train.epochs (e.g. train.steps=100)")
    if t.steps is not None and t.steps < 1:
        raise ConfigError(f"train.steps must be >= 1, got {t.steps}")
    if t.epochs is not None and t.epochs <= 0:
        raise ConfigError(f"train.epochs must be > 0, got {t.epochs}")
    if t.stop_at is not None and t.stop_at < 1:
        raise ConfigError(f"train.stop_at must be >= 1 (a global step), got {t.stop_at}")
    if t.micro_batch_size < 1:
        raise ConfigError(f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    if t.global_batch_size % (t.micro_batch_size * world_size):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
            f"{t.micro_batch_size} × world size {world_size}; set train.global_batch_size to a multiple of "
            f"{t.micro_batch_size * world_size} (gradient accumulation = global / (micro × world))"
        )
    for name in ("log_every",):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1")
    for name in ("eval_every", "eval_batches", "visualize_every"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0 (0 = off)")
    if t.max_consecutive_nonfinite < 1:
        raise ConfigError("train.max_consecutive_nonfinite must be >= 1")
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds.zero_stage}")
    if ds.bf16 and ds.fp16:
        raise ConfigError("deepspeed.bf16 and deepspeed.fp16 are both true: pick one (or neither for fp32)")
    if ds.pipeline_stages < 1:
        raise ConfigError("deepspeed.pipeline_stages must be >= 1")
    if ds.pipeline_stages > 1 and ds.zero_stage >= 2:
        raise ConfigError(
            f"deepspeed.zero_stage={ds.zero_stage} with deepspeed.pipeline_stages={ds.pipeline_stages}: "
            "DeepSpeed pipeline parallelism supports ZeRO stage 0 or 1 only; set deepspeed.zero_stage=1 "
            "or deepspeed.pipeline_stages=1"
        )
    if ds.pipeline_stages > 1:
        raise ConfigError(
            "deepspeed.pipeline_stages>1: tubelet models are not pipeline-partitioned; use ZeRO-3 "
            "(deepspeed.zero_stage=3) to shard large models instead"
        )
    if ds.offload_optimizer != "none" and ds.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
    if o.lr is not None and o.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if o.base_lr <= 0 or o.base_batch_size < 1:
        raise ConfigError("optim.base_lr must be > 0 and optim.base_batch_size >= 1")
    if o.min_lr < 0:
        raise ConfigError("optim.min_lr must be >= 0")
    if not 0 < o.layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay must be in (0, 1], got {o.layer_decay}")
    if o.warmup_steps is not None and o.warmup_epochs is not None:
        raise ConfigError("set at most one of optim.warmup_steps and optim.warmup_epochs")
    if t.steps is not None and o.warmup_steps is not None and o.warmup_steps >= t.steps:
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} >= train.steps={t.steps}: warmup must end before training does"
        )
    if o.grad_clip < 0 or o.weight_decay < 0:
        raise ConfigError("optim.grad_clip and optim.weight_decay must be >= 0")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be in [0, 1), got {list(o.betas)}")
    if ck.keep_last < 1:
        raise ConfigError("checkpoint.keep_last must be >= 1")
    if ck.every < 0:
        raise ConfigError("checkpoint.every must be >= 0 (0 = only at the end and on preemption)")
    if d.shards is None and d.backend != "synthetic":
        raise ConfigError("data.shards is not set: point it at a shard folder or set data.backend=synthetic")
    if not 0 <= d.max_skip_fraction <= 1:
        raise ConfigError("data.max_skip_fraction must be in [0, 1]")


def peak_lr(cfg: EngineConfig) -> float:
    """`optim.lr`, else the linear scaling rule: base_lr × global batch / base_batch_size."""
    o = cfg.optim
    return o.lr if o.lr is not None else o.base_lr * cfg.train.global_batch_size / o.base_batch_size


def deepspeed_config(cfg: EngineConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON, generated from the typed config (never hand-written).

    The optimizer and scheduler are built by the engine and passed to `deepspeed.initialize`, so there is
    no "optimizer"/"scheduler" section; `zero_allow_untested_optimizer` lets ZeRO wrap torch's AdamW.
    """
    t, ds = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(
            overlap_comm=ds.overlap_comm,
            contiguous_gradients=ds.contiguous_gradients,
            reduce_bucket_size=ds.reduce_bucket_size,
        )
    if ds.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    if ds.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer}
    out: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.bf16},
        "fp16": {"enabled": ds.fp16, "loss_scale": 0, "initial_scale_power": ds.fp16_initial_scale_power},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # our own logging; silence DeepSpeed's
        "wall_clock_breakdown": False,
    }
    return out
