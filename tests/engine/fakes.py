"""In-process stand-ins for the engine's outside world, so the loop can be tested in milliseconds:
`FakeRuntime` (one rank, no process group) hands the trainer a `FakeEngine` that does what DeepSpeed's
does for the trainer (loss scaled by 1/accumulation, update at the boundary, clipping, checkpoint files in
DeepSpeed's stage-0 layout), and `ToyTask` is a linear regression with a resumable list loader that records
when it was evaluated and can be told to return non-finite losses, stop early, or be preempted."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.engine import EvalOutcome, StepOutput, Task, TaskContext
from pretrain.engine.dist import DistInfo


class FakeEngine:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> None:
        self.module, self.optimizer = model, optimizer
        self.accum = config["gradient_accumulation_steps"]
        self.clip = config["gradient_clipping"]
        self.micro_steps, self.updates, self.grad_norm = 0, 0, None

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self.module(*args, **kw)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accum:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip or math.inf))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1

    def get_global_grad_norm(self) -> float | None:
        return self.grad_norm

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> None:
        folder = Path(root) / tag
        folder.mkdir(parents=True, exist_ok=True)
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        torch.save(state, folder / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, root: str, tag: str, **_: Any) -> tuple[str, dict]:
        state = torch.load(Path(root) / tag / "mp_rank_00_model_states.pt", weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        return str(Path(root) / tag), {}


class FakeRuntime:
    def start(self, device: str, backend: str) -> DistInfo:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    def initialize(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]
    ) -> FakeEngine:
        return FakeEngine(model, optimizer, config)


class ListLoader:
    """`batches` deterministic micro-batches per epoch (a function of (epoch, index)), resumable mid-epoch
    like the shard loaders: an iteration is a whole epoch, except the first after `load_state_dict`."""

    def __init__(self, batches: int, size: int = 4, epoch: int = 0) -> None:
        self.batches, self.size, self.epoch, self.pos, self.pending = batches, size, epoch, 0, 0
        self.seen: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.pos, self.pending = epoch, 0, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start, self.pending = self.pending, 0
        for b in range(start, self.batches):
            self.pos = b + 1
            g = torch.Generator().manual_seed(1000 * self.epoch + b)
            x = torch.randn(self.size, 4, generator=g)
            self.seen.append((self.epoch, b))
            yield {"x": x, "y": x.sum(1, keepdim=True), "index": (self.epoch, b)}
        self.pos = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos, self.pending = state["epoch"], state["pos"], state["pos"]


class ToyTask(Task):
    """y = sum(x) by a linear layer. `nan_calls`: loss() calls (1-based) that return NaN; `stop_at_eval`: the
    evaluation (1-based) whose after_evaluate asks to stop; `preempt_call`: the loss() call that "receives"
    SIGTERM (the trainer's preemption flag is set)."""

    def __init__(
        self,
        batches: int = 6,
        nan_calls: Iterable[int] = (),
        stop_at_eval: int | None = None,
        preempt_call: int | None = None,
        val: bool = True,
    ) -> None:
        self.batches, self.nan_calls = batches, set(nan_calls)
        self.stop_at_eval, self.preempt_call, self.val = stop_at_eval, preempt_call, val
        self.calls = 0
        self.evaluations: list[int] = []
        self.losses: list[float] = []
        self.trainer: Any = None
        self.loader: ListLoader | None = None

    def build_model(self) -> nn.Module:
        return nn.Linear(4, 1)

    def train_loader(self, ctx: TaskContext, epoch: int) -> ListLoader:
        self.loader = ListLoader(self.batches, epoch=epoch)
        return self.loader

    def val_loader(self, ctx: TaskContext) -> ListLoader | None:
        return ListLoader(2, epoch=99) if self.val else None

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        self.calls += 1
        loss = nn.functional.mse_loss(model(batch["x"]), batch["y"])
        if self.calls in self.nan_calls:
            loss = loss * math.nan
        if self.calls == self.preempt_call:
            self.trainer.preemption.requested = True
        self.losses.append(float(loss.detach()))
        return StepOutput(loss, {"abs_err": (model(batch["x"]) - batch["y"]).abs().mean().detach()})

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        errs = [float(nn.functional.mse_loss(model(b["x"]), b["y"])) for b in batches]
        return {"mse": sum(errs) / len(errs)}

    def after_evaluate(self, model: nn.Module, metrics: dict[str, float], step: int) -> EvalOutcome:
        self.evaluations.append(step)
        return EvalOutcome(
            stop=len(self.evaluations) == self.stop_at_eval, metrics={"val/best": metrics["mse"]}
        )

    def state_dict(self) -> dict[str, Any]:
        return {"evaluations": list(self.evaluations)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evaluations = list(state["evaluations"])

    def export(self, model: nn.Module, out_dir: Path, extra: dict[str, Any]) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out_dir / "weights.pt")
        return out_dir
