"""A training process whose task returns a non-finite loss on chosen calls (for the NaN-skip tests).

python tests/engine/_worker.py --nan-calls 3,4 [--nan-rank R] --config ... key=value ...
"""

from __future__ import annotations

import argparse
import os
import sys

from pretrain.config import PretrainConfig
from pretrain.engine import StepOutput, TrainingStopped, load_config, run
from pretrain.task import MaskedVideoTask


class NaNTask(MaskedVideoTask):
    def __init__(self, cfg: PretrainConfig, calls: set[int], rank: int | None) -> None:
        super().__init__(cfg)
        self.bad_calls, self.bad_rank, self.calls = calls, rank, 0

    def loss(self, model, batch) -> StepOutput:  # type: ignore[no-untyped-def]
        out = super().loss(model, batch)
        self.calls += 1
        if self.calls in self.bad_calls and self.bad_rank in (None, self.rank):
            out.loss = out.loss * float("nan")
        return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nan-calls", default="")
    p.add_argument("--nan-from", type=int, default=0, help="every call from this one on is NaN")
    p.add_argument("--nan-rank", type=int, default=None)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    calls = {int(c) for c in a.nan_calls.split(",") if c}
    if a.nan_from:
        calls |= set(range(a.nan_from, a.nan_from + 100_000))
    cfg = load_config(PretrainConfig, a.config, a.overrides)
    try:
        result = run(NaNTask(cfg, calls, a.nan_rank), cfg)
    except TrainingStopped as e:
        print(f"STOPPED rank={os.environ.get('RANK')}: {e}", flush=True)
        return 3
    print(f"DONE step={result.step} nonfinite={result.nonfinite_steps}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
