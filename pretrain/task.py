"""Masked-video pretraining as an engine task: the MAE, its masks, its loss, its evaluation and pictures.

`PretrainConfig` = the engine's sections + `model` (architecture), `mask` (masking) and `clip` (how clips
are cut from videos). The engine never sees any of them; it only calls the `Task` methods below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from data_shards.loader import SamplingSpec
from pretrain.engine import ConfigError, EngineConfig, StepOutput, TaskContext, resume_key
from pretrain.models import (
    MAEConfig,
    MaskedVideoAutoencoder,
    VideoViTConfig,
    apply_activation_checkpointing,
    make_mask,
    reconstruct_video,
    save_model,
    training_flops_per_clip,
)


@dataclass
class ModelSection:
    """Encoder preset + overrides and the MAE decoder. `encoder` takes any other VideoViTConfig field."""

    preset: str = resume_key("vit-b")
    img_size: int | None = resume_key(None)
    num_frames: int | None = resume_key(None)
    patch_size: int | None = resume_key(None)
    tubelet_size: int | None = resume_key(None)
    drop_path_rate: float = resume_key(0.0)
    encoder: dict[str, Any] = field(default_factory=dict, metadata={"resume": True})
    decoder_embed_dim: int | None = resume_key(None)
    decoder_depth: int | None = resume_key(None)
    decoder_num_heads: int | None = resume_key(None)
    norm_pix_loss: bool = resume_key(True)
    attn_impl: Literal["auto", "flash_attn", "sdpa", "math"] = "auto"  # numerics only: may change on resume
    activation_checkpointing: str | int = "none"  # "none" | "all" | N first encoder blocks


@dataclass
class MaskSection:
    """Encoder mask (VideoMAE tube / MAE-ST random) and optional VideoMAE V2 decoder mask."""

    kind: Literal["tube", "random"] = resume_key("tube")
    ratio: float = resume_key(0.9)
    decoder_kind: Literal["none", "running_cell"] = resume_key("none")
    decoder_ratio: float = resume_key(0.5)  # fraction of tokens the decoder drops (V2: 0.5)


@dataclass
class ClipSection:
    """Temporal sampling and augmentation (the loader's SamplingSpec; frames and size come from the model)."""

    stride: int = resume_key(4)
    clips_per_video: int = resume_key(1)  # VideoMAE V2 repeated augmentation
    flip: bool = resume_key(True)
    scales: tuple[float, ...] = resume_key((1.0, 0.875, 0.75, 0.66))


@dataclass
class PretrainConfig(EngineConfig):
    model: ModelSection = field(default_factory=ModelSection)
    mask: MaskSection = field(default_factory=MaskSection)
    clip: ClipSection = field(default_factory=ClipSection)

    def validate(self, world_size: int = 1) -> None:
        super().validate(world_size)
        mae = mae_config(self)  # raises ConfigError naming model.* keys
        if not 0 < self.mask.ratio < 1:
            raise ConfigError(f"mask.ratio must be in (0, 1), got {self.mask.ratio}")
        if self.mask.decoder_kind == "running_cell":
            _, h, w = mae.encoder.grid_size
            if h % 2 or w % 2:
                raise ConfigError(f"mask.decoder_kind=running_cell needs an even token grid, got {h}x{w}")
            if self.mask.decoder_ratio not in (0.25, 0.5, 0.75):
                raise ConfigError("mask.decoder_ratio must be 0.25, 0.5 or 0.75 for running_cell")
        if self.train.micro_batch_size % self.clip.clips_per_video:
            raise ConfigError(
                f"train.micro_batch_size={self.train.micro_batch_size} must be a multiple of "
                f"clip.clips_per_video={self.clip.clips_per_video} (each video yields that many clips)"
            )
        ac = self.model.activation_checkpointing
        if not (ac in ("none", "all") or (isinstance(ac, int) and ac >= 0)):
            raise ConfigError(
                f"model.activation_checkpointing must be 'none', 'all' or an int >= 0, got {ac!r}"
            )


def encoder_overrides(model_section: Any) -> dict[str, Any]:
    """A `model` section's encoder overrides: `model.encoder` (keys checked against VideoViTConfig, a
    wrong one named) plus the geometry keys set directly on the section. Both stages' sections use it."""
    m = model_section
    fields = {f.name for f in dataclasses.fields(VideoViTConfig)}
    unknown = sorted(set(m.encoder) - fields)
    if unknown:
        raise ConfigError(f"unknown key model.encoder.{unknown[0]}; valid keys: {sorted(fields)}")
    overrides = dict(m.encoder)
    for name in ("img_size", "num_frames", "patch_size", "tubelet_size"):
        if getattr(m, name) is not None:
            overrides[name] = getattr(m, name)
    return overrides


def mae_config(cfg: PretrainConfig) -> MAEConfig:
    """The MAEConfig the `model` section describes (preset + overrides), with config errors named."""
    m = cfg.model
    overrides = encoder_overrides(m)
    overrides.update(drop_path_rate=m.drop_path_rate, attn_impl=m.attn_impl)
    try:
        mae = MAEConfig.from_preset(m.preset, **overrides)
        dec = {k: getattr(m, f"decoder_{k}") for k in ("embed_dim", "depth", "num_heads")}
        dec = {f"decoder_{k}": v for k, v in dec.items() if v is not None}
        return dataclasses.replace(mae, norm_pix_loss=m.norm_pix_loss, **dec)
    except KeyError as e:
        raise ConfigError(f"model.preset: {e.args[0]}") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from e


class MaskedVideoTask:
    """VideoMAE pretraining: masks from an explicit per-rank generator (checkpointed), norm-pix MSE."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.mae_cfg = mae_config(cfg)
        self.grid = self.mae_cfg.encoder.grid_size
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.seed, self.rank = cfg.train.seed, 0
        self.generator = torch.Generator().manual_seed(cfg.train.seed)

    # -- engine protocol ---------------------------------------------------------------------------
    def setup(self, ctx: TaskContext) -> None:
        self.device, self.seed, self.rank = ctx.device, ctx.seed, ctx.rank
        ds = self.cfg.deepspeed
        self.dtype = torch.bfloat16 if ds.bf16 else torch.float16 if ds.fp16 else torch.float32
        self.generator = torch.Generator().manual_seed(_mix(ctx.seed, ctx.rank))

    def build_model(self) -> nn.Module:
        model = MaskedVideoAutoencoder(self.mae_cfg)
        apply_activation_checkpointing(model, self.cfg.model.activation_checkpointing)
        # ZeRO-3 re-gathers a module's own parameters (here `mask_token`) for backward through hooks on
        # the module's output tensors, and it finds tensors only in tuples/lists/dicts — not in the
        # MAEOutput dataclass. Hand it a dict that still reads like the dataclass (registered before
        # DeepSpeed's own hooks, so they see the dict).
        model.register_forward_hook(_output_as_fields)
        return model

    def sampling_spec(self, split: str, train: bool) -> SamplingSpec:
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

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        video_BCTHW = batch["video"].to(self.device, self.dtype)
        mask_BN, dec_BN = self.masks(video_BCTHW.shape[0], self.generator)
        out = model(video_BCTHW, mask_BN, dec_BN)
        return StepOutput(out.loss, {})

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Mean reconstruction loss over the val clips (padding duplicates excluded), fixed masks."""
        gen = torch.Generator().manual_seed(_mix(self.seed, self.rank, 1))
        total, count = 0.0, 0
        for batch in batches:
            video = batch["video"].to(self.device, self.dtype)
            mask, dec = self.masks(video.shape[0], gen)
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
        gen = torch.Generator().manual_seed(_mix(self.seed, self.rank, 2))
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

    def tokens_per_sample(self) -> int:
        return self.mae_cfg.encoder.num_patches

    def state_dict(self) -> dict[str, Any]:
        return {"mask_generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["mask_generator"])

    def export(self, model: nn.Module, out_dir: Path, extra: dict[str, Any]) -> Path:
        return save_model(model, out_dir, extra)


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


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (seed, rank, purpose) without collisions between small inputs."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


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
