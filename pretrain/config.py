"""The stages' config sections: `data` and `model` (shared by pretraining and fine-tuning), and
`PretrainConfig` = the engine's sections + `data`, `model` (the MAE), `mask`, `clip`.

Fine-tuning extends `ModelSection` and reuses `DataSection` (finetune/config.py); neither stage parses the
other's YAML: a fine-tune reads a pretraining run through `pretrain.sources.load_source`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from data_shards import storage
from pretrain.engine import ConfigError, EngineConfig, require, resume_key
from pretrain.models import MAEConfig, VideoViTConfig


@dataclass
class DataSection:
    """Where the shards are and how to read them; *what* to sample (frames, size) comes from the model."""

    shards: str | None = None  # shard folder (manifest.json); None only with backend=synthetic
    # auto: DALI where it decodes the shards' codecs on this device, else PyAV
    backend: Literal["auto", "dali", "pyav", "synthetic"] = resume_key("auto")
    train_split: str = resume_key("train")  # the manifest's split to train on
    val_split: str | None = "val"  # None or a split absent from the manifest: no evaluation
    num_workers: int = 2  # PyAV: decoding processes per rank (0: in the training process)
    max_skip_fraction: float = 0.01  # undecodable samples are skipped, counted; above this share: stop
    synthetic_size: int = 256  # clips per epoch for backend=synthetic
    cache_dir: str | None = None  # shards at a URL: a local cache of the samples read (None: no cache)
    cache_bytes: int = 20 * 2**30  # the cache's bound on disk (least recently used samples go first)

    def check(self) -> None:
        require(
            self.shards is not None or self.backend == "synthetic",
            "data.shards is not set: point it at a shard folder or set data.backend=synthetic",
        )
        require(0 <= self.max_skip_fraction <= 1, "data.max_skip_fraction must be in [0, 1]")
        require(self.num_workers >= 0, "data.num_workers must be >= 0")
        require(self.cache_bytes > 0, "data.cache_bytes must be > 0 (bytes)")
        if self.shards and self.backend != "synthetic":
            storage.check_access(self.shards)  # a missing bucket or refused credentials: now, not in a loader


@dataclass
class ModelSection:
    """The video encoder both stages build: a preset plus overrides. `encoder` takes any other
    `VideoViTConfig` field; the geometry keys may also be set directly on the section."""

    preset: str = resume_key("vit-b")  # vit-tiny | vit-s | vit-b | vit-l | vit-h | vit-g | tiny (CPU demo)
    img_size: int | None = resume_key(None)  # None: the preset's (224)
    num_frames: int | None = resume_key(None)  # frames per clip; None: the preset's (16)
    patch_size: int | None = resume_key(None)  # pixels per token side; None: the preset's (16)
    tubelet_size: int | None = resume_key(None)  # frames per token; None: the preset's (2)
    # any other VideoViTConfig field, e.g. {depth: 6}
    encoder: dict[str, Any] = field(default_factory=dict, metadata={"resume": True})
    drop_path_rate: float = resume_key(0.0)  # stochastic depth, rising linearly to this over the blocks
    attn_impl: Literal["auto", "flash_attn", "sdpa", "math"] = "auto"  # numerics only: may change on resume
    activation_checkpointing: str | int = "none"  # "none" | "all" | N first encoder blocks
    compile: bool = False  # torch.compile per transformer block (whole model for CNNs); same function

    def encoder_overrides(self, config_cls: type = VideoViTConfig) -> dict[str, Any]:
        """`model.encoder` (keys checked against the encoder's config class) plus the geometry keys set on
        the section (a CNN backbone takes only img_size / num_frames)."""
        fields = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(self.encoder) - fields)
        require(
            not unknown,
            f"unknown key model.encoder.{unknown[0] if unknown else ''}; valid keys: {sorted(fields)}",
        )
        overrides = dict(self.encoder)
        for name in ("img_size", "num_frames", "patch_size", "tubelet_size"):
            if getattr(self, name) is not None:
                require(name in fields, f"model.{name} does not apply to this backbone (a CNN has no {name})")
                overrides[name] = getattr(self, name)
        return overrides

    def check(self) -> None:
        ac = self.activation_checkpointing
        require(
            ac in ("none", "all") or (isinstance(ac, int) and ac >= 0),
            f"model.activation_checkpointing must be 'none', 'all' or an int >= 0, got {ac!r}",
        )
        require(
            0 <= self.drop_path_rate < 1, f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}"
        )


@dataclass
class MAESection(ModelSection):
    """Pretraining's model: the encoder plus VideoMAE's narrow decoder (None = the preset's pairing)."""

    decoder_embed_dim: int | None = resume_key(None)  # None: the preset's
    decoder_depth: int | None = resume_key(None)  # None: the preset's
    decoder_num_heads: int | None = resume_key(None)  # None: the preset's
    norm_pix_loss: bool = resume_key(True)  # target: each patch normalized by its own mean/std (VideoMAE)

    def mae_config(self) -> MAEConfig:
        """The MAEConfig this section describes, with config errors naming `model.*` keys."""
        overrides = self.encoder_overrides()
        overrides.update(drop_path_rate=self.drop_path_rate, attn_impl=self.attn_impl)
        try:
            mae = MAEConfig.from_preset(self.preset, **overrides)
            dec = {k: getattr(self, f"decoder_{k}") for k in ("embed_dim", "depth", "num_heads")}
            dec = {f"decoder_{k}": v for k, v in dec.items() if v is not None}
            return dataclasses.replace(mae, norm_pix_loss=self.norm_pix_loss, **dec)
        except KeyError as e:
            raise ConfigError(f"model.preset: {e.args[0]}") from e
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from e


@dataclass
class MaskSection:
    """Encoder mask (VideoMAE tube / MAE-ST random) and optional VideoMAE V2 decoder mask."""

    # tube: one 2-D mask for all frames (VideoMAE); random: per token (MAE-ST)
    kind: Literal["tube", "random"] = resume_key("tube")
    ratio: float = resume_key(0.9)  # share of tokens hidden from the encoder
    # running_cell: VideoMAE V2 dual masking
    decoder_kind: Literal["none", "running_cell"] = resume_key("none")
    decoder_ratio: float = resume_key(0.5)  # fraction of tokens the decoder drops (V2: 0.5)

    def check(self, mae: MAEConfig) -> None:
        require(0 < self.ratio < 1, f"mask.ratio must be in (0, 1), got {self.ratio}")
        if self.decoder_kind == "running_cell":
            _, h, w = mae.encoder.grid_size
            require(
                not (h % 2 or w % 2), f"mask.decoder_kind=running_cell needs an even token grid, got {h}x{w}"
            )
            require(
                self.decoder_ratio in (0.25, 0.5, 0.75),
                "mask.decoder_ratio must be 0.25, 0.5 or 0.75 for running_cell",
            )


@dataclass
class ClipSection:
    """Temporal sampling and augmentation (the loader's SamplingSpec; frames and size come from the model)."""

    stride: int = resume_key(4)  # frames between sampled frames
    clips_per_video: int = resume_key(1)  # VideoMAE V2 repeated augmentation
    flip: bool = resume_key(True)  # random horizontal flip
    # multi-scale crop: box sides as fractions of the short side
    scales: tuple[float, ...] = resume_key((1.0, 0.875, 0.75, 0.66))

    def check(self, micro_batch_size: int) -> None:
        require(
            self.stride >= 1 and self.clips_per_video >= 1,
            "clip.stride and clip.clips_per_video must be >= 1",
        )
        require(
            micro_batch_size % self.clips_per_video == 0,
            f"train.micro_batch_size={micro_batch_size} must be a multiple of clip.clips_per_video="
            f"{self.clips_per_video} (each video yields that many clips)",
        )


@dataclass
class PretrainConfig(EngineConfig):
    data: DataSection = field(default_factory=DataSection)
    model: MAESection = field(default_factory=MAESection)
    mask: MaskSection = field(default_factory=MaskSection)
    clip: ClipSection = field(default_factory=ClipSection)

    def validate(self, world_size: int = 1) -> None:
        super().validate(world_size)
        self.data.check()
        self.model.check()
        self.mask.check(self.model.mae_config())  # also raises ConfigError naming model.* keys
        self.clip.check(self.train.micro_batch_size)


__all__ = ["ClipSection", "DataSection", "MAESection", "MaskSection", "ModelSection", "PretrainConfig"]
