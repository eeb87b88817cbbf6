"""Fine-tuning config: the engine's sections + `data` + `model` (the classifier) + `finetune` (starting point
and PEFT method: one section, the one `apply_method` takes) + `augment` + `eval`.

The starting point is read through `pretrain.sources.read_source` (a pretraining run, a model directory or
an HF VideoMAE directory); this stage never parses the other stage's YAML.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from finetune.peft_methods import FinetuneSection
from pretrain.config import DataSection, ModelSection
from pretrain.engine import ConfigError, EngineConfig, require, resume_key
from pretrain.engine.config import OptimConfig
from pretrain.models import BackboneClassifierConfig, VideoClassifierConfig, VideoViTConfig, backbone_config
from pretrain.models.audio import AudioBranchConfig
from pretrain.models.hf import HF_FIXED_NORM_EPS
from pretrain.sources import Source, read_source

BACKBONE_NAMES = ("vit", "r2plus1d", "r3d", "mc3", "cnn_rnn", "tada2d")
DYNAMIC_BACKBONES = ("r2plus1d", "r3d", "mc3")  # the video ResNets take model.dynamic
# What `optim.lr: auto` / `optim.layer_decay: auto` become, per backbone family (measured on the demo set,
# tests/bench/bench_finetune.py): a transformer fine-tunes at 1e-3 with layer decay 0.75; the CNNs train
# from scratch or fine-tune every layer at one, higher rate (at 1e-3 / 0.75 their stems starve).
FAMILY_OPTIM: dict[str, dict[str, float]] = {
    "vit": {"lr": 1e-3, "layer_decay": 0.75},
    "cnn": {"lr": 3e-3, "layer_decay": 1.0},
}


def backbone_family(backbone: str) -> str:
    return "vit" if backbone == "vit" else "cnn"


@dataclass
class FinetuneOptim(OptimConfig):
    """The engine's optimizer section; `lr` and `layer_decay` may be `auto`: the backbone family's recipe
    (`FAMILY_OPTIM`), so switching `model.backbone` does not keep a rate tuned for another family.
    `lr: null` is the engine's linear scaling rule (base_lr × global batch / base_batch_size)."""

    # peak learning rate; auto: the backbone family's (ViT 1e-3, CNNs 3e-3); null: the linear scaling rule
    lr: float | Literal["auto"] | None = "auto"  # type: ignore[assignment]
    # <1: layer-wise LR decay from the head down; auto: the family's (ViT 0.75, CNNs 1.0)
    layer_decay: float | Literal["auto"] = resume_key("auto")  # type: ignore[assignment]

    def resolve_auto(self, backbone: str) -> str | None:
        """Replace `auto` values by the family's; returns a line saying which were chosen (None: none)."""
        family = backbone_family(backbone)
        chosen = {k: v for k, v in FAMILY_OPTIM[family].items() if getattr(self, k) == "auto"}
        for k, v in chosen.items():
            setattr(self, k, v)
        if not chosen:
            return None
        values = " ".join(f"optim.{k}={v:g}" for k, v in chosen.items())
        return f"{values}: the {family} backbones' recipe (auto; set them to override)"


