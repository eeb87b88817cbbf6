"""One checkpoint path: DeepSpeed state + per-rank resume state, a `complete` marker, retention, export.

Layout under `<run_dir>/checkpoints/`::

    step_00000050/                  DeepSpeed's files (model, ZeRO partitions, optimizer, scheduler)
        rank_00000.pt               per-rank: TrainState, loader position, RNG states, task state
                                    (weights_only-safe)
        complete                    JSON, written by rank 0 after every rank finished: step, signature
        universal/                  DeepSpeed's universal checkpoint of this step, made (once, by rank 0)
                                    when a run resumes from it on another number of ranks or ZeRO stage
    latest                          tag of the newest complete checkpoint (DeepSpeed's convention)

A directory without `complete` is an interrupted save and is never resumed from.

Resuming (`plan_resume`): the same world size, ZeRO stage and micro-batch continue bit-exactly (DeepSpeed's
own files, every rank's RNG and loader state). Another world size or ZeRO stage (1-3) goes through
DeepSpeed's universal checkpoint (each parameter's fp32 weights and Adam moments whole, re-partitioned on
load) and the loader's global position: the same model, optimizer state, sample order, micro-batches (at the
same micro-batch size) and per-sample draws (crops, masks, mixup, dropout: keyed by seed, epoch and sample index),
but not the same bits (gradients are reduced in another order; per-rank streams, which only batches without
sample keys draw from, restart).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pickle
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_shards import storage

from .config import ConfigError, signature_diff
from .dist import barrier
from .remote import RunMirror, fetch_run

CKPT_DIR = "checkpoints"
COMPLETE = "complete"
LATEST = "latest"
UNIVERSAL = "universal"
_UNIVERSAL_DONE = "converted"
# DeepSpeed's model-state file names: ZeRO 0-2 write the first, ZeRO-3 one of the second per rank
_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


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
    mirror: RunMirror | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory (complete on return; with a
    `mirror`, complete in the store: every rank's files uploaded before rank 0 uploads the marker)."""
    root = checkpoints_dir(run_dir)
    tag = tag_for(step)
    ckpt = root / tag
    if rank == 0 and ckpt.exists():  # a stale, incomplete save of the same step from a killed run
        shutil.rmtree(ckpt)
    barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"tubelet": marker}, save_latest=False)
    torch.save(rank_state, ckpt / f"rank_{rank:05d}.pt")
    if mirror is not None:
        mirror.push_rank_files(ckpt)
    barrier()  # every rank's files are on disk (in the store) before the checkpoint counts
    if rank == 0:
        tmp = ckpt / f".{COMPLETE}.tmp"
        tmp.write_text(json.dumps({**marker, "step": step}, indent=1, sort_keys=True) + "\n")
        tmp.replace(ckpt / COMPLETE)
        (root / f".{LATEST}.tmp").write_text(tag)
        (root / f".{LATEST}.tmp").replace(root / LATEST)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        if mirror is not None:
            mirror.push_marker(ckpt)
            mirror.prune([p.name for p in complete_checkpoints(run_dir)])
    barrier()
    return ckpt


