"""`python -m finetune continual`: a sequence of experiences, each one ordinary engine training.

For each experience k: build its task (finetune/continual/task.py), `Trainer(...).train()` it in
`R/experience_k/` (DeepSpeed, checkpoints, MLflow: a nested run under the continual run), then, on every
rank: evaluate its model on the test split of every experience so far (+ the next one, for forward transfer),
update the replay memory, estimate EWC/MAS importance. The driver's own state (accuracy matrix, memory,
which experience is next) is `R/continual_state.json`, written after every experience, so `--resume auto`
restarts at the experience — and, through the engine's checkpoints, the step — where a run stopped.
Outputs: `R/continual.json` (matrix + Avalanche-defined metrics), `R/accuracy_matrix.png`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_shards.format import load_manifest
from data_shards.loader.index import list_samples
from finetune.continual import metrics as cl_metrics
from finetune.continual.config import (
    ContinualConfig,
    Experience,
    plan_experiences,
)
from finetune.continual.memory import MemoryItem, ReplayMemory
from finetune.continual.regularize import (
    IMPORTANCE_FILE,
    estimate_importance,
    fit_to,
    load_importance,
    save_importance,
)
from finetune.continual.task import ContinualTask, head_classes, training_classes
from pretrain.data import DATA_ERRORS
from pretrain.engine import ConfigError, Trainer
from pretrain.engine.config import resume_signature, signature_hash, to_dict
from pretrain.engine.dist import barrier, launched, reduce_sum
from pretrain.engine.tracking import Tracker, resolve_uri
from pretrain.sources import load_source

STATE_FILE = "continual_state.json"
RESULT_FILE = "continual.json"
MATRIX_PNG = "accuracy_matrix.png"


@dataclass
class ContinualState:
    """What survives between experiences (and a restart): written by rank 0 after each experience."""

    signature: str
    completed: int = 0
    matrix: list[list[float | None]] = field(default_factory=list)
    before: list[float | None] = field(default_factory=list)  # accuracy on k right before training on it
    at_init: list[float | None] = field(
        default_factory=list
    )  # accuracy on k of the model before experience 0
    memory: dict[str, Any] = field(default_factory=dict)
    parent_run_id: str | None = None

    def save(self, root: Path) -> None:
        tmp = root / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(self.__dict__, indent=1) + "\n")
        tmp.replace(root / STATE_FILE)


def load_state(cfg: ContinualConfig, resume: str | None) -> ContinualState:
    """A fresh state, or the saved one with `--resume auto` (refused if the config changed)."""
    root = Path(cfg.train.run_dir)
    sig = signature_hash(resume_signature(cfg))
    saved = root / STATE_FILE
    if not saved.is_file():
        return ContinualState(signature=sig)
    if resume != "auto":
        raise ConfigError(f"{root} already holds a continual run: pass --resume auto, or a new train.run_dir")
    state = ContinualState(**json.loads(saved.read_text()))
    if state.signature != sig:
        raise ConfigError(
            f"refusing to resume {root}: its continual config differs in keys that change the model, data or "
            "strategy; restore them or use a new train.run_dir"
        )
    return state


def experience_config(
    cfg: ContinualConfig, exp: Experience, root: Path, state: ContinualState
) -> ContinualConfig:
    """Experience k's config: its run dir, shard set, starting point (the previous experience's model; the
    base init for peft_per_experience) and a run nested under the continual one in the same store."""
    c = copy.deepcopy(cfg)
    k = exp.index
    c.train.run_dir = str(root / f"experience_{k}")
    c.data.shards = exp.shards
    if cfg.continual.rules.per_experience:
        c.finetune.method = cfg.continual.peft_method
    elif k > 0:
        c.finetune.init = str(root / f"experience_{k - 1}" / "model")
    c.tracking.uri = resolve_uri(cfg.tracking, root)
    c.tracking.run_name = f"{root.name} · {exp.name}"
    c.tracking.parent_run_id = state.parent_run_id
    c.tracking.log_model = True  # the next experience starts from it, evaluation reads it
    return c


def evaluate_on(model_dir: Path, cfg: ContinualConfig, exp: Experience, out: Path) -> float:
    """Top-1 of `model_dir` on experience `exp`'s test split (its classes only); collective over ranks."""
    from finetune.evaluate import evaluate_model_dir

    r = evaluate_model_dir(
        model_dir,
        exp.shards,
        cfg.continual.eval_split,
        clips=cfg.eval.test_clips,
        crops=cfg.eval.test_crops,
        batch_size=cfg.train.micro_batch_size,
        backend=cfg.data.backend if cfg.data.backend != "synthetic" else "auto",
        num_workers=cfg.data.num_workers,
        labels=None if cfg.continual.domains else list(exp.classes),
        out_dir=out,
        device=str(launched().device),
    )
    return float(r["top1"])


