"""`SPACE.yaml`: which config keys a study varies, how, and how the study runs.

    study:
      num_samples: 8             # trials (grid keys multiply it, as in Ray Tune)
      max_concurrent_trials: 2
      scheduler: asha            # asha (early stopping) | pbt (perturbs lr / weight decay) | fifo (none)
      search: random             # random | optuna (TPE; the `tune` extra)
      metric: val/top1           # any value a run logs at an evaluation (continual: continual/average_accuracy)
      mode: max
      grace_period: 1            # evaluations before ASHA may stop a trial
      reduction_factor: 2
      cpus_per_trial: 1
      register_as: null          # register the best trial's model under this name
    space:
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
      finetune.method: {choice: [full, lora]}
      finetune.lora_rank: {choice: [4, 8, 16]}
      optim.layer_decay: {uniform: [0.6, 0.9]}
      augment.mixup: {grid: [0.0, 0.8]}

Every key is checked against the fine-tuning config before any trial starts (by building the config with a
value of its range); errors name `space.KEY` or `study.KEY`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pretrain.engine import ConfigError, require

KINDS = ("loguniform", "uniform", "choice", "grid")


@dataclass
class StudySection:
    num_samples: int = 8
    max_concurrent_trials: int = 2
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"
    search: Literal["random", "optuna"] = "random"
    metric: str | None = None  # default: val/top1 (continual/average_accuracy for a continual config)
    mode: Literal["max", "min"] = "max"
    grace_period: int = 1
    reduction_factor: int = 2
    perturbation_interval: int = 2  # pbt: evaluations between exploit/explore
    cpus_per_trial: float = 1.0
    seed: int = 0
    register_as: str | None = None

    def check(self) -> None:
        require(self.num_samples >= 1, "study.num_samples must be >= 1")
        require(self.max_concurrent_trials >= 1, "study.max_concurrent_trials must be >= 1")
        require(self.grace_period >= 1, "study.grace_period must be >= 1 (evaluations)")
        require(self.reduction_factor >= 2, "study.reduction_factor must be >= 2")
        require(self.perturbation_interval >= 1, "study.perturbation_interval must be >= 1")
        require(self.cpus_per_trial > 0, "study.cpus_per_trial must be > 0")


@dataclass(frozen=True)
class Dimension:
    key: str  # a config key, e.g. optim.lr
    kind: str  # one of KINDS
    values: tuple[Any, ...]  # (low, high) for the ranges; the options for choice / grid

    def representative(self) -> Any:
        """A value of the range, to check the key against the config."""
        if self.kind == "loguniform":
            return math.sqrt(self.values[0] * self.values[1])
        if self.kind == "uniform":
            return (self.values[0] + self.values[1]) / 2
        return self.values[0]

    def tune_domain(self) -> Any:
        from ray import tune

        low, high = (*self.values, None, None)[:2]
        return {
            "loguniform": lambda: tune.loguniform(low, high),
            "uniform": lambda: tune.uniform(low, high),
            "choice": lambda: tune.choice(list(self.values)),
            "grid": lambda: tune.grid_search(list(self.values)),
        }[self.kind]()


@dataclass
class SearchSpace:
    study: StudySection = field(default_factory=StudySection)
    dimensions: list[Dimension] = field(default_factory=list)

    def param_space(self) -> dict[str, Any]:
        return {d.key: d.tune_domain() for d in self.dimensions}


def parse_dimension(key: str, spec: Any) -> Dimension:
    """`{kind: values}` → a Dimension; errors name `space.KEY`."""
    where = f"space.{key}"
    require(
        isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in KINDS,
        f"{where}: give one of {{{', '.join(f'{k}: ...' for k in KINDS)}}}, got {spec!r}",
    )
    kind, values = next(iter(spec.items()))
    require(isinstance(values, list), f"{where}.{kind}: give a list, got {values!r}")
    if kind in ("choice", "grid"):
        require(len(values) > 0, f"{where}.{kind} is empty: give at least one value")
        return Dimension(key, kind, tuple(values))
    require(
        len(values) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values),
        f"{where}.{kind}: give [low, high] numbers, got {values!r}",
    )
    low, high = float(values[0]), float(values[1])
    require(low < high, f"{where}.{kind}: low {low:g} must be below high {high:g}")
    if kind == "loguniform":
        require(low > 0, f"{where}.loguniform: bounds must be > 0 in log space, got [{low:g}, {high:g}]")
    return Dimension(key, kind, (low, high))


def load_space(path: str | Path) -> SearchSpace:
    """The YAML file → a SearchSpace (study settings checked; keys not yet checked against a config)."""
    from pretrain.engine.config.loading import build_dataclass, read_yaml

    data = read_yaml(path, "--space")
    require(isinstance(data, dict), f"{path}: top level must be a mapping with `study` and `space`")
    unknown = sorted(set(data) - {"study", "space"})
    require(not unknown, f"{path}: unknown sections {unknown} (expected study, space)")
    study = build_dataclass(StudySection, data.get("study") or {}, "study.")
    study.check()
    raw = data.get("space") or {}
    require(isinstance(raw, dict) and raw, f"{path}: `space` must map config keys to ranges (it is empty)")
    return SearchSpace(study, [parse_dimension(k, v) for k, v in raw.items()])


def check_against(space: SearchSpace, config_cls: type, config: str, overrides: list[str]) -> None:
    """Every key exists in the config and takes its values: build the config with each representative value
    (and every option of a choice / grid); the first error names `space.KEY`."""
    from pretrain.engine import load_config

    for d in space.dimensions:
        options = d.values if d.kind in ("choice", "grid") else (d.representative(),)
        for v in options:
            try:
                load_config(config_cls, config, [*overrides, f"{d.key}={yaml.safe_dump(v).strip()}"])
            except ConfigError as e:
                raise ConfigError(f"space.{d.key}={v!r}: {e}") from None