@dataclass(frozen=True)
class ResumePlan:
    """How this run continues from `ckpt`: what the checkpoint's writer had (`marker`) against now."""

    ckpt: Path
    marker: dict[str, Any]
    world_size: int
    zero_stage: int
    micro_batch_size: int

    @property
    def saved_world_size(self) -> int:
        return int(self.marker["world_size"])

    @property
    def saved_zero_stage(self) -> int:
        return int(self.marker["zero_stage"])

    @property
    def saved_micro_batch_size(self) -> int:
        """Recorded since elastic resume; older checkpoints had it in their signature."""
        m = self.marker
        return int(m.get("micro_batch_size", m.get("signature", {}).get("train.micro_batch_size", 0)))

    @property
    def same_ranks(self) -> bool:
        """Every rank finds its own `rank_N.pt` (RNG states, task state, loader state)."""
        return self.saved_world_size == self.world_size

    @property
    def universal(self) -> bool:
        """ZeRO partitions must be rebuilt: load through DeepSpeed's universal checkpoint."""
        zero = self.zero_stage > 0 or self.saved_zero_stage > 0
        return zero and not (self.same_ranks and self.saved_zero_stage == self.zero_stage)

    @property
    def bit_exact(self) -> bool:
        return not self.universal and self.same_ranks and self.saved_micro_batch_size == self.micro_batch_size

    def describe(self, shown: str | None = None) -> str:
        """The resume log line: where (`shown`: as the user knows it, a URL for a run in a store), from what
        layout to what, and which exactness that keeps."""
        m = self.marker
        where = f"resuming from {shown or self.ckpt} (step {m.get('step')}, epoch {m.get('epoch')}, {m.get('samples')} clips)"
        was = f"{self.saved_world_size} ranks, ZeRO-{self.saved_zero_stage}, micro-batch {self.saved_micro_batch_size}"
        now = f"{self.world_size} ranks, ZeRO-{self.zero_stage}, micro-batch {self.micro_batch_size}"
        if self.bit_exact:
            return f"{where}: same layout ({now}): bit-exact continuation"
        how = (
            "DeepSpeed's universal checkpoint (weights and Adam moments re-partitioned)"
            if self.universal
            else ("DeepSpeed's checkpoint as saved")
        )
        why = ["gradients are reduced in another order"]
        if not self.same_ranks:
            why.insert(
                0,
                "per-rank random streams restart from (seed, rank, step): only batches without sample keys use them",
            )
        return (
            f"{where}: written by {was}, now {now}; model and optimizer state through {how}; the data continues "
            f"at the saved global sample position of the epoch (no sample repeated or skipped): sample-exact, "
            f"not bit-exact ({'; '.join(why)})"
        )


def plan_resume(
    ckpt: Path, signature: dict[str, Any], *, world_size: int, zero_stage: int, micro_batch_size: int
) -> ResumePlan:
    """Refuse a checkpoint whose resume signature (architecture, data, global batch, optimizer shape)
    differs, naming the keys, or that no loader can re-partition; else say how the run continues."""
    marker = read_marker(ckpt)
    diff = signature_diff(marker.get("signature", {}), signature)
    if diff:
        raise ConfigError(
            f"refusing to resume from {ckpt}: its config differs in keys that change the model, data or "
            f"optimizer state:\n  " + "\n  ".join(diff) + "\nRestore those values, or start a new run "
            "(a different train.run_dir) without --resume."
        )
    plan = ResumePlan(ckpt, marker, world_size, zero_stage, micro_batch_size)
    if (plan.saved_zero_stage == 0) != (zero_stage == 0):
        raise ConfigError(
            f"refusing to resume from {ckpt}: it was written with deepspeed.zero_stage={plan.saved_zero_stage}, "
            f"this run has {zero_stage}; ZeRO stages 1-3 re-partition into each other (DeepSpeed's universal "
            "checkpoint), stage 0 keeps a plain optimizer and only resumes as stage 0. Set "
            f"deepspeed.zero_stage={plan.saved_zero_stage}" + (" (or 1-3)" if plan.saved_zero_stage else "")
        )
    return plan


def resolve_resume(resume: str | None, run_dir: Path, shown_as: str | None = None) -> Path | None:
    """`auto`: newest complete checkpoint (or a fresh start); a path: that checkpoint; None: fresh, and a
    run directory that already has checkpoints is refused (so a typo cannot overwrite a run). `shown_as`:
    the run directory's name in messages (its URL when `run_dir` is a local staging copy)."""
    if resume in (None, "", "none", "never"):
        if latest_complete(run_dir) is not None:
            raise ConfigError(
                f"{shown_as or run_dir} already has checkpoints: pass --resume auto to continue that run, or set "
                "train.run_dir to a new directory"
            )
        return None
    if resume == "auto":
        return latest_complete(run_dir)
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint directory (no '{COMPLETE}' marker)")
    return path


