"""Starting points: how a later stage sees an earlier one.

`load_source(path)` reads a training run directory (its `model.json` + newest complete checkpoint,
consolidated in fp32), a model directory, or a Hugging Face VideoMAE directory, local or at a URL, each as (architecture,
config, weights in our parameter names); `read_source` is the same without the weights. It sits above the
models (which know neither checkpoints nor runs) and the engine's checkpoint code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from data_shards import storage
from pretrain.engine import checkpoint as ckpt_io
from pretrain.engine.remote import fetch_run
from pretrain.models import VideoViTConfig
from pretrain.models.hf import config_from_hf_dir, from_hf
from pretrain.models.io import ARCHITECTURES, CONFIG_NAME, RUN_MODEL_NAME, load_model, read_model_config

SourceKind = Literal["run", "model", "hf"]


@dataclass
class Source:
    """A starting point: what kind of directory, the architecture it holds, its config, its weights
    (`state_dict`, our parameter names; None when only the config was read), and where the user said it is
    (`location`: the URL of a starting point in a store, whose `path` is its local copy)."""

    path: Path
    kind: SourceKind
    architecture: str
    config: Any
    location: str
    state_dict: dict[str, torch.Tensor] | None = None

    @property
    def encoder(self) -> VideoViTConfig:
        return self.config if isinstance(self.config, VideoViTConfig) else self.config.encoder


def local_source(path: str | Path) -> Path:
    """A starting point as a local directory: itself, or for a URL a copy in the local cache (a model
    directory whole; a run directory's small files and newest complete checkpoint)."""
    if not storage.is_url(path):
        return Path(path)
    if storage.isfile(storage.join(path, CONFIG_NAME)):
        return storage.local_copy(path, "models")
    if storage.isfile(storage.join(path, RUN_MODEL_NAME)):
        return fetch_run(str(path))
    raise FileNotFoundError(
        f"{path}: not a model directory ({CONFIG_NAME}) or a training run directory ({RUN_MODEL_NAME})"
    )


def run_to_export(run_dir: str | Path, out_dir: str | Path, task: str) -> Path:
    """The local copy of a training run to export, after the checks a user's two paths need: `run_dir` is a
    training run of this stage (`task`: "pretrain" or "classification", as the architectures record; the
    other stage's run names its own export command), and `out_dir` is new, empty or a model directory to
    replace: never a folder of other files, nor the run itself."""
    if not storage.is_url(run_dir) and not (Path(run_dir) / RUN_MODEL_NAME).is_file():
        raise FileNotFoundError(
            f"{run_dir}: not a training run directory ({RUN_MODEL_NAME} + checkpoints/, what a "
            "`python -m pretrain` / `python -m finetune` run writes in train.run_dir)"
        )
    run = local_source(run_dir)
    arch, _, _ = read_model_config(run / RUN_MODEL_NAME)
    if ARCHITECTURES[arch][2] != task:
        other = "pretrain" if ARCHITECTURES[arch][2] == "pretrain" else "finetune"
        raise ValueError(f"{run_dir}: a {other} run ({arch}): export it with `python -m {other} export`")
    if not storage.is_url(out_dir):
        out = Path(out_dir)
        if out.exists() and out.resolve() == Path(run_dir).resolve():
            raise ValueError(f"{out_dir}: the run directory itself; give a new folder for the model")
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out_dir}: a file; give a new folder for the model")
        if out.is_dir() and any(out.iterdir()) and not (out / "model.safetensors").is_file():
            raise ValueError(
                f"{out_dir}: a folder of other files (no model.safetensors); give a new or empty folder, "
                "or a model directory to replace"
            )
    return run


def source_kind(path: str | Path) -> SourceKind:
    """'run' (a training run: model.json + checkpoints/), 'model' (tubelet model dir) or 'hf' (HF VideoMAE)."""
    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        return "model" if "architecture" in json.loads((p / CONFIG_NAME).read_text()) else "hf"
    if (p / RUN_MODEL_NAME).is_file() and (p / "checkpoints").is_dir():
        return "run"
    raise FileNotFoundError(
        f"{p}: not a model directory (config.json), an HF VideoMAE directory, or a training run directory "
        f"({RUN_MODEL_NAME} + checkpoints/)"
    )


def read_source(path: str | Path) -> Source:
    """The starting point's architecture and config, without reading weights (a URL is fetched first)."""
    local = Path(local_source(path))
    kind = source_kind(local)
    if kind == "hf":
        arch, cfg = config_from_hf_dir(local)
    else:
        arch, cfg, _ = read_model_config(local / (RUN_MODEL_NAME if kind == "run" else CONFIG_NAME))
    return Source(local, kind, arch, cfg, location=str(path))


def load_source(path: str | Path) -> Source:
    """`read_source` plus the weights: a run directory's newest complete checkpoint (consolidated in fp32,
    as `python -m pretrain export` does), a model directory's safetensors, or an HF directory converted."""
    src = read_source(path)
    if src.kind == "run":
        src.state_dict = ckpt_io.consolidated_state_dict(ckpt_io.find_export_checkpoint(src.path))
    elif src.kind == "model":
        src.state_dict = dict(load_model(src.path).state_dict())
    else:
        src.state_dict = dict(from_hf(src.path).state_dict())
    return src