@dataclass
class ClassifierSection(ModelSection):
    """The classifier: a backbone + a linear head. An `init` brings its architecture; `preset`, geometry and
    `encoder` overrides apply to scratch runs. ViT-only: drop_path_rate, attn_impl, use_mean_pooling,
    activation_checkpointing, patch/tubelet size. cnn_rnn-only: rnn, bidirectional, temporal_pool.
    r2plus1d / r3d / mc3 only: dynamic (their block convs; `model.encoder.dynamic_kernels` etc. tune it)."""

    # vit | r2plus1d | r3d | mc3 | cnn_rnn | tada2d (an init brings its own)
    backbone: Literal[BACKBONE_NAMES] = resume_key("vit")  # type: ignore[valid-type]
    preset: str = resume_key("tiny")  # scratch only; CNNs: tiny | 18 (cnn_rnn: tiny | resnet18; tada2d: +50)
    drop_path_rate: float = resume_key(0.1)  # stochastic depth (ViT)
    num_classes: int | None = resume_key(None)  # None: the shard manifest's classes
    # ViT: mean of the tokens + fc_norm (False: final norm of the mean)
    use_mean_pooling: bool = resume_key(True)
    head_dropout: float = resume_key(0.0)  # dropout before the linear head
    rnn: Literal["gru", "lstm"] | None = resume_key(None)  # None: the preset's (GRU)
    bidirectional: bool | None = resume_key(None)  # cnn_rnn: None = the preset's (one direction)
    temporal_pool: Literal["mean", "last"] | None = resume_key(None)  # over the RNN's outputs
    dynamic: Literal["none", "kernel_mixture", "selective_kernel"] | None = resume_key(None)  # None: static
    # what a label means (finetune/heads.py); auto: the shards' kind (single → single_label, multi →
    # multi_label, segments → temporal: logits per time step)
    # av_sync: is the sound in sync with the picture, and by which of `audio.offsets` is it off
    head: Literal["auto", "single_label", "multi_label", "temporal", "av_sync"] = resume_key("auto")
    pos_weight: float | None = resume_key(None)  # multi_label: BCE weight of the positives (> 1: recall)

    def check(self) -> None:
        super().check()
        cnn = self.backbone != "vit"
        require(
            not cnn or self.activation_checkpointing in ("none", 0),
            f"model.activation_checkpointing applies to the ViT's blocks, not model.backbone={self.backbone}",
        )
        rnn_keys = [k for k in ("rnn", "bidirectional", "temporal_pool") if getattr(self, k) is not None]
        require(
            self.backbone == "cnn_rnn" or not rnn_keys,
            f"model.{rnn_keys[0] if rnn_keys else ''} applies to model.backbone=cnn_rnn only",
        )
        require(self.pos_weight is None or self.pos_weight > 0, "model.pos_weight must be > 0 (or null: off)")
        require(
            self.dynamic is None or self.backbone in DYNAMIC_BACKBONES,
            f"model.dynamic applies to model.backbone in {list(DYNAMIC_BACKBONES)} (tada2d is dynamic by "
            f"construction), not {self.backbone}",
        )

    def cnn_overrides(self) -> dict[str, Any]:
        """The CNN backbone's config overrides: `model.encoder`, geometry, and the RNN keys."""
        from pretrain.models import BACKBONES

        over = self.encoder_overrides(BACKBONES[self.backbone][0])
        for key, field_name in (
            ("rnn", "rnn"),
            ("bidirectional", "bidirectional"),
            ("temporal_pool", "pool"),
            ("dynamic", "dynamic"),
        ):
            if getattr(self, key) is not None:
                over[field_name] = getattr(self, key)
        return over


@dataclass
class AugmentSection:
    """Train-time clip sampling and label regularisation (VideoMAE fine-tuning recipe knobs)."""

    stride: int = resume_key(4)  # frames between sampled frames
    flip: bool = resume_key(True)  # off for direction-sensitive labels (left/right motion)
    # multi-scale crop: box sides as fractions of the short side
    scales: tuple[float, ...] = resume_key((1.0, 0.875, 0.75, 0.66))
    # single_label: share of the target spread over the other classes
    label_smoothing: float = resume_key(0.0)
    mixup: float = resume_key(0.0)  # Beta(α, α); 0 = off
    cutmix: float = resume_key(0.0)  # Beta(α, α); 0 = off
    mix_prob: float = resume_key(1.0)  # probability a batch is mixed at all
    switch_prob: float = resume_key(0.5)  # with both on: probability of cutmix instead of mixup

    def check(self) -> None:
        require(0 <= self.label_smoothing < 1, "augment.label_smoothing must be in [0, 1)")
        require(
            self.mixup >= 0 and self.cutmix >= 0,
            "augment.mixup and augment.cutmix are Beta α values: >= 0 (0 = off)",
        )
        require(
            0 <= self.mix_prob <= 1 and 0 <= self.switch_prob <= 1,
            "augment.mix_prob and augment.switch_prob must be in [0, 1]",
        )
        require(self.stride >= 1, "augment.stride must be >= 1")


