"""A training process for tests that need to look inside a run: a task that returns a non-finite loss on
chosen calls (the NaN-skip tests), records the keys of every micro-batch with the step it belongs to
(`--log-keys`: the elastic-resume tests), and dumps the full fp32 weights and Adam moments right after a
checkpoint is restored and at the end (`--dump-state PREFIX`: ZeRO-3 any time, ZeRO-1/2 only right after a
universal load -- DeepSpeed 0.19 links ZeRO-1/2 moments for `safe_get_full_*` after the first group's first
update, so later groups' are missing).

python tests/engine/_worker.py [--nan-calls 3,4] [--nan-rank R] [--log-keys] [--dump-state PREFIX] \
    --config ... [--resume auto] key=value ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from pretrain.config import PretrainConfig
from pretrain.engine import StepOutput, Trainer, TrainingStopped, load_config
from pretrain.task import MaskedVideoTask


class ProbeTask(MaskedVideoTask):
    def __init__(self, cfg: PretrainConfig, calls: set[int], rank: int | None, log_keys: bool) -> None:
        super().__init__(cfg)
        self.bad_calls, self.bad_rank, self.calls, self.log_keys = calls, rank, 0, log_keys
        self.trainer: Trainer | None = None

    def loss(self, model, batch) -> StepOutput:  # type: ignore[no-untyped-def]
        out = super().loss(model, batch)
        self.calls += 1
        if self.calls in self.bad_calls and self.bad_rank in (None, self.rank):
            out.loss = out.loss * float("nan")
        if self.log_keys and self.trainer is not None:
            folder = Path(self.cfg.train.run_dir) / "keys"
            folder.mkdir(exist_ok=True)
            row = {
                "step": self.trainer.state.step + 1,
                "keys": batch["key"][:: self.cfg.clip.clips_per_video],
            }
            with (folder / f"rank{self.rank}.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
        return out


def dump_state(trainer: Trainer, path: str) -> None:
    """Collective: every trainable parameter's full fp32 value, exp_avg and exp_avg_sq (rank 0 writes)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out: dict[str, Any] = {}
    for name, p in trainer.engine.module.named_parameters():
        if p.requires_grad:
            out[name] = [
                safe_get_full_fp32_param(p).clone(),
                safe_get_full_optimizer_state(p, "exp_avg").clone(),
                safe_get_full_optimizer_state(p, "exp_avg_sq").clone(),
            ]
    opt = trainer.optimizer  # the torch AdamW ZeRO wraps: its groups' hyperparameters and Adam steps
    out["__groups__"] = [[g["weight_decay"], g["lr_scale"]] for g in opt.param_groups]
    steps = [st["step"] for st in opt.state.values()]
    out["__steps__"] = [float(s) for s in steps] + [float(len({id(s) for s in steps}))]
    if trainer.dist.is_main:
        torch.save(out, path)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nan-calls", default="")
    p.add_argument("--nan-from", type=int, default=0, help="every call from this one on is NaN")
    p.add_argument("--nan-rank", type=int, default=None)
    p.add_argument("--log-keys", action="store_true")
    p.add_argument("--dump-state", default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    calls = {int(c) for c in a.nan_calls.split(",") if c}
    if a.nan_from:
        calls |= set(range(a.nan_from, a.nan_from + 100_000))
    cfg = load_config(PretrainConfig, a.config, a.overrides)
    task = ProbeTask(cfg, calls, a.nan_rank, a.log_keys)
    try:
        trainer = Trainer(task, cfg, a.resume)
        task.trainer = trainer
        if a.dump_state and trainer.resume is not None:
            dump_state(trainer, f"{a.dump_state}.restored.pt")
        result = trainer.train()
        if a.dump_state:
            dump_state(trainer, f"{a.dump_state}.final.pt")
    except TrainingStopped as e:
        print(f"STOPPED rank={os.environ.get('RANK')}: {e}", flush=True)
        return 3
    print(f"DONE step={result.step} nonfinite={result.nonfinite_steps}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