def model_for(cfg: ContinualConfig, root: Path, i: int, j: int) -> Path:
    """Which model answers for experience j after experience i: the latest one, or j's own
    (peft_per_experience: task-incremental, the experience id is given at test time)."""
    k = j if cfg.continual.rules.per_experience else i
    return root / f"experience_{k}" / "model"


def evaluate_row(
    cfg: ContinualConfig, plan: list[Experience], root: Path, i: int
) -> tuple[list[float | None], float | None]:
    """Row i of the matrix (j ≤ i; None after) and the accuracy on experience i+1 before training on it."""
    row: list[float | None] = []
    for j, exp in enumerate(plan):
        row.append(
            evaluate_on(model_for(cfg, root, i, j), cfg, exp, root / f"experience_{i}" / f"eval_exp{j}")
            if j <= i
            else None
        )
    ahead = None
    if i + 1 < len(plan) and not cfg.continual.rules.per_experience:
        ahead = evaluate_on(
            model_for(cfg, root, i, i + 1), cfg, plan[i + 1], root / f"experience_{i}" / f"eval_exp{i + 1}"
        )
    return row, ahead


def memory_candidates(cfg: ContinualConfig, plan: list[Experience], k: int) -> list[MemoryItem]:
    """Experience k's training videos (the whole split: the same list on every rank) as references."""
    refs, _ = list_samples(plan[k].shards, cfg.data.train_split)
    wanted = set(training_classes(cfg, plan, k)) if not cfg.continual.domains else None
    return [MemoryItem(plan[k].shards, r.ref, r.label) for r in refs if wanted is None or r.label in wanted]


def _reduce_tensors(tensors: dict[str, torch.Tensor], count: int) -> tuple[dict[str, torch.Tensor], float]:
    """Sum `tensors` and `count` over ranks in one collective."""
    names = sorted(tensors)
    device = next(iter(tensors.values())).device
    flat = reduce_sum(
        torch.cat([tensors[n].flatten() for n in names] + [torch.tensor([float(count)], device=device)])
    )
    out, offset = {}, 0
    for n in names:
        size = tensors[n].numel()
        out[n] = flat[offset : offset + size].view_as(tensors[n]).cpu()
        offset += size
    return out, float(flat[-1])


