"""The data path of both stages: a `data` config section + the task's sampling spec → a shard loader.

Tasks call these from their `train_loader` / `val_loader` hooks; the engine never imports `data_shards`.
"""

from __future__ import annotations

from typing import Any

from data_shards.format import FormatError, load_manifest
from data_shards.loader import LoaderError, SamplingSpec, VideoLoader, build_loader
from pretrain.config import DataSection
from pretrain.engine import TaskContext

# What bad data raises (a folder that is not a shard set, a split it lacks, a truncated shard, too many
# undecodable samples): each names the file, so the training commands print it in one line (exit 2).
DATA_ERRORS: tuple[type[Exception], ...] = (FormatError, LoaderError)


def micro_batch_key(batch: dict[str, Any]) -> tuple[int, int, int] | None:
    """(epoch, global index of the first sample, clips) of a loader batch: what keys a task's per-micro-batch
    draws (Mixup/CutMix, dropout, drop-path). The loader deals the same micro-batches to 2 ranks as to 1 rank's
    2 accumulation steps, so the key does not depend on the layout. None for a batch without sample keys."""
    if "index" not in batch or "epoch" not in batch or len(batch["index"]) == 0:
        return None
    return int(batch["epoch"][0]), int(batch["index"][0]), len(batch["index"])


def has_split(data: DataSection, split: str | None) -> bool:
    """Whether `split` exists and has samples (always, for the synthetic backend without shards)."""
    if not split:
        return False
    if data.backend == "synthetic" or data.shards is None:
        return True
    info = load_manifest(data.shards).splits.get(split)
    return info is not None and info.samples > 0


def make_loader(
    data: DataSection,
    split: str,
    spec: SamplingSpec,
    ctx: TaskContext,
    batch_size: int,
    *,
    epoch: int = 0,
    batches_per_step: int = 1,
    **selection: Any,
) -> VideoLoader:
    """This rank's loader over `split` (train: shuffled, remainder dropped; eval: every sample once,
    padded). `selection` passes a subset through (`keys=`, `labels=`: see `build_loader`)."""
    kwargs: dict[str, Any] = dict(
        batch_size=batch_size,
        spec=spec,
        backend=data.backend,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=ctx.seed,
        device=ctx.device,
        num_workers=data.num_workers,
        drop_last=spec.train,
        max_skip_fraction=data.max_skip_fraction,
        epoch=epoch,
        cache_dir=data.cache_dir,
        cache_bytes=data.cache_bytes,
        batches_per_step=batches_per_step,
        **selection,
    )
    if data.backend == "synthetic" and data.shards is None:
        kwargs["num_samples"] = data.synthetic_size
    return build_loader(data.shards or "", split, **kwargs)


def why_no_validation(data: DataSection) -> str:
    """Why `val_loader` gives nothing: the val split, and the splits the shards have."""
    splits = sorted(load_manifest(data.shards).splits) if data.shards else []
    if not data.val_split:
        return "data.val_split is null"
    if data.val_split in splits:
        return f"data.val_split={data.val_split} has no samples"
    return f"data.val_split={data.val_split} is not a split of {data.shards} (it has: {', '.join(splits) or 'none'})"


def val_loader(
    data: DataSection, spec: SamplingSpec, ctx: TaskContext, batch_size: int
) -> VideoLoader | None:
    """The val split's loader, or None when there is no val split (no evaluation during training)."""
    if not has_split(data, data.val_split):
        return None
    assert data.val_split is not None
    return make_loader(data, data.val_split, spec, ctx, batch_size)


class ShardData:
    """The `train_loader` / `val_loader` hooks of a task whose config has a `data` section (and a
    `train.micro_batch_size`) and which says what to sample with `sampling_spec(train)`: both stages' tasks
    mix it in, so the data path is written once."""

    cfg: Any

    def sampling_spec(self, train: bool) -> SamplingSpec:
        raise NotImplementedError

    def train_loader(self, ctx: TaskContext, epoch: int) -> VideoLoader:
        d, t = self.cfg.data, self.cfg.train
        accum = max(1, t.global_batch_size // (t.micro_batch_size * ctx.world_size))
        spec = self.sampling_spec(True)
        return make_loader(
            d, d.train_split, spec, ctx, t.micro_batch_size, epoch=epoch, batches_per_step=accum
        )

    def val_loader(self, ctx: TaskContext) -> VideoLoader | None:
        """The val split's loader; a val split named but absent is said once (on rank 0), not skipped
        silently: a typo there would leave a whole run without validation."""
        loader = val_loader(self.cfg.data, self.sampling_spec(False), ctx, self.cfg.train.micro_batch_size)
        if loader is None and ctx.is_main and self.needs_validation():
            print(self.no_validation_warning(ctx.run_dir), flush=True)
        return loader

    def needs_validation(self) -> bool:
        """Whether a run without validation is worth a warning: here, when a val split is named and
        evaluation is on (a pretraining run may well have no val split)."""
        return bool(self.cfg.train.eval_every and self.cfg.data.val_split)

    def no_validation_warning(self, run_dir: Any) -> str:
        return f"[tubelet] warning: no validation ({why_no_validation(self.cfg.data)}): no val/loss is computed"
