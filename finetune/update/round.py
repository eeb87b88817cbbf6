"""`python -m finetune update --config UPDATE.yaml [--resume auto]`: one round of the update loop.

The round is a sequence of steps, each recorded in `WORK_DIR/rounds/ROUND/state.json` when done, so a
crashed or killed round continues where it stopped (`--resume auto`; the fine-tune itself resumes from
its newest DeepSpeed checkpoint) and a finished one is not run twice:

  champion  look up `@champion` (none yet: the config's `init`); copy it into the round; read its lineage
  build     shard the batch into a new shard set, classes in the global order (old ids never move)
  train     continual fine-tune from the champion (finetune/update/train.py, one process per rank)
  evaluate  challenger and champion on the test split of every catalogued set, old and new
  gate      the rules of `gate.*` (gate.py) → promote or refuse, with every number
  register  the challenger (with its lineage) → a new version, alias `challenger`; promoted: `champion`,
            the old one `previous`
  report    `report.json`, the round's MLflow run (parent of the fine-tune and evaluation runs), tags

Everything goes to one MLflow store (`tracking_uri`, else $MLFLOW_TRACKING_URI, else WORK_DIR/mlflow.db).
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.update.catalog import Lineage, ShardSet
from finetune.update.config import UpdateConfig, check_strategy
from finetune.update.gate import Check, Scores, decide
from finetune.update.lock import RoundBusy, round_lock
from finetune.update.train import CONFIG_FILE, PLAN_FILE
from pretrain.engine import ConfigError, load_config
from pretrain.engine.config import to_yaml

STATE_FILE, REPORT_FILE = "state.json", "report.json"
STEPS = ("champion", "build", "train", "evaluate", "gate", "register", "report")
SCRATCH = "scratch"  # init=scratch: a first round from random weights
EXIT_BUSY = 75  # EX_TEMPFAIL: another round holds the lock; try again later (cron-friendly)


@dataclass
class RoundState:
    round: str
    model: str
    videos: str
    store: str
    done: list[str] = field(default_factory=list)
    run_id: str | None = None  # the round's MLflow run
    champion: str | None = None  # the champion's version when the round started
    init: str | None = None  # what the fine-tune starts from
    new_set: dict[str, Any] | None = None
    classes: list[str] = field(default_factory=list)
    build: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)  # {"champion": Scores | None, "challenger": Scores}
    decision: dict[str, Any] | None = None
    version: str | None = None
    promoted: bool | None = None
    started: float = field(default_factory=time.time)

    def save(self, folder: Path) -> None:
        tmp = folder / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        tmp.replace(folder / STATE_FILE)


class Round:
    """One round's steps over its state; `run()` does the ones not done yet."""

    def __init__(self, cfg: UpdateConfig, state: RoundState) -> None:
        self.cfg, self.state = cfg, state
        self.dir = Path(cfg.work_dir) / "rounds" / state.round
        self.dir.mkdir(parents=True, exist_ok=True)
        self.champion_dir = self.dir / "champion" / "model"
        self.model_dir = self.dir / "train" / "model"

    def run(self) -> dict[str, Any]:
        for step in STEPS:
            if step in self.state.done:
                continue
            print(f"[update] {self.state.round}: {step}", flush=True)
            getattr(self, f"step_{step}")()
            self.state.done.append(step)
            self.state.save(self.dir)
        return json.loads((self.dir / REPORT_FILE).read_text())

    # -- steps ----------------------------------------------------------------------------------------
    def step_champion(self) -> None:
        from finetune.registry import alias_version, resolve_model
        from finetune.update.promote import CHAMPION

        s, cfg = self.state, self.cfg
        s.run_id = self.tracker().run_id
        s.champion = alias_version(cfg.model, CHAMPION, s.store)
        if s.champion is not None:
            resolved = resolve_model(f"models:/{cfg.model}/{s.champion}", s.store)
            shutil.rmtree(self.champion_dir, ignore_errors=True)
            shutil.copytree(resolved.model_dir, self.champion_dir)
            s.init = str(self.champion_dir)
        elif cfg.init is None:
            raise ConfigError(
                f"{cfg.model} has no 'champion' in {s.store} yet: set init=DIR (a model, run or pretrained "
                "directory) for the first round"
            )
        else:
            s.init = cfg.init

    @functools.cached_property
    def lineage(self) -> Lineage:
        """What the champion carries (a first round: the init's classes, an empty catalog)."""
        if self.state.champion is not None:
            return Lineage.of_model(self.champion_dir)
        init = Path(self.state.init or "")
        return Lineage.of_model(init) if (init / "config.json").is_file() else Lineage()

    def step_build(self) -> None:
        from data_shards import storage
        from data_shards.build import BuildOptions, build
        from data_shards.inputs import SourceOptions, read_inputs
        from data_shards.plan import class_order

        cfg, s = self.cfg, self.state
        b = cfg.build
        source = SourceOptions(videos=b.videos)
        inputs = read_inputs(cfg.videos, b.format, source)
        labels = inputs.classes or class_order(i.label for i in inputs.items if i.label)
        if not labels:
            raise ConfigError(
                f"videos={cfg.videos}: the batch has no labels (the update loop needs labelled videos)"
            )
        s.classes = self.lineage.class_order(labels)
        out = storage.join(cfg.shards_location, s.round)
        opts = BuildOptions(
            b.val_fraction,
            b.test_fraction,
            b.shard_samples,
            classes=s.classes,
            format=b.format,
            source=source,
        )
        result = build(cfg.videos, out, opts, workers=b.workers, quiet=True)
        _stop_local_ray()
        s.new_set = asdict(ShardSet.of(s.round, str(out), s.round))
        s.build = {"shards": str(out), "accepted": result.accepted, "rejected": result.rejected}
        print(f"[update] batch: {result.accepted} videos accepted, {result.rejected} rejected → {out}")

    def step_train(self) -> None:
        ft = self.train_config()
        (self.dir / CONFIG_FILE).write_text(to_yaml(ft))
        plan = {
            "classes": list(range(len(self.state.classes))),
            "memory": self.lineage.memory,
            "previous": str(self.champion_dir.parent) if self.state.champion is not None else None,
            "name": self.state.round,
        }
        (self.dir / PLAN_FILE).write_text(json.dumps(plan, indent=1) + "\n")
        n = self.cfg.finetune.ranks
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"] if n > 1 else []
        cmd = [sys.executable, *launcher, "-m", "finetune.update.train", str(self.dir)]
        code = subprocess.run(cmd).returncode
        if code != 0 or not (self.model_dir / "config.json").is_file():
            raise RuntimeError(
                f"the round's fine-tune exited {code} without a model ({self.model_dir}); fix the cause and "
                "run the same command with --resume auto (it continues from the newest checkpoint)"
            )

    def train_config(self) -> Any:
        """The fine-tune's ContinualConfig: the new set, from the champion, one experience over every class."""
        from finetune.continual.config import ContinualConfig

        cfg, s = self.cfg, self.state
        ft = load_config(ContinualConfig, cfg.finetune.config, cfg.finetune.overrides)
        check_strategy(ft.continual.strategy)
        ft.data.shards = s.new_set["shards"] if s.new_set else None
        ft.train.run_dir = str(self.dir / "train")
        ft.finetune.init = None if s.init == SCRATCH else s.init
        ft.continual.experiences = [list(range(len(s.classes)))]
        ft.continual.classes_per_experience, ft.continual.domains = None, []
        t = ft.tracking
        t.uri, t.experiment, t.parent_run_id = s.store, cfg.experiment, s.run_id
        t.run_name, t.log_model, t.register_as = f"{s.round} · fine-tune", True, None
        ft.validate(cfg.finetune.ranks)
        return ft

    def step_evaluate(self) -> None:
        s = self.state
        sets = self.next_lineage.sets
        for catalogued in sets:
            catalogued.check()
        s.scores = {
            "challenger": self.scores("challenger", self.model_dir, sets),
            "champion": self.scores("champion", self.champion_dir, sets) if s.champion is not None else None,
        }

    def scores(self, who: str, model_dir: Path, sets: list[ShardSet]) -> Scores:
        """Top-1, videos and per-class recall on every set's test split; logged as a child run."""
        from finetune.evaluate import evaluate_model_dir

        out: Scores = {}
        ft = self.fine_tune
        for catalogued in sets:
            r = evaluate_model_dir(
                model_dir,
                catalogued.shards,
                "test",
                batch_size=ft.train.micro_batch_size,
                backend="pyav" if ft.data.backend == "synthetic" else ft.data.backend,
                num_workers=ft.data.num_workers,
                out_dir=self.dir / "eval" / who / catalogued.name,
                strict_classes=False,
            )
            recall = {row["class"]: row["recall"] for row in r.get("per_class", []) if row["support"]}
            out[catalogued.name] = {"top1": r["top1"], "n": r["n"], "recall": recall}
        version = self.state.champion if who == "champion" else "new"
        run = self.tracker(f"{self.state.round} · evaluate {who} ({version})", self.dir / "eval" / who)
        run.log_metrics({f"test/{name}/top1": v["top1"] for name, v in out.items()}, 0)
        run.close("FINISHED")
        return out

    def step_gate(self) -> None:
        s = self.state
        new_set = s.new_set["name"] if s.new_set else ""
        decision = decide(self.cfg.gate, new_set, s.scores["challenger"], s.scores["champion"])
        s.decision = decision.to_json()

    def step_register(self) -> None:
        from finetune.registry import alias_version
        from finetune.update.promote import CHAMPION, promote, register

        s, cfg = self.state, self.cfg
        self.next_lineage.save(self.model_dir)
        train_run = json.loads((self.dir / "train" / "mlflow_run.json").read_text())["run_id"]
        s.version = register(self.model_dir, s.store, train_run, cfg.model, s.round)
        promote_it = bool(s.decision and s.decision["promote"])
        now = alias_version(cfg.model, CHAMPION, s.store)
        if promote_it and now not in (s.champion, s.version):
            promote_it = False  # another round promoted meanwhile: this one compared against a stale champion
            assert s.decision is not None
            s.decision["checks"].append(
                {"rule": "champion unchanged", "target": CHAMPION, "value": float("nan"),
                 "threshold": float("nan"), "passed": False}
            )  # fmt: skip
            s.decision["promote"] = False
        if promote_it:
            promote(s.store, cfg.model, s.version)
        s.promoted = promote_it

    def step_report(self) -> None:
        from finetune.update.promote import tag_version

        s = self.state
        report = self.report()
        (self.dir / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
        assert s.version is not None
        failed = _failed(s.decision)
        tag_version(
            s.store,
            self.cfg.model,
            s.version,
            {
                "tubelet.update.decision": "promoted" if s.promoted else "refused",
                "tubelet.update.failed_rules": "; ".join(failed) or "none",
                **{f"tubelet.update.top1.{k}": f"{v['top1']:.4f}" for k, v in s.scores["challenger"].items()},
            },
        )
        run = self.tracker()
        run.log_metrics(_flat_scores(s.scores) | {"gate/promoted": float(bool(s.promoted))}, 0)
        run.log_artifact(self.dir / REPORT_FILE)
        run.close("FINISHED")

    # -- helpers --------------------------------------------------------------------------------------
    @functools.cached_property
    def next_lineage(self) -> Lineage:
        """The champion's lineage plus this round's set, classes and updated replay memory (after `build`)."""
        from data_shards.loader.index import list_samples
        from finetune.continual.memory import MemoryItem, ReplayMemory

        s = self.state
        assert s.new_set is not None
        new = ShardSet(**{**s.new_set, "classes": tuple(s.new_set["classes"])})
        old = self.lineage
        ft = self.fine_tune
        c = ft.continual
        memory = (
            ReplayMemory.from_json(dict(old.memory))
            if old.memory
            else ReplayMemory(c.memory_size, c.memory_selection, ft.train.seed)
        )
        memory.size = c.memory_size
        if c.rules.replays and s.round not in old.rounds:
            refs, _ = list_samples(new.shards, ft.data.train_split)
            memory.update([MemoryItem(new.shards, r.ref, r.label) for r in refs], len(old.rounds))
            memory.items = memory.items[: memory.size]
        return old.with_set(new, s.classes, memory.to_json())

    @functools.cached_property
    def fine_tune(self) -> Any:
        """The fine-tune's config as `train` wrote it (after `train`)."""
        from finetune.continual.config import ContinualConfig

        return load_config(ContinualConfig, self.dir / CONFIG_FILE)

    def tracker(self, name: str | None = None, folder: Path | None = None) -> Any:
        """The round's MLflow run (resumed from its folder), or a child run of it."""
        from pretrain.engine.config import TrackingConfig
        from pretrain.engine.tracking import Tracker

        folder = folder or self.dir
        folder.mkdir(parents=True, exist_ok=True)
        cfg = TrackingConfig(
            uri=self.state.store,
            experiment=self.cfg.experiment,
            run_name=name or f"{self.state.round} ({self.cfg.model})",
            parent_run_id=self.state.run_id if name else None,
        )
        return Tracker(cfg, folder, True)

    def report(self) -> dict[str, Any]:
        s = self.state
        return {
            "round": s.round,
            "model": self.cfg.model,
            "store": s.store,
            "batch": {"videos": s.videos, **s.build},
            "champion_before": s.champion,
            "challenger_version": s.version,
            "promoted": s.promoted,
            "champion_after": s.version if s.promoted else s.champion,
            "decision": s.decision,
            "scores": s.scores,
            "classes": s.classes,
            "catalog": [asdict(x) for x in self.next_lineage.sets],
            "seconds": round(time.time() - s.started, 1),
        }


def _failed(decision: dict[str, Any] | None) -> list[str]:
    checks = (decision or {}).get("checks", [])
    return [
        f"{c['rule']} on {c['target']}: {c['value']:.4f} < {c['threshold']:.4f}"
        for c in checks
        if not c["passed"]
    ]


def _flat_scores(scores: dict[str, Any]) -> dict[str, float]:
    out = {}
    for who, per_set in scores.items():
        for name, v in (per_set or {}).items():
            out[f"{who}/{name}/top1"] = float(v["top1"])
    return out


def _stop_local_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def start(cfg: UpdateConfig, resume: str | None) -> RoundState:
    """The round's saved state (`--resume auto`, or a finished round: its report again) or a fresh one."""
    folder = Path(cfg.work_dir) / "rounds" / cfg.round_name
    saved = folder / STATE_FILE
    if not saved.is_file():
        return RoundState(cfg.round_name, cfg.model, cfg.videos, cfg.store())
    state = RoundState(**json.loads(saved.read_text()))
    if (state.model, state.videos) != (cfg.model, cfg.videos):
        raise ConfigError(
            f"round {state.round} in {folder} was for model={state.model} videos={state.videos}: "
            "set round=NAME for a different batch"
        )
    if "report" not in state.done and resume != "auto":
        raise ConfigError(
            f"round {state.round} stopped after {state.done[-1] if state.done else 'starting'}: "
            "run the same command with --resume auto to continue it"
        )
    return state


def run_round(cfg: UpdateConfig, resume: str | None = None) -> dict[str, Any]:
    """One round under the model's lock; returns its report."""
    cfg.validate()
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    with round_lock(Path(cfg.work_dir), cfg.model, cfg.round_name, cfg.lock_wait_s):
        state = start(cfg, resume)
        if "report" in state.done:
            print(f"[update] round {state.round} already finished: its report follows")
        return Round(cfg, state).run()


def _version(v: str | None) -> str:
    return f"version {v}" if v else "(none)"


def print_report(report: dict[str, Any]) -> None:
    """The decision and every number, as a table."""
    scores, d = report["scores"], report["decision"] or {}
    champ = scores.get("champion") or {}
    print(
        f"\n[update] round {report['round']} of {report['model']}: challenger = version "
        f"{report['challenger_version']}, champion was {_version(report['champion_before'])}"
    )
    print(f"  {'test set':<24}{'videos':>8}{'champion':>10}{'challenger':>12}")
    for name, v in scores["challenger"].items():
        theirs = champ.get(name, {}).get("top1")
        old = "-" if theirs is None else f"{100 * theirs:.1f}%"
        print(f"  {name:<24}{v['n']:>8}{old:>10}{100 * v['top1']:>11.1f}%")
    for c in d.get("checks", []):
        print(f"  {Check(**c).describe()}")
    verdict = "PROMOTED to champion" if report["promoted"] else "REFUSED (champion unchanged)"
    print(
        f"[update] {verdict}: champion = {_version(report['champion_after'])}; report {report.get('path', '')}"
    )


def main(argv: list[str]) -> int:
    """`python -m finetune update --config UPDATE.yaml [--resume auto] key=value ...`"""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m finetune update",
        description="One round of the update loop: shard a batch of new labelled videos, fine-tune from the "
        "registered champion, evaluate both on every catalogued test set, gate, register and promote.",
    )
    p.add_argument("--config", required=True, help="UPDATE.yaml (see finetune/configs/update.yaml)")
    p.add_argument("--resume", choices=["auto"], default=None, help="continue a stopped round")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print every key with its value and meaning, check it, and exit",
    )
    p.add_argument("overrides", nargs="*", help="key=value (e.g. videos=NEW/labels.csv round=2026-12-05)")
    a = p.parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        cfg = load_config(UpdateConfig, a.config, a.overrides)
        if a.print_config:
            from pretrain.engine.config.describe import describe

            print(describe(cfg), end="")
            cfg.validate()
            return 0
        report = run_round(cfg, a.resume)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except RoundBusy as e:
        print(f"busy: {e}", file=sys.stderr)
        return EXIT_BUSY
    except RuntimeError as e:  # a step failed (the fine-tune, the build): the round stays resumable
        print(f"error: {e}", file=sys.stderr)
        return 1
    except MlflowException as e:  # the registry store unreachable: resumable too, once it is back
        print(f"error: MLflow: {' '.join(str(e).split())[:500]}", file=sys.stderr)
        return 1
    report["path"] = str(Path(cfg.work_dir) / "rounds" / report["round"] / REPORT_FILE)
    print_report(report)
    return 0