@dataclass
class EvalSection:
    """Val views during training; test views recorded for `finetune evaluate`; early stopping."""

    val_clips: int = 1  # clips per video in the val evaluations during training
    val_crops: int = 1  # 1 (centre) or 3 (left, centre, right) crops per clip
    test_clips: int = 5  # clips per video for `finetune evaluate` (VideoMAE: 5 × 3 views)
    test_crops: int = 3  # 1 or 3 crops per clip for `finetune evaluate`
    patience: int = 0  # evaluations without a val top-1 improvement before stopping; 0 = off
    min_delta: float = 0.0  # improvement needed to reset patience (top-1 in [0, 1])
    keep_best: bool = True  # write <run_dir>/best (model dir) whenever val top-1 improves
    # how a video's views combine: auto = the head's (mean for one label, max for label sets)
    view_reduce: Literal["auto", "mean", "max"] = "auto"

    def check(self, micro_batch_size: int) -> None:
        for name in ("val_crops", "test_crops"):
            require(getattr(self, name) in (1, 3), f"eval.{name} must be 1 or 3")
        require(
            self.val_clips >= 1 and self.test_clips >= 1 and self.patience >= 0,
            "eval.val_clips / test_clips must be >= 1 and eval.patience >= 0",
        )
        views = self.val_clips * self.val_crops
        require(
            micro_batch_size % views == 0,
            f"train.micro_batch_size={micro_batch_size} must be a multiple of eval.val_clips × eval.val_crops = "
            f"{views} (whole videos per val batch)",
        )


@dataclass
class AudioSection:
    """The sound (`model.head: av_sync`): each clip's log-mel window, the shifts the task tells apart, and the
    audio branch. Shards must be built with `--audio keep` (or optional)."""

    seconds: float = resume_key(1.0)  # window centred on the clip's frames
    rate: int = resume_key(16000)  # Hz the sound is resampled to
    n_mels: int = resume_key(64)  # mel bands of the log-mel window
    offsets: tuple[float, ...] = resume_key((-0.4, -0.2, 0.0, 0.2, 0.4))  # seconds, + = sound late
    sync_prob: float = resume_key(0.5)  # share of training clips left in sync
    dim: int = resume_key(128)  # the audio branch's width per time step
    modality: Literal["both", "audio"] = resume_key("both")  # both: picture and sound; audio: the sound-only baseline

    def check(self) -> None:
        o = list(self.offsets)
        require(len(o) >= 2 and 0.0 in o, "audio.offsets needs 0.0 (in sync) and at least one shift")
        require(o == sorted(set(o)), "audio.offsets must be distinct and in increasing order")
        require(
            max(abs(x) for x in o) < self.seconds,
            f"audio.offsets must stay within audio.seconds={self.seconds} (a shift past the window hears none of the clip)",
        )
        require(0 < self.sync_prob < 1, "audio.sync_prob must be in (0, 1)")
        require(
            self.rate >= 4000 and self.n_mels >= 8 and self.dim >= 1,
            "audio: rate >= 4000, n_mels >= 8, dim >= 1",
        )

    def class_names(self) -> list[str]:
        """One class per offset, named for what a user hears."""
        return [offset_name(x) for x in self.offsets]


def offset_name(offset: float) -> str:
    if offset == 0:
        return "in sync"
    return f"sound {'late' if offset > 0 else 'early'} {abs(offset):.2f}s"


