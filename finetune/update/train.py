"""A round's fine-tune: `python -m finetune.update.train ROUND_DIR`, one process per rank (torchrun).

The driver writes `ROUND_DIR/train.yaml` (a ContinualConfig: data.shards = the new set, finetune.init =
the champion) and `ROUND_DIR/train_plan.json` (the class ids of the head in global order, the replay
memory carried by the champion, the champion's directory for LwF). This is then one experience of
continual learning on the engine: a grown head keeps the old rows, the memory is replayed in every
micro-batch, DeepSpeed checkpoints make it resumable (always `--resume auto`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from finetune.continual.config import ContinualConfig, Experience
from finetune.continual.memory import ReplayMemory
from finetune.continual.task import ContinualTask
from pretrain.data import DATA_ERRORS
from pretrain.engine import Trainer, load_config
from pretrain.engine.cli import guarded
from pretrain.engine.tracking import Tracker

CONFIG_FILE, PLAN_FILE = "train.yaml", "train_plan.json"


class RoundTask(ContinualTask):
    """One experience whose model the round logs and registers itself, after the gate has seen it (with
    its lineage inside): the engine exports it but logs no MLflow model."""

    def log_model(self, model_dir: Path, tracker: Tracker) -> None:
        return None


def build_task(round_dir: Path) -> tuple[RoundTask, ContinualConfig]:
    cfg = load_config(ContinualConfig, round_dir / CONFIG_FILE)
    plan: dict[str, Any] = json.loads((round_dir / PLAN_FILE).read_text())
    exp = Experience(0, str(cfg.data.shards), tuple(plan["classes"]), plan["name"])
    memory = ReplayMemory.from_json(dict(plan["memory"])) if plan["memory"] else ReplayMemory(0)
    previous = Path(plan["previous"]) if plan["previous"] else None
    return RoundTask(cfg, [exp], 0, memory, previous), cfg


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m finetune.update.train ROUND_DIR", file=sys.stderr)
        return 2

    def run() -> bool:
        task, cfg = build_task(Path(argv[0]))
        return Trainer(task, cfg, resume="auto").train().outcome.completed

    code, completed = guarded(run, DATA_ERRORS)
    return code if code else (0 if completed else 3)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
