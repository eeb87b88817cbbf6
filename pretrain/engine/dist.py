"""Process environment: launcher variables, the CPU DeepSpeed knobs, process-group start, collectives.

Works under `deepspeed` (one or many nodes), `torchrun`, and a bare `python -m pretrain` (single process:
we fill RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT ourselves).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import socket
import sys
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as td


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> DistInfo:
    """What the launcher announced for this process (RANK, WORLD_SIZE, LOCAL_RANK; 0, 1, 0 without one) and
    its device (this local rank's GPU, else the CPU), known before any process group starts: the one place
    that reads them."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local, device)


def env_world_size() -> int:
    """World size the launcher announced (1 without a launcher); known before any process group starts."""
    return launched().world_size


def join_process_group() -> DistInfo:
    """This process in the launcher's group, outside a `Trainer` (evaluation, importance estimation): the
    group is started (nccl on GPUs, gloo on CPUs) when the launcher announced several ranks and none runs."""
    info = launched()
    if info.world_size > 1 and not td.is_initialized():
        td.init_process_group("nccl" if info.device.type == "cuda" else "gloo")
    if td.is_initialized():
        return DistInfo(td.get_rank(), td.get_world_size(), info.local_rank, info.device)
    return info


def prepare_env(device: str = "auto") -> torch.device:
    """Set launcher defaults and, on CPU, the DeepSpeed knobs — BEFORE deepspeed is imported.

    CPU: `DS_ACCELERATOR=cpu` and no shm-comm op (its JIT build takes 30–90 s and is inference-only).
    """
    from .config import ConfigError, uses_cuda

    use_cuda = uses_cuda(device)
    if use_cuda and not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"train.device=cuda, but torch {torch.__version__} ({built}) sees no CUDA device here; "
            "use train.device=auto (CUDA when there is one) or cpu"
        )
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port()) if os.environ["WORLD_SIZE"] == "1" else "29500"
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def import_deepspeed() -> Any:
    """Import deepspeed with the CPU op knobs applied (call after `prepare_env`).

    DeepSpeed's autotuner imports mlflow when deepspeed is imported, only to log its own tuning runs, which
    tubelet never starts: 1-2 s of every rank's start-up. When this process has not imported mlflow itself,
    deepspeed is imported with mlflow hidden (the autotuner's `import mlflow` fails, as without the package);
    tubelet's tracking imports the real one afterwards as usual."""
    hide = "mlflow" not in sys.modules and "deepspeed" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
    try:
        import deepspeed
        import deepspeed.ops
    finally:
        if hide:
            del sys.modules["mlflow"]

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    _defer_muon()
    return deepspeed


MUON = "deepspeed.runtime.zero.muon"


class _NotMuon:
    """Stands for DeepSpeed's `MuonWithAuxAdam` while its module is deferred: tubelet's optimizer is AdamW,
    so DeepSpeed's `isinstance(optimizer, MuonWithAuxAdam)` checks are False either way. Making one (code
    other than tubelet's in the same process) imports the real module, which DeepSpeed's later imports see."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return _real_module(f"{MUON}.muon_optimizer").MuonWithAuxAdam(*args, **kwargs)


def _muon_update(*args: Any, **kwargs: Any) -> Any:
    """DeepSpeed's `muon_update`, imported when first called (only a Muon optimizer calls it)."""
    return _real_module(f"{MUON}.original_muon").muon_update(*args, **kwargs)


def _defer_muon() -> None:
    """DeepSpeed's ZeRO and bf16 optimizers import its Muon modules on every rank (to ask whether the
    optimizer is a Muon one, and to have `muon_update` at hand in the gradient partitioning), and importing
    them `torch.compile`s Muon's kernels, which loads inductor: 1.1-1.4 s of every rank's start-up. Until a
    name other than these two is asked for (then the real module is imported and answers), they are
    stand-ins: `MuonWithAuxAdam` a class nothing is an instance of, `muon_update` a function that imports the
    real one when called."""
    if importlib.util.find_spec(MUON) is None:  # a DeepSpeed without Muon
        return
    for name, names in (
        (f"{MUON}.muon_optimizer", {"MuonWithAuxAdam": _NotMuon}),
        (f"{MUON}.original_muon", {"muon_update": _muon_update}),
    ):
        if name in sys.modules:
            continue
        stub = types.ModuleType(name, "deferred by tubelet (pretrain.engine.dist._defer_muon) until used")
        stub.__dict__.update(names)
        stub.__getattr__ = functools.partial(_deferred_attr, name)  # type: ignore[method-assign]  # PEP 562
        sys.modules[name] = stub


def _deferred_attr(module: str, attr: str) -> Any:
    if attr.startswith("__"):  # the import system's questions (`__path__`: is it a package?)
        raise AttributeError(attr)
    return getattr(_real_module(module), attr)


def _real_module(name: str) -> types.ModuleType:
    """The real module behind a stand-in (imported now, replacing it)."""
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__file__", None) is None:
        del sys.modules[name]
    return importlib.import_module(name)


def init_distributed(device: torch.device, backend: str = "auto") -> DistInfo:
    deepspeed = import_deepspeed()
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not td.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistInfo(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device)


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op on one rank); the trainer's one collective per step."""
    if td.is_initialized() and td.get_world_size() > 1:
        td.all_reduce(t)
    return t


def min_over_ranks(n: int, device: torch.device) -> int:
    """The smallest `n` of any rank (e.g. how many val batches every rank can run: ZeRO-3 forwards are
    collective, so all ranks must run the same number)."""
    t = torch.tensor([n], dtype=torch.int64, device=device)
    if td.is_initialized() and td.get_world_size() > 1:
        td.all_reduce(t, op=td.ReduceOp.MIN)
    return int(t.item())


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = reduce_sum(torch.tensor(values, dtype=torch.float64, device=device))
    return (t / (td.get_world_size() if td.is_initialized() else 1)).tolist()


def barrier() -> None:
    if td.is_initialized() and td.get_world_size() > 1:
        td.barrier()


class DeepSpeedRuntime:
    """What the trainer needs from the outside world: a process group and an engine around the model.

    The real one (this) starts torch.distributed through DeepSpeed and wraps the model with
    `deepspeed.initialize`; tests hand the trainer an in-process stand-in with the same two methods.
    """

    def start(self, device: str, backend: str) -> DistInfo:
        return init_distributed(prepare_env(device), backend)

    def initialize(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]
    ) -> Any:
        deepspeed = import_deepspeed()
        quiet = _KnownOptimizer()
        deepspeed.utils.logger.addFilter(quiet)
        try:
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        finally:
            deepspeed.utils.logger.removeFilter(quiet)
        return engine


class _KnownOptimizer(logging.Filter):
    """Drops DeepSpeed's "untested optimizer, proceed with caution" warning, which it gives any optimizer whose
    exact type is not on its list: ours is torch's AdamW, subclassed only so the trainer can veto a step
    (`optim.VetoableAdamW`), and the tests cover it at every ZeRO stage."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()