@dataclass
class FinetuneConfig(EngineConfig):
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    data: DataSection = field(default_factory=DataSection)
    model: ClassifierSection = field(default_factory=ClassifierSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    eval: EvalSection = field(default_factory=EvalSection)
    audio: AudioSection = field(default_factory=AudioSection)

    def validate(self, world_size: int = 1) -> None:
        note = self.optim.resolve_auto(self.model.backbone)
        if note is not None:
            self.optim_note = note  # printed at start by the task (not a config field: never saved)
        super().validate(world_size)
        self.data.check()
        self.model.check()
        self.finetune.check(self.model.backbone)
        self.augment.check()
        self.eval.check(self.train.micro_batch_size)
        require(
            self.model.num_classes is not None or self.data.shards is not None,
            "model.num_classes is needed when there is no shard manifest (data.shards)",
        )
        classifier_config(self)  # raises ConfigError naming the key
        if head_kind(self) == "av_sync":
            self.audio.check()
            if self.data.shards:
                from data_shards.format import load_manifest

                require(
                    load_manifest(self.data.shards).audio != "drop",
                    f"model.head=av_sync needs sound: {self.data.shards} was built without it (rebuild with "
                    "`python -m data_shards build ... --audio keep`)",
                )
            a = self.augment
            require(
                a.mixup == 0 and a.cutmix == 0,
                "model.head=av_sync: augment.mixup / cutmix would blend two clips' sounds and shifts; set them to 0",
            )
        require(
            self.eval.view_reduce == "auto" or head_kind(self) == "multi_label",
            f"eval.view_reduce={self.eval.view_reduce} applies to the multi_label head (one label: views are "
            "averaged; temporal: each clip is scored on its own)",
        )


def starting_point(init: str | None) -> Source | None:
    """The init's architecture and config (no weights read), or None for a scratch run."""
    if init is None:
        return None
    try:
        src = read_source(init)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"finetune.init={init}: {e}") from e
    if src.kind == "run" and src.architecture != "MaskedVideoAutoencoder":
        raise ConfigError(
            f"finetune.init={init} is a fine-tuning run: point at {init}/best or {init}/model "
            f"(or export it with python -m finetune export)"
        )
    return src


def _vit_encoder(m: ClassifierSection, src: Source | None) -> VideoViTConfig:
    """The init's encoder (only img_size / num_frames may change, and only with sin-cos positions) or the
    preset's, with the section's drop path and attention backend."""
    if src is None:
        enc = VideoViTConfig.from_preset(m.preset, **m.encoder_overrides())
    else:
        require(
            isinstance(src.encoder, VideoViTConfig),
            f"finetune.init holds a {src.architecture} CNN: set model.backbone to its backbone",
        )
        enc, over = src.encoder, {}
        for name in ("img_size", "num_frames"):
            value = getattr(m, name)
            if value is not None and value != getattr(enc, name):
                require(
                    enc.pos_embed == "sincos",
                    f"model.{name}={value}: the init has learned positions for {getattr(enc, name)}",
                )
                over[name] = value
        enc = dataclasses.replace(enc, **over)
    return dataclasses.replace(enc, drop_path_rate=m.drop_path_rate, attn_impl=m.attn_impl)


def _cnn_classifier(
    m: ClassifierSection, src: Source | None, n: int, names: list[str] | None
) -> BackboneClassifierConfig:
    """A CNN classifier: the preset (+ overrides), or the init's backbone (a CNN model directory)."""
    if src is None:
        enc = backbone_config(m.backbone, m.preset, **m.cnn_overrides())
    else:
        theirs = getattr(src.config, "backbone", None)
        require(
            theirs == m.backbone,
            f"finetune.init={src.path} holds a {src.architecture}"
            + (f" ({theirs})" if theirs else "")
            + f", not a {m.backbone}: a CNN starts from null (scratch) or a model directory of the same backbone",
        )
        enc = src.encoder
    return BackboneClassifierConfig(
        backbone=m.backbone, encoder=enc, num_classes=n, head_dropout=m.head_dropout, class_names=names
    )