@contextlib.contextmanager
def _readable(ckpt: Path) -> Iterator[None]:
    """A checkpoint marked complete whose files no longer read (a disk error, a copy cut short) names
    itself and the way out, instead of a PytorchStreamReader traceback."""
    try:
        yield
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        damaged = not isinstance(e, RuntimeError) or any(w in str(e) for w in ("PytorchStreamReader", "zip"))
        if not damaged:  # e.g. a shape mismatch: not the file's fault
            raise
        older = [c.name for c in complete_checkpoints(ckpt.parent.parent) if c.name < ckpt.name]
        hint = f"--resume {ckpt.parent / older[-1]}" if older else "a fresh run (no older checkpoint)"
        raise ConfigError(
            f"{ckpt}: the checkpoint cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
            f"it may be damaged: resume from the one before it ({hint}), or move it away"
        ) from e


def read_rank_state(ckpt: Path, rank: int) -> dict[str, Any]:
    """A rank's resume state (TrainState, RNG, task, loader): plain tensors and containers only."""
    with _readable(ckpt):
        return torch.load(ckpt / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=True)


def load_engine(engine: Any, ckpt: Path, universal: bool = False) -> None:
    """Collective: restore DeepSpeed's state (weights, ZeRO partitions, optimizer) from `ckpt`, or from its
    universal checkpoint (made by `universal_checkpoint`; the engine was configured with `load_universal`)."""
    if not universal:
        with _readable(ckpt):
            path, _ = engine.load_checkpoint(
                str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=False
            )
    else:
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch AdamW ZeRO wraps
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
        path, _ = engine.load_checkpoint(
            str(ckpt), tag=UNIVERSAL, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        # DeepSpeed 0.19's ZeRO-3 universal load gives every group group 0's hyperparameters (weight decay,
        # lr_scale) and one shared `step` tensor (which each group's update would then advance): ours come
        # from the config, and each group's step is its own.
        for g, h in zip(base.param_groups, hyper):
            g.update(h)
        for st in base.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt}")


def universal_checkpoint(ckpt: Path, rank: int, mirror: RunMirror | None = None) -> Path:
    """Collective: `ckpt/universal`, DeepSpeed's universal checkpoint of `ckpt` (each parameter's fp32
    weights and Adam moments whole), loadable on any number of ranks at ZeRO stage 1, 2 or 3. Rank 0 makes
    it once (kept with the checkpoint for a later restart; retention removes both)."""
    out = ckpt / UNIVERSAL
    failure: Exception | None = None
    if rank == 0 and not (out / _UNIVERSAL_DONE).is_file():
        t0 = time.perf_counter()
        try:
            _convert_to_universal(ckpt, out)
        except Exception as e:  # reach the barrier anyway: the other ranks must not wait for a dead rank 0
            failure = e
        else:
            print(
                f"[tubelet] {ckpt.name}: universal checkpoint written in {time.perf_counter() - t0:.1f}s",
                flush=True,
            )
            if mirror is not None:
                mirror.push_universal(ckpt)
    barrier()
    if failure is not None:
        raise failure
    if mirror is not None and not (out / _UNIVERSAL_DONE).is_file():
        mirror.pull_universal(ckpt)  # made by rank 0 on another machine
    if not (out / _UNIVERSAL_DONE).is_file():
        raise RuntimeError(f"{out}: rank 0 did not finish the universal checkpoint (see its log)")
    return out


