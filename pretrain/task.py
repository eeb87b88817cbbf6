"""Masked-video pretraining as an engine task: the MAE, its data, masks, loss, evaluation and pictures.

The config (`pretrain/config.py`: `PretrainConfig`) adds `data`, `model`, `mask` and `clip` to the engine's
sections; the engine never sees them, it only calls the `Task` hooks below.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_shards.loader import SamplingSpec
from pretrain.config import PretrainConfig
from pretrain.data import ShardData, micro_batch_key
from pretrain.engine import StepOutput, Task, TaskContext, keyed_rng, mix_seed
from pretrain.models import (
    MaskedVideoAutoencoder,
    apply_activation_checkpointing,
    compile_model,
    keyed_mask,
    make_mask,
    reconstruct_video,
    save_model,
    training_flops_per_clip,
)
from pretrain.models.io import write_run_model


class MaskedVideoTask(ShardData, Task):
    """VideoMAE pretraining: per-sample masks keyed by (seed, epoch, sample index, view), norm-pix MSE.

    A clip's mask is a function of its key only (`keyed_masks`), so 2 ranks, 1 rank with 2 accumulation
    steps, 2 nodes and an elastic resume draw the same masks. Batches without "index" (a custom loader)
    fall back to the per-rank generator `self.generator` (checkpointed; `reseed` after a world-size change)."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.mae_cfg = cfg.model.mae_config()
        self.grid = self.mae_cfg.encoder.grid_size
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.seed, self.rank = cfg.train.seed, 0
        self.generator = torch.Generator().manual_seed(cfg.train.seed)

    # -- engine hooks ------------------------------------------------------------------------------
    def setup(self, ctx: TaskContext) -> None:
        super().setup(ctx)
        self.device, self.seed, self.rank = ctx.device, ctx.seed, ctx.rank
        ds = self.cfg.deepspeed
        self.dtype = torch.bfloat16 if ds.bf16 else torch.float16 if ds.fp16 else torch.float32
        self.generator = torch.Generator().manual_seed(mix_seed(ctx.seed, ctx.rank))
        if ctx.is_main:  # what `load_source(run_dir)` reads: a fine-tune can start from this run
            write_run_model(self.mae_cfg, ctx.run_dir)

    def build_model(self) -> nn.Module:
        model = MaskedVideoAutoencoder(self.mae_cfg)
        apply_activation_checkpointing(model, self.cfg.model.activation_checkpointing)
        if self.cfg.model.compile:
            compile_model(model)
        # ZeRO-3 re-gathers a module's own parameters (here `mask_token`) for backward through hooks on
        # the module's output tensors, and it finds tensors only in tuples/lists/dicts — not in the
        # MAEOutput dataclass. Hand it a dict that still reads like the dataclass (registered before
        # DeepSpeed's own hooks, so they see the dict).
        model.register_forward_hook(_output_as_fields)
        return model

    def sampling_spec(self, train: bool) -> SamplingSpec:
        enc, c = self.mae_cfg.encoder, self.cfg.clip
        mean = self.mae_cfg.pixel_mean or (0.0, 0.0, 0.0)
        std = self.mae_cfg.pixel_std or (1.0, 1.0, 1.0)
        return SamplingSpec(
            frames=enc.num_frames,
            stride=c.stride,
            size=enc.img_size,
            clips_per_video=c.clips_per_video if train else 1,
            train=train,
            mean=tuple(mean),
            std=tuple(std),
            scales=tuple(c.scales),
            flip=c.flip,
        )

    def masks(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.cfg.mask
        enc_mask = make_mask(m.kind, batch, self.grid, m.ratio, generator).to(self.device)
        dec_mask = None
        if m.decoder_kind != "none":
            dec_mask = make_mask(m.decoder_kind, batch, self.grid, m.decoder_ratio, generator).to(self.device)
        return enc_mask, dec_mask

    def keyed_masks(self, batch: dict[str, Any], purpose: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder (and decoder) masks, one per clip, each from its own key (seed, purpose, epoch, global
        sample index, view): independent of the rank, micro-batch and resume point the clip comes in."""
        m = self.cfg.mask
        keys = zip(batch["epoch"].tolist(), batch["index"].tolist(), batch["view"].tolist())
        base = [mix_seed(self.seed, _MASK_SALT, purpose, e, i, v) for e, i, v in keys]
        enc_mask = keyed_mask(m.kind, [mix_seed(b, 0) for b in base], self.grid, m.ratio).to(self.device)
        dec_mask = None
        if m.decoder_kind != "none":
            seeds = [mix_seed(b, 1) for b in base]
            dec_mask = keyed_mask(m.decoder_kind, seeds, self.grid, m.decoder_ratio).to(self.device)
        return enc_mask, dec_mask

    def batch_masks(
        self, batch: dict[str, Any], purpose: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`keyed_masks` when the batch carries sample keys (every loader of `data_shards`), else drawn
        from `generator`."""
        if all(k in batch for k in ("index", "epoch", "view")):
            return self.keyed_masks(batch, purpose)
        return self.masks(int(batch["video"].shape[0]), generator)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        video_BCTHW = batch["video"].to(self.device, self.dtype)
        mask_BN, dec_BN = self.batch_masks(batch, 0, self.generator)
        key = micro_batch_key(batch)  # drop-path keyed by the micro-batch (the masks by the clip)
        with keyed_rng(mix_seed(self.seed, 0xD7, *key), self.device) if key else contextlib.nullcontext():
            out = model(video_BCTHW, mask_BN, dec_BN)
        return StepOutput(out.loss, {})

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Mean reconstruction loss over the val clips (padding duplicates excluded), fixed masks: each clip's
        from (seed, its sample index, view), the same at every evaluation and on any number of ranks."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, 1))
        total, count = 0.0, 0
        for batch in batches:
            video = batch["video"].to(self.device, self.dtype)
            fixed = {**batch, "epoch": torch.zeros_like(batch["index"])} if "index" in batch else batch
            mask, dec = self.batch_masks(fixed, 1, gen)
            out = model(video, mask, dec)
            err_BM = (out.pred.float() - out.target.float()).pow(2).mean(-1)
            w_BM = out.loss_weight.float()
            per_clip = (err_BM * w_BM).sum(1) / w_BM.sum(1).clamp_min(1.0)
            keep = (
                ~batch["pad"].to(per_clip.device)
                if "pad" in batch
                else torch.ones_like(per_clip, dtype=torch.bool)
            )
            total += float(per_clip[keep].sum())
            count += int(keep.sum())
        return {"recon_loss": total / max(count, 1)}

    def visualize(self, model: nn.Module, batch: dict[str, Any], out_dir: Path | None) -> list[Path]:
        """Original / masked / reconstruction frames of the batch's first clip as one PNG."""
        video = batch["video"][:1].to(self.device, self.dtype)
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, 2))
        mask, dec = self.masks(1, gen)
        out = model(video, mask, dec)
        if out_dir is None:
            return []
        frames = reconstruct_video(out, video.float(), self.mae_cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        key = batch.get("key", ["clip"])[0]
        path = out_dir / "reconstruction.png"
        _plot_reconstruction(frames, path, title=str(key))
        return [path]

    def flops_per_sample(self) -> float:
        m = self.cfg.mask
        keep = 1.0 - m.decoder_ratio if m.decoder_kind != "none" else None
        return float(training_flops_per_clip(self.mae_cfg, m.ratio, keep))

    def tokens_per_sample(self) -> float:
        return float(self.mae_cfg.encoder.num_patches)

    def state_dict(self) -> dict[str, Any]:
        return {"mask_generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["mask_generator"])

    def reseed(self, step: int) -> None:
        self.generator.manual_seed(mix_seed(self.seed, self.rank, 3, step))

    def export(self, model: nn.Module, out_dir: Path, extra: dict[str, Any]) -> Path:
        return save_model(model, out_dir, extra)


_MASK_SALT = 0x3A5C  # keyed masks' own stream: (seed, salt, purpose, epoch, index, view)


class OutputFields(dict):
    """A dict with attribute access: `out.loss` and `out["loss"]` both work."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


def _output_as_fields(module: nn.Module, args: Any, output: Any) -> Any:
    if dataclasses.is_dataclass(output):
        return OutputFields({f.name: getattr(output, f.name) for f in dataclasses.fields(output)})
    return output


def _plot_reconstruction(frames: Any, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        ("original", frames.original[0]),
        ("masked", frames.masked[0]),
        ("reconstruction", frames.reconstruction[0]),
    ]
    t = rows[0][1].shape[1]
    cols = list(range(0, t, max(1, t // 8)))[:8]
    fig, axes = plt.subplots(3, len(cols), figsize=(1.6 * len(cols), 5.2), squeeze=False)
    for r, (name, video_CTHW) in enumerate(rows):
        for c, ti in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(video_CTHW[:, ti].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
            if r == 0:
                ax.set_title(f"t={ti}", fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