def _classes(cfg: FinetuneConfig, class_names: list[str] | None) -> tuple[int, list[str] | None]:
    from data_shards.format import load_manifest

    m = cfg.model
    if class_names is None and cfg.data.shards and m.num_classes is None:
        class_names = load_manifest(cfg.data.shards).classes
    n = m.num_classes or (len(class_names) if class_names else 0)
    require(n >= 1, "no classes: set model.num_classes or build the shards with labels")
    if m.num_classes is not None and cfg.data.shards:  # fewer outputs than labels: an index error mid-run
        have = load_manifest(cfg.data.shards).classes or []
        require(
            m.num_classes >= len(have),
            f"model.num_classes={m.num_classes} is below the {len(have)} classes of {cfg.data.shards} "
            f"({', '.join(have[:4])}{', ...' if len(have) > 4 else ''}): leave it unset (the shards' classes) "
            f"or set it to at least {len(have)}",
        )
    return n, class_names if class_names is not None and len(class_names) == n else None


HEAD_FOR_LABELS = {"single": "single_label", "multi": "multi_label", "segments": "temporal"}
LABELS_FOR_HEAD = {
    "single_label": ("single",),
    "multi_label": ("multi", "single"),
    "temporal": ("segments",),
    "av_sync": ("single", "multi", "segments"),  # the labels are the drawn shifts: any shards with sound
}


def head_kind(cfg: FinetuneConfig) -> str:
    """The head this run trains: `model.head`, or (auto) the one the shards' labels call for; a head the
    shards cannot feed is an error naming both."""
    m = cfg.model
    labels = "single"
    if cfg.data.shards:
        from data_shards.format import load_manifest

        labels = load_manifest(cfg.data.shards).labels
    head = HEAD_FOR_LABELS[labels] if m.head == "auto" else m.head
    require(
        labels in LABELS_FOR_HEAD[head],
        f"model.head={head} needs shards with {' or '.join(LABELS_FOR_HEAD[head])} labels; "
        f"{cfg.data.shards} has {labels} labels",
    )
    return head


def _audio_branch(cfg: FinetuneConfig) -> AudioBranchConfig:
    a = cfg.audio
    return AudioBranchConfig(n_mels=a.n_mels, dim=a.dim, modality=a.modality)


def classifier_config(
    cfg: FinetuneConfig, class_names: list[str] | None = None
) -> VideoClassifierConfig | BackboneClassifierConfig:
    """The classifier this config describes: the init's backbone (or the preset) + a head for the classes
    (per time step for the temporal head)."""
    m = cfg.model
    src = starting_point(cfg.finetune.init)
    head = head_kind(cfg)
    temporal = head == "temporal"
    audio = _audio_branch(cfg) if head == "av_sync" else None
    try:
        n, names = (len(cfg.audio.offsets), cfg.audio.class_names()) if audio else _classes(cfg, class_names)
        if m.backbone != "vit":
            return dataclasses.replace(_cnn_classifier(m, src, n, names), temporal=temporal, audio=audio)
        # A new fc_norm uses HF's fixed eps (1e-5) so HF exports are exact; a classifier init keeps its own.
        fc_eps = (
            src.config.fc_norm_eps
            if src and isinstance(src.config, VideoClassifierConfig)
            else HF_FIXED_NORM_EPS
        )
        return VideoClassifierConfig(
            encoder=_vit_encoder(m, src),
            num_classes=n,
            use_mean_pooling=m.use_mean_pooling,
            head_dropout=m.head_dropout,
            fc_norm_eps=fc_eps,
            class_names=names,
            temporal=temporal,
            audio=audio,
        )
    except KeyError as e:
        raise ConfigError(f"model.preset: {e.args[0]}") from e
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model ({src.kind if src else 'scratch'} init): {e}") from e
