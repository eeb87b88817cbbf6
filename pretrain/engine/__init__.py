"""The task-agnostic training engine both stages run on: `run(task, cfg)`.

A stage defines a config dataclass that extends `EngineConfig` with its own sections and a `Task`
(model, loss, evaluation); the engine does DeepSpeed, the loop, checkpoints, tracking and export.
"""

from .config import ConfigError, EngineConfig, load_config, resume_key, resume_section
from .task import EvalOutcome, StepOutput, Task, TaskContext
from .trainer import RunResult, TrainingStopped, export, run

__all__ = [
    "ConfigError",
    "EngineConfig",
    "EvalOutcome",
    "RunResult",
    "StepOutput",
    "Task",
    "TaskContext",
    "TrainingStopped",
    "export",
    "load_config",
    "resume_key",
    "resume_section",
    "run",
]
