"""One checkpoint path: DeepSpeed state + per-rank resume state, a `complete` marker, retention, export.

Layout under `<run_dir>/checkpoints/`::

    step_00000050/                  DeepSpeed's files (model, ZeRO partitions, optimizer, scheduler)
        rank_00000.pt               per-rank: TrainState, loader position, RNG states, task state
                                    (weights_only-safe)
        complete                    JSON, written by rank 0 after every rank finished: step, signature
    latest                          tag of the newest complete checkpoint (DeepSpeed's convention)

A directory without `complete` is an interrupted save and is never resumed from.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, signature_diff
from .dist import barrier

CKPT_DIR = "checkpoints"
COMPLETE = "complete"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / CKPT_DIR


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_complete(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def read_marker(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / COMPLETE).read_text())


# ---------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA) generator states in weights_only-loadable types."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------- save / load


def save(
    engine: Any,
    run_dir: Path,
    step: int,
    rank: int,
    rank_state: dict[str, Any],
    marker: dict[str, Any],
    keep_last: int,
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory (complete on return)."""
    root = checkpoints_dir(run_dir)
    tag = tag_for(step)
    ckpt = root / tag
    if rank == 0 and ckpt.exists():  # a stale, incomplete save of the same step from a killed run
        shutil.rmtree(ckpt)
    barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"tubelet": marker}, save_latest=False)
    torch.save(rank_state, ckpt / f"rank_{rank:05d}.pt")
    barrier()  # every rank's files are on disk before the checkpoint counts
    if rank == 0:
        tmp = ckpt / f".{COMPLETE}.tmp"
        tmp.write_text(json.dumps({**marker, "step": step}, indent=1, sort_keys=True) + "\n")
        tmp.replace(ckpt / COMPLETE)
        (root / f".{LATEST}.tmp").write_text(tag)
        (root / f".{LATEST}.tmp").replace(root / LATEST)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return ckpt


def check_compatible(ckpt: Path, signature: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Refuse a checkpoint whose resume signature (architecture, data, optimizer shape) differs."""
    marker = read_marker(ckpt)
    diff = signature_diff(marker.get("signature", {}), signature)
    if diff:
        raise ConfigError(
            f"refusing to resume from {ckpt}: its config differs in keys that change the model, data or "
            f"optimizer state:\n  " + "\n  ".join(diff) + "\nRestore those values, or start a new run "
            "(a different train.run_dir) without --resume."
        )
    if marker.get("world_size") != world_size:
        raise ConfigError(
            f"refusing to resume from {ckpt}: it was written by {marker.get('world_size')} ranks, this run has "
            f"{world_size}; exact resume (ZeRO partitions, loader positions) needs the same world size"
        )
    return marker


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`auto`: newest complete checkpoint (or a fresh start); a path: that checkpoint; None: fresh, and a
    run directory that already has checkpoints is refused (so a typo cannot overwrite a run)."""
    if resume in (None, "", "none", "never"):
        if latest_complete(run_dir) is not None:
            raise ConfigError(
                f"{run_dir} already has checkpoints: pass --resume auto to continue that run, or set "
                "train.run_dir to a new directory"
            )
        return None
    if resume == "auto":
        return latest_complete(run_dir)
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint directory (no '{COMPLETE}' marker)")
    return path


def read_rank_state(ckpt: Path, rank: int) -> dict[str, Any]:
    """This rank's resume state (TrainState, RNG, task, loader): plain tensors and containers only."""
    return torch.load(ckpt / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=True)


def load_engine(engine: Any, ckpt: Path) -> None:
    """Collective: restore DeepSpeed's state (weights, ZeRO partitions, optimizer) from `ckpt`."""
    path, _ = engine.load_checkpoint(
        str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt}")


# --------------------------------------------------------------------------------------------- export


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint: DeepSpeed's ZeRO consolidation for stages 1–3, the module for stage 0."""
    marker = read_marker(ckpt)
    stage = int(marker.get("zero_stage", 0))
    if stage == 0:
        f = ckpt / "mp_rank_00_model_states.pt"
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception:  # DeepSpeed pickles config objects beside the weights
            warnings.warn(
                f"{f}: not loadable with weights_only=True; loading our own run's file fully", stacklevel=2
            )
            state = torch.load(f, map_location="cpu", weights_only=False)
        sd = state["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    from .optim import clean_param_name

    return {clean_param_name(k): v.float() for k, v in sd.items()}


def find_export_checkpoint(run_dir: Path) -> Path:
    ckpt = latest_complete(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint under {checkpoints_dir(run_dir)}")
    return ckpt


def export(run_dir: Path, out_dir: Path, task: Any) -> Path:
    """Consolidate the newest complete checkpoint of `run_dir` into fp32 weights, load them into the task's
    architecture (`build_model`: no starting weights are read) and let the task write its model directory."""
    ckpt = find_export_checkpoint(Path(run_dir))
    state = consolidated_state_dict(ckpt)
    model = task.build_model()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
        raise RuntimeError(
            f"{ckpt}: weights do not match the task's model: missing {missing}, unexpected {unexpected}"
        )
    marker = read_marker(ckpt)
    extra = {"step": marker["step"], "samples": marker.get("samples"), "checkpoint": str(ckpt)}
    return task.export(model, Path(out_dir), extra)


__all__ = [
    "check_compatible",
    "complete_checkpoints",
    "consolidated_state_dict",
    "export",
    "latest_complete",
    "load_engine",
    "read_rank_state",
    "rng_state",
    "save",
    "set_rng_state",
]
