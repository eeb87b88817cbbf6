"""Typed configuration: `schema` (the engine's sections, each checking itself, and the resume signature),
`loading` (YAML + overrides, strict types), `deepspeed_json` (the generated DeepSpeed config), `describe`
(`--print-config`: the resolved config with each key's meaning)."""

from .deepspeed_json import deepspeed_config
from .loading import build_dataclass, flatten, load_config, parse_overrides, to_dict, to_yaml
from .schema import (
    CheckpointConfig,
    ConfigError,
    DeepSpeedSection,
    EngineConfig,
    OptimConfig,
    TrackingConfig,
    TrainConfig,
    grad_accum_steps,
    peak_lr,
    require,
    resume_key,
    resume_section,
    resume_signature,
    signature_diff,
    signature_hash,
    uses_cuda,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DeepSpeedSection",
    "EngineConfig",
    "OptimConfig",
    "TrackingConfig",
    "TrainConfig",
    "build_dataclass",
    "deepspeed_config",
    "flatten",
    "grad_accum_steps",
    "load_config",
    "parse_overrides",
    "peak_lr",
    "require",
    "resume_key",
    "resume_section",
    "resume_signature",
    "signature_diff",
    "signature_hash",
    "to_dict",
    "to_yaml",
    "uses_cuda",
]