@contextlib.contextmanager
def _deepspeed_tool(ckpt: Path, what: str) -> Iterator[None]:
    """Run one of DeepSpeed's offline checkpoint tools quietly: they print their progress (bars, "Processing
    zero checkpoint ...") onto the user's console, in the middle of the training bar. The output is kept and
    shown only when the tool fails, with the checkpoint named."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield
    except Exception as e:
        raise RuntimeError(f"{ckpt}: DeepSpeed's {what} failed: {e}\n{out.getvalue()[-3000:]}") from e


def _convert_to_universal(ckpt: Path, out: Path) -> None:
    """DeepSpeed's `ds_to_universal` into a temporary folder, made loadable by every stage, then renamed."""
    from deepspeed.checkpoint import ds_to_universal

    tmp = ckpt / f".{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(ckpt),
        output_folder=str(tmp),
        num_extract_workers=1,  # in-process: no forked workers in a training process
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our models carry no Megatron-style universal_checkpoint_info
    )
    with _deepspeed_tool(ckpt, "universal conversion"):
        ds_to_universal.main(args)
    (ckpt / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer beside its output
    _loadable_by_every_stage(tmp)
    (tmp / _UNIVERSAL_DONE).write_text(json.dumps({"from": ckpt.name}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _loadable_by_every_stage(folder: Path) -> None:
    """DeepSpeed 0.19 loads a universal checkpoint only into the ZeRO family that wrote it. ZeRO-3 reads
    `zero_pp_rank_0_mp_rank_00_model_states.pt` and a nested `optimizer_state_dict` holding the Adam step;
    ZeRO-1/2 read `mp_rank_00_model_states.pt`, a top-level `ds_version`, and per parameter `{"param":
    tensor}` files plus `step.pt` (ZeRO-3's conversion writes bare flat tensors and no step). Give each what
    it reads; the numbers are the same for every stage."""
    have = [folder / n for n in _MODEL_STATES if (folder / n).is_file()]
    if not have:
        raise RuntimeError(f"{folder}: no model-state file after the universal conversion")
    for name in _MODEL_STATES:
        if not (folder / name).is_file():
            shutil.copy2(have[0], folder / name)
    model_states = _load_own(have[0])
    path = folder / "zero" / "optimizer_state.pt"
    state = _load_own(path)
    state.setdefault("ds_version", model_states["ds_version"])
    if "optimizer_state_dict" not in state:
        step = _load_own(next((folder / "zero").glob("*/step.pt")))
        state["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": state["param_groups"]}
    torch.save(state, path)
    shapes = {k: v for group in model_states["param_shapes"] for k, v in group.items()}
    step = state["optimizer_state_dict"]["state"][0]["step"]
    for name, shape in shapes.items():
        param_dir = folder / "zero" / name
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            value = _load_own(param_dir / f"{key}.pt")
            if torch.is_tensor(value):
                torch.save({"param": value.view(shape)}, param_dir / f"{key}.pt")
        if not (param_dir / "step.pt").is_file():
            torch.save(step, param_dir / "step.pt")


def _load_own(path: Path) -> Any:
    """A file DeepSpeed wrote for this run (it pickles config objects, so not weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def load_unoptimized_state(model: torch.nn.Module, ckpt: Path) -> list[str]:
    """Before DeepSpeed wraps `model` on a re-partitioned resume: what the universal checkpoint does not
    carry -- buffers (batch-norm statistics) and frozen parameters -- from the consolidated checkpoint.
    Returns the names loaded (none: nothing to consolidate, e.g. a fully trained ViT)."""
    from .optim import clean_param_name

    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    wanted = [k for k in model.state_dict() if k not in trained]
    if not wanted:
        return []
    full = consolidated_state_dict(ckpt)
    missing = [k for k in wanted if clean_param_name(k) not in full]
    if missing:
        raise RuntimeError(f"{ckpt}: the consolidated checkpoint lacks {missing[:5]} (of {len(missing)})")
    model.load_state_dict({k: full[clean_param_name(k)] for k in wanted}, strict=False)
    return wanted


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

        with _deepspeed_tool(ckpt, "ZeRO consolidation"):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    from .optim import clean_param_name

    return {clean_param_name(k): v.float() for k, v in sd.items()}


def find_export_checkpoint(run_dir: Path) -> Path:
    ckpt = latest_complete(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint under {checkpoints_dir(run_dir)}")
    return ckpt


def export(run_dir: Path | str, out_dir: Path | str, task: Any) -> Path | str:
    """Consolidate the newest complete checkpoint of `run_dir` into fp32 weights, load them into the task's
    architecture (`build_model`: no starting weights are read) and let the task write its model directory.
    Either may be a URL (the run is fetched into the cache; the directory is written locally, then uploaded)."""
    if storage.is_url(run_dir):
        run_dir = fetch_run(str(run_dir))
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
    with storage.staged_dir(out_dir) as local:
        written = task.export(model, local, extra)
    return out_dir if storage.is_url(out_dir) else written


__all__ = [
    "ResumePlan",
    "complete_checkpoints",
    "consolidated_state_dict",
    "export",
    "latest_complete",
    "load_engine",
    "load_unoptimized_state",
    "plan_resume",
    "read_rank_state",
    "rng_state",
    "save",
    "set_rng_state",
    "universal_checkpoint",
]
