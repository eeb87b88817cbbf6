"""The task-agnostic training engine both stages run on: `Trainer(task, cfg).train()` (or `run`).

A stage defines a config dataclass that extends `EngineConfig` with its own sections and a `Task`
(model, initial weights, loaders, loss, evaluation, export); the engine does DeepSpeed, the loop,
checkpoints, tracking and export. Layout: `trainer.py` (the loop), `task.py` (the seam), `state.py`,
`metrics.py`, `checkpoint.py`, `optim.py`, `dist.py`, `tracking.py`, `remote.py` (a run directory at a URL),
`config/`, `cli.py`.
"""

from .checkpoint import export
from .config import ConfigError, EngineConfig, load_config, require, resume_key, resume_section
from .state import TrainState, keyed_rng, mix_seed
from .task import Batch, EvalOutcome, Loader, StepOutput, Task, TaskContext
from .trainer import Outcome, RunResult, Trainer, TrainingStopped, run

__all__ = [
    "Batch",
    "ConfigError",
    "EngineConfig",
    "EvalOutcome",
    "Loader",
    "Outcome",
    "RunResult",
    "StepOutput",
    "Task",
    "TaskContext",
    "TrainState",
    "Trainer",
    "TrainingStopped",
    "export",
    "keyed_rng",
    "load_config",
    "mix_seed",
    "require",
    "resume_key",
    "resume_section",
    "run",
]