def update_importance(cfg: ContinualConfig, plan: list[Experience], root: Path, k: int) -> None:
    """EWC/MAS after experience k, from its exported model: every rank on its share of the experience's
    training videos (eval sampling, one clip each), summed over ranks; online (decay × the previous one)."""
    from data_shards.loader import build_loader
    from finetune.model_dir import open_model_dir

    proc = launched()
    device, world = proc.device, proc.world_size
    opened = open_model_dir(root / f"experience_{k}" / "model", device=device, clips=1, crops=1)
    model = opened.model
    for p in model.parameters():
        p.requires_grad_(True)
    head = head_classes(cfg, plan, k)
    label_map = torch.full((len(load_manifest(plan[k].shards).classes or []),), -1, dtype=torch.int64)
    label_map[head] = torch.arange(len(head))
    loader = build_loader(
        plan[k].shards,
        cfg.data.train_split,
        batch_size=1,
        spec=opened.spec,
        backend=cfg.data.backend,
        rank=proc.rank,
        world_size=world,
        device=device,
        num_workers=cfg.data.num_workers,
        drop_last=False,
        **({} if cfg.continual.domains else {"labels": list(plan[k].classes)}),
    )
    limit = -(-cfg.continual.importance_samples // world)
    total, count = estimate_importance(model, loader, cfg.continual.rules.penalty, label_map, limit)
    summed, n = _reduce_tensors(total, count)
    importance = {name: v / max(n, 1.0) for name, v in summed.items()}
    previous = root / f"experience_{k - 1}" / IMPORTANCE_FILE
    if k > 0 and previous.is_file():
        old, _ = load_importance(previous)
        for name, v in old.items():
            if name in importance:
                importance[name] += cfg.continual.importance_decay * fit_to(v, importance[name].shape)
    if launched().is_main:
        save_importance(root / f"experience_{k}" / IMPORTANCE_FILE, importance, dict(model.state_dict()))
    barrier()


def initial_accuracy(cfg: ContinualConfig, plan: list[Experience], root: Path) -> list[float | None]:
    """Accuracy on every experience of the model before experience 0 (its starting weights, a fresh head):
    the baseline of forward transfer. None for peft_per_experience (one head per experience)."""
    if cfg.continual.rules.per_experience:
        return [None] * len(plan)
    out = root / "initial_model"
    if launched().is_main and not (out / "config.json").is_file():
        from pretrain.engine import TaskContext

        task = ContinualTask(
            experience_config(cfg, plan[0], root, ContinualState("")), plan, 0, ReplayMemory(0), None
        )
        task.setup(TaskContext(0, 1, torch.device("cpu"), cfg.train.seed, root / "experience_0"))
        model = task.build_model()
        if task.cfg.finetune.init is not None:  # the weights experience 0 starts from, without its printout
            task.load_init(model, load_source(task.cfg.finetune.init))
        task.export(model, out, {"step": 0})
    barrier()
    return [evaluate_on(out, cfg, exp, root / "initial_model" / f"eval_exp{j}") for j, exp in enumerate(plan)]


def _log_experience(
    parent: Tracker, cfg: ContinualConfig, plan: list[Experience], state: ContinualState, k: int
) -> None:
    """Rank 0: row k of the matrix and the running metrics into the continual run and experience k's run."""
    row = state.matrix[k]
    metrics = {f"continual/acc_exp{j}": v for j, v in enumerate(row) if v is not None}
    metrics["continual/average_accuracy"] = cl_metrics.average_accuracy(state.matrix)
    f = cl_metrics.forgetting(state.matrix)
    if f is not None:
        metrics["continual/forgetting"] = f
    parent.log_metrics(metrics, k)
    exp_cfg = experience_config(cfg, plan[k], Path(cfg.train.run_dir), state)
    child = Tracker(exp_cfg.tracking, Path(exp_cfg.train.run_dir), True)
    child.log_metrics({f"test/acc_exp{j}": v for j, v in enumerate(row) if v is not None}, 0)
    child.close("FINISHED")


def write_results(
    cfg: ContinualConfig, plan: list[Experience], state: ContinualState, memory: ReplayMemory
) -> dict[str, Any]:
    """`continual.json` and the matrix heatmap (rank 0)."""
    root = Path(cfg.train.run_dir)
    result = {
        "strategy": cfg.continual.strategy,
        "scenario": "domain-incremental" if cfg.continual.domains else "class-incremental",
        "experiences": [{"name": e.name, "shards": e.shards, "classes": list(e.classes)} for e in plan],
        "accuracy_matrix": state.matrix,
        **cl_metrics.summary(state.matrix, state.before, state.at_init),
        "accuracy_before_training": state.before,
        "accuracy_at_init": state.at_init,
        "memory_size": cfg.continual.memory_size,
        "memory_per_class": memory.per_class(),
        "config": to_dict(cfg.continual),
    }
    (root / RESULT_FILE).write_text(json.dumps(result, indent=1) + "\n")
    names = [f"exp {e.index}" for e in plan]
    cl_metrics.plot_matrix(
        state.matrix, names, root / MATRIX_PNG, f"{cfg.continual.strategy}: accuracy after each experience"
    )
    return result


def _train_experience(
    cfg: ContinualConfig,
    plan: list[Experience],
    root: Path,
    state: ContinualState,
    memory: ReplayMemory,
    resume: str | None,
) -> bool:
    """Experience `state.completed` through the engine; True when it finished (not paused or preempted)."""
    k = state.completed
    exp_cfg = experience_config(cfg, plan[k], root, state)
    previous = root / f"experience_{k - 1}" if k > 0 else None
    task = ContinualTask(exp_cfg, plan, k, memory, previous)
    trainer = Trainer(task, exp_cfg, resume="auto" if resume else None)
    if k == 0 and not state.at_init:
        state.at_init = initial_accuracy(cfg, plan, root)
        state.before = [state.at_init[0]]
    return trainer.train().outcome.completed


def _after_experience(
    cfg: ContinualConfig, plan: list[Experience], root: Path, state: ContinualState, memory: ReplayMemory
) -> None:
    """Evaluate, update the memory and the importance, save the state (every rank computes the same)."""
    k = state.completed
    row, ahead = evaluate_row(cfg, plan, root, k)
    state.matrix.append(row)
    if k + 1 < len(plan):
        state.before.append(ahead)
    if cfg.continual.rules.replays:
        memory.update(memory_candidates(cfg, plan, k), k)
    if cfg.continual.rules.estimates_importance and k + 1 < len(plan):
        update_importance(cfg, plan, root, k)
    state.completed = k + 1
    state.memory = memory.to_json()
    if launched().is_main:
        state.save(root)
    barrier()


def run_continual(cfg: ContinualConfig, resume: str | None = None) -> dict[str, Any] | None:
    """Train every experience not done yet; returns `continual.json`'s content (None when a run paused)."""
    cfg.validate(launched().world_size)
    plan = plan_experiences(cfg)
    root = Path(cfg.train.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    state = load_state(cfg, resume)
    parent_cfg = copy.deepcopy(cfg.tracking)
    parent_cfg.run_name = parent_cfg.run_name or f"{root.name} ({cfg.continual.strategy})"
    parent = Tracker(parent_cfg, root, launched().is_main)
    state.parent_run_id = state.parent_run_id or parent.run_id
    if state.completed == 0 and launched().is_main:
        parent.log_params(
            {**{f"continual.{k}": v for k, v in to_dict(cfg.continual).items()}, "experiences": len(plan)}
        )
    c = cfg.continual
    memory = (
        ReplayMemory.from_json(dict(state.memory))
        if state.memory
        else ReplayMemory(c.memory_size, c.memory_selection, cfg.train.seed)
    )
    try:
        while state.completed < len(plan):
            if not _train_experience(cfg, plan, root, state, memory, resume):
                parent.close("KILLED")
                return None
            _after_experience(cfg, plan, root, state, memory)
            if launched().is_main:
                _log_experience(parent, cfg, plan, state, state.completed - 1)
    except BaseException:
        parent.close("FAILED")
        raise
    result = write_results(cfg, plan, state, memory) if launched().is_main else {}
    parent.log_artifact(root / RESULT_FILE)
    parent.log_artifact(root / MATRIX_PNG)
    parent.close("FINISHED")
    return result


def print_result(result: dict[str, Any]) -> None:
    """The matrix and the headline metrics, as a table (rank 0)."""
    names = [e["name"] for e in result["experiences"]]
    print(f"\n[continual] {result['strategy']} ({result['scenario']}), accuracy after each experience:")
    print("            " + "".join(f"{'exp ' + str(j):>9}" for j in range(len(names))))
    for i, row in enumerate(result["accuracy_matrix"]):
        print(f"  after {i:<4}" + "".join(f"{'' if v is None else f'{100 * v:.1f}%':>9}" for v in row))

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    print(
        f"[continual] average accuracy {pct(result['average_accuracy'])}, forgetting {pct(result['forgetting'])}, "
        f"BWT {pct(result['bwt'])}, forward transfer {pct(result['forward_transfer'])}"
    )


def main(argv: list[str]) -> int:
    """`python -m finetune continual --config FILE [--resume auto] key=value ...`."""
    from pretrain.engine import load_config
    from pretrain.engine.cli import guarded, print_config, training_parser

    p = training_parser(
        "python -m finetune continual",
        "Continual fine-tuning over a sequence of experiences (class- or domain-incremental)",
        "finetune/configs/tiny_cpu_continual.yaml",
        "continual.strategy=replay data.shards=S",
    )
    args = p.parse_intermixed_args(argv)
    if args.print_config:
        return print_config(ContinualConfig, args)
    cfg = None

    def load_and_run() -> dict[str, Any] | None:
        nonlocal cfg
        cfg = load_config(ContinualConfig, args.config, args.overrides)
        return run_continual(cfg, resume=args.resume)

    code, result = guarded(load_and_run, DATA_ERRORS)
    if code or not launched().is_main:
        return code
    root = Path(cfg.train.run_dir).resolve()
    if result is None:
        print(f"[continual] paused; continue with the same command plus --resume auto ({root})")
        return 0
    print_result(result)
    print(f"[continual] {root / RESULT_FILE}, {root / MATRIX_PNG}")
    return 0
