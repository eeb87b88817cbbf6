"""`python -m finetune tune --config FT.yaml --space SPACE.yaml [--resume auto] [key=value ...]`: the driver.

A study lives in `--dir` (default `runs/tune_<space name>`): Ray Tune's own state (`STUDY/ray/`, what
`Tuner.restore` resumes: finished trials are never run again), one run directory per trial, the study's MLflow
run id (`study.json`), and its results: `trials.csv`, `curves.png`, `params.png`, `best.yaml` (the winning
recipe, runnable as it is with `python -m finetune --config best.yaml`), and the best model registered as a
version of `study.register_as`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from finetune.config import head_kind
from finetune.heads import make_head
from finetune.tune.space import SearchSpace, check_against, load_space
from finetune.tune.trial import TrialPlan, config_class, run_trial
from pretrain.engine import ConfigError, load_config

STUDY_FILE = "study.json"


def _max_evaluations(cfg: Any, continual: bool) -> int:
    """Evaluations of a whole trial (ASHA's max_t), from the base config: a continual run reports once per
    experience, a fine-tune at every `train.eval_every` steps."""
    if continual:
        from finetune.continual.config import plan_experiences

        cfg.validate()
        return len(plan_experiences(cfg))
    every = cfg.train.eval_every
    if not every:
        raise ConfigError("train.eval_every must be > 0: a trial reports its metric at each evaluation")
    if not cfg.data.val_split:
        raise ConfigError("data.val_split must name a split: trials are compared on their validation metric")
    return max(1, cfg.train.steps // every)


def scheduler(space: SearchSpace, max_t: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = space.study
    if s.scheduler == "asha":
        grace = min(s.grace_period, max_t)
        return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=grace,
                             reduction_factor=s.reduction_factor)  # fmt: skip
    if s.scheduler == "pbt":
        mutations = {
            d.key: d.tune_domain() for d in space.dimensions if d.kind in ("loguniform", "uniform", "choice")
        }
        if not mutations:
            raise ConfigError("study.scheduler=pbt needs a loguniform / uniform / choice key to perturb")
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=s.perturbation_interval,
                                       hyperparam_mutations=mutations)  # fmt: skip
    return FIFOScheduler()


def searcher(space: SearchSpace) -> Any:
    s = space.study
    if s.search != "optuna":
        return None
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError(
            "study.search=optuna needs optuna: TUBELET_EXTRAS=dev,tune bash launch/setup.sh"
        ) from None
    if any(d.kind == "grid" for d in space.dimensions):
        raise ConfigError("study.search=optuna takes no grid keys: use choice")
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=metric_key(space), mode=s.mode, seed=s.seed)


def is_continual(config: str) -> bool:
    """A config with a `continual` section makes every trial a `finetune continual` run."""
    from pretrain.engine.config.loading import read_yaml

    data = read_yaml(config)
    return isinstance(data, dict) and "continual" in data


def metric_key(space: SearchSpace) -> str:
    return space.study.metric.replace("/", "_")


def parent_run(root: Path, uri: str, experiment: str, name: str, params: dict[str, Any]) -> str:
    """The study's MLflow run (created once, its id kept in STUDY/study.json for a resumed study)."""
    from mlflow import MlflowClient

    saved = root / STUDY_FILE
    if saved.is_file():
        info = json.loads(saved.read_text())
        if info.get("uri") == uri:
            return str(info["run_id"])
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment(experiment, artifact_location=(root / "mlartifacts").as_uri())
    )
    run_id = client.create_run(exp_id, run_name=name).info.run_id
    for k, v in params.items():
        client.log_param(run_id, k, str(v)[:500])
    saved.write_text(json.dumps({"uri": uri, "run_id": run_id}) + "\n")
    return run_id


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    """Check everything, then fit (or restore and finish) the study; write its results."""
    from finetune.tune.report import write_results
    from pretrain.engine.tracking import resolve_uri

    space = load_space(args.space)
    config = str(Path(args.config).resolve())
    continual = is_continual(config)
    cls = config_class(continual)
    base = load_config(cls, config, args.overrides)
    head = make_head(head_kind(base))
    if space.study.metric is None:  # the head's primary metric: val/top1, val/map, val/frame_acc
        space.study.metric = "continual/average_accuracy" if continual else f"val/{head.primary}"
    evaluated = [f"val/{n}" for n in head.metric_names]  # a typo here ran every trial, then failed
    if not continual and space.study.metric.startswith("val/") and space.study.metric not in evaluated:
        raise ConfigError(
            f"study.metric={space.study.metric!r}: a {head.kind} fine-tune's evaluation logs {', '.join(evaluated)}"
        )
    check_against(space, cls, config, args.overrides)
    max_t = _max_evaluations(base, continual)
    import ray
    from ray import tune

    root = Path(args.dir or f"runs/tune_{Path(args.space).stem}").resolve()
    if (
        (root / "ray").is_dir()
        and args.resume != "auto"
        and tune.Tuner.can_restore(str(root / "ray" / "study"))
    ):
        raise ConfigError(f"{root} already holds a study: pass --resume auto to finish it, or --dir NEW")
    root.mkdir(parents=True, exist_ok=True)
    uri = resolve_uri(base.tracking, root / "x")
    params = {
        "space": Path(args.space).name,
        **{f"space.{d.key}": f"{d.kind}{list(d.values)}" for d in space.dimensions},
    }
    run_id = parent_run(root, uri, base.tracking.experiment, f"tune {Path(args.space).stem}", params)
    env = tuple(
        (k, v) for k, v in os.environ.items() if k in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "TQDM_DISABLE")
    )
    plan = TrialPlan(
        config,
        tuple(args.overrides),
        uri,
        base.tracking.experiment,
        run_id,
        space.study.metric,
        str(root),
        env,
        continual,
    )
    if not ray.is_initialized():
        ray.init(address=args.ray_address, num_cpus=None if args.ray_address else os.cpu_count(),
                 include_dashboard=False, log_to_driver=False)  # fmt: skip
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=plan, pbt=space.study.scheduler == "pbt"),
        {"cpu": space.study.cpus_per_trial},
    )
    path = str(root / "ray" / "study")
    if args.resume == "auto" and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                metric=metric_key(space), mode=space.study.mode, num_samples=space.study.num_samples,
                max_concurrent_trials=space.study.max_concurrent_trials, scheduler=scheduler(space, max_t),
                search_alg=searcher(space),
            ),
            run_config=tune.RunConfig(name="study", storage_path=str(root / "ray"), verbose=1),
        )  # fmt: skip
    grid = tuner.fit()
    return write_results(grid, space, base, plan, root, max_t, args)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m finetune tune",
        description="Hyperparameter search on Ray Tune: trials are fine-tunes on the engine, nested MLflow runs",
    )
    p.add_argument("--config", required=True, help="the fine-tuning config every trial starts from")
    p.add_argument("--space", required=True, help="SPACE.yaml: `study` settings and the `space` of keys")
    p.add_argument("--dir", default=None, help="the study folder (default runs/tune_<space file name>)")
    p.add_argument("--resume", choices=["auto"], default=None, help="finish a stopped study")
    p.add_argument(
        "--ray-address", default=None, help="HOST:PORT of an existing Ray cluster (default: local)"
    )
    p.add_argument("overrides", nargs="*", help="key=value for every trial (e.g. data.shards=S)")
    a = p.parse_intermixed_args(argv)
    try:
        result = run_study(a)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # no trial reported the metric: the trial logs say why
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"[tune] best trial {result['best']['trial']}: {result['metric']} {result['best']['value']:.4f} "
          f"with {result['best']['params']}")  # fmt: skip
    print(f"[tune] {result['best_yaml']}  {result['trials_csv']}  {result['curves']}")
    if result.get("registered"):
        print(f"[tune] registered {result['registered']}")
    return 0
