"""Supervised (and parameter-efficient) video classification as an engine task.

`FinetuneConfig` = the engine's sections + `model` (classifier head and the few encoder knobs a fine-tune
may change), `finetune` (starting point and PEFT method), `augment` (clip sampling, label smoothing,
mixup / cutmix) and `eval` (views, early stopping, best model). The engine sees none of them.

Starting points (`finetune.init`): a pretraining run directory (its newest checkpoint is consolidated
like `python -m pretrain export` does), a tubelet model directory (`load_model`), an HF VideoMAE
directory (`pretrain.models.hf`), or null = random initialisation (the from-scratch baseline).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_shards.loader import SamplingSpec
from finetune.peft_methods import METHODS, MethodSpec, apply_method
from pretrain.engine import ConfigError, EngineConfig, EvalOutcome, StepOutput, TaskContext, resume_key
from pretrain.models import VideoClassifier, VideoClassifierConfig, VideoViTConfig
from pretrain.models.hf import HF_FIXED_NORM_EPS
from pretrain.models.mae import IMAGENET_MEAN, IMAGENET_STD
from pretrain.task import encoder_overrides

CLASSIFIER_JSON = "classifier.json"  # the resolved architecture, written into the run dir (export needs it)
INIT_REPORT = "init_report.json"
BEST_DIR = "best"


@dataclass
class ModelSection:
    """The classifier. An `init` brings its encoder architecture; `preset` etc. apply to scratch runs."""

    preset: str = resume_key("tiny")  # scratch only
    img_size: int | None = resume_key(None)  # scratch; with an init only when positions are sin-cos
    num_frames: int | None = resume_key(None)
    patch_size: int | None = resume_key(None)  # scratch only
    tubelet_size: int | None = resume_key(None)  # scratch only
    encoder: dict[str, Any] = field(default_factory=dict, metadata={"resume": True})  # scratch only
    num_classes: int | None = resume_key(None)  # None: the shard manifest's classes
    use_mean_pooling: bool = resume_key(True)
    drop_path_rate: float = resume_key(0.1)
    head_dropout: float = resume_key(0.0)
    attn_impl: Literal["auto", "flash_attn", "sdpa", "math"] = "auto"


@dataclass
class FinetuneSection:
    """Where the weights come from and which parameters train (see finetune/peft_methods.py)."""

    init: str | None = resume_key(None)  # run dir | model dir | HF dir | null (scratch)
    method: Literal["full", "linear", "partial", "bitfit", "lora", "peft", "adapter", "prompt"] = resume_key(
        "full"
    )
    partial_blocks: int = resume_key(1)
    lora_rank: int = resume_key(8)
    lora_alpha: float = resume_key(16.0)
    lora_dropout: float = resume_key(0.0)
    # among qkv, proj, fc1, fc2 (every block) and patch_embed (the tubelet Conv3d)
    lora_targets: list[str] = field(default_factory=lambda: ["qkv", "proj"], metadata={"resume": True})
    peft_type: str = resume_key("IA3")  # method=peft: IA3 | LoHa | LoKr | VeRA | LoRA
    peft_options: dict[str, Any] = field(default_factory=dict, metadata={"resume": True})
    adapter_width: int = resume_key(64)
    adapter_scale: float = resume_key(0.1)
    prompt_tokens: int = resume_key(8)
    prompt_deep: bool = resume_key(False)
    train_fc_norm: bool = resume_key(True)  # not for method=linear (probe on a frozen, non-affine norm)


@dataclass
class AugmentSection:
    """Train-time clip sampling and label regularisation (VideoMAE fine-tuning recipe knobs)."""

    stride: int = resume_key(4)
    flip: bool = resume_key(True)  # off for direction-sensitive labels (left/right motion)
    scales: tuple[float, ...] = resume_key((1.0, 0.875, 0.75, 0.66))
    label_smoothing: float = resume_key(0.0)
    mixup: float = resume_key(0.0)  # Beta(α, α); 0 = off
    cutmix: float = resume_key(0.0)  # Beta(α, α); 0 = off
    mix_prob: float = resume_key(1.0)  # probability a batch is mixed at all
    switch_prob: float = resume_key(0.5)  # with both on: probability of cutmix instead of mixup


@dataclass
class EvalSection:
    """Val views during training; test views recorded for `finetune evaluate`; early stopping."""

    val_clips: int = 1
    val_crops: int = 1
    test_clips: int = 5
    test_crops: int = 3
    patience: int = 0  # evaluations without a val top-1 improvement before stopping; 0 = off
    min_delta: float = 0.0  # improvement needed to reset patience (top-1 in [0, 1])
    keep_best: bool = True  # write <run_dir>/best (model dir) whenever val top-1 improves


@dataclass
class FinetuneConfig(EngineConfig):
    model: ModelSection = field(default_factory=ModelSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def validate(self, world_size: int = 1) -> None:
        super().validate(world_size)
        f, a, e = self.finetune, self.augment, self.eval
        if f.method not in METHODS:
            raise ConfigError(f"finetune.method={f.method!r}: choose one of {list(METHODS)}")
        for name in ("partial_blocks", "lora_rank", "adapter_width", "prompt_tokens"):
            if getattr(f, name) < 1:
                raise ConfigError(f"finetune.{name} must be >= 1")
        if not 0 <= f.lora_dropout < 1:
            raise ConfigError("finetune.lora_dropout must be in [0, 1)")
        if not 0 <= a.label_smoothing < 1:
            raise ConfigError("augment.label_smoothing must be in [0, 1)")
        if a.mixup < 0 or a.cutmix < 0:
            raise ConfigError("augment.mixup and augment.cutmix are Beta α values: >= 0 (0 = off)")
        if not (0 <= a.mix_prob <= 1 and 0 <= a.switch_prob <= 1):
            raise ConfigError("augment.mix_prob and augment.switch_prob must be in [0, 1]")
        if a.stride < 1:
            raise ConfigError("augment.stride must be >= 1")
        for name in ("val_crops", "test_crops"):
            if getattr(e, name) not in (1, 3):
                raise ConfigError(f"eval.{name} must be 1 or 3")
        if e.val_clips < 1 or e.test_clips < 1 or e.patience < 0:
            raise ConfigError("eval.val_clips / test_clips must be >= 1 and eval.patience >= 0")
        if self.train.micro_batch_size % (e.val_clips * e.val_crops):
            raise ConfigError(
                f"train.micro_batch_size={self.train.micro_batch_size} must be a multiple of "
                f"eval.val_clips × eval.val_crops = {e.val_clips * e.val_crops} (whole videos per val batch)"
            )
        if f.init is not None and not Path(f.init).exists():
            raise ConfigError(f"finetune.init={f.init}: no such directory (null = train from scratch)")
        if self.model.num_classes is None and self.data.shards is None:
            raise ConfigError("model.num_classes is needed when there is no shard manifest (data.shards)")
        classifier_config(self)  # raises ConfigError naming the key


def method_spec(cfg: FinetuneConfig) -> MethodSpec:
    f = cfg.finetune
    names = {x.name for x in dataclasses.fields(MethodSpec)}
    return MethodSpec(**{k: v for k, v in dataclasses.asdict(f).items() if k in names})


# ----------------------------------------------------------------------------------- starting points


def init_kind(path: str | Path | None) -> str:
    """'scratch' | 'model' (tubelet model dir) | 'hf' (HF VideoMAE dir) | 'run' (pretraining run dir)."""
    if path is None or str(path) in ("", "none", "scratch"):
        return "scratch"
    p = Path(path)
    if (p / "config.json").is_file():
        meta = json.loads((p / "config.json").read_text())
        return "model" if "architecture" in meta else "hf"
    if (p / "config.yaml").is_file() and (p / "checkpoints").is_dir():
        return "run"
    raise ConfigError(
        f"finetune.init={path}: not a model directory (config.json), an HF VideoMAE directory or a "
        "pretraining run directory (config.yaml + checkpoints/)"
    )


def _run_encoder_config(run_dir: Path) -> VideoViTConfig:
    import yaml

    raw = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    if "finetune" in raw:
        raise ConfigError(
            f"finetune.init={run_dir} is a fine-tuning run: point at {run_dir}/best or {run_dir}/model "
            f"(or export it with python -m finetune export)"
        )
    from pretrain.engine import load_config
    from pretrain.task import PretrainConfig, mae_config

    return mae_config(load_config(PretrainConfig, run_dir / "config.yaml")).encoder


def source_encoder_config(path: str | Path | None) -> tuple[str, VideoViTConfig | None, Any]:
    """(kind, encoder config of the starting point or None for scratch, the source's own config)."""
    kind = init_kind(path)
    if kind == "scratch":
        return kind, None, None
    if kind == "run":
        return kind, _run_encoder_config(Path(path)), None
    if kind == "model":
        from pretrain.models.io import read_model_config

        _, cfg, _ = read_model_config(path)
        enc = cfg if isinstance(cfg, VideoViTConfig) else cfg.encoder
        return kind, enc, cfg
    from transformers import VideoMAEConfig

    from pretrain.models.hf import encoder_config_from_hf

    hf = VideoMAEConfig.from_pretrained(str(path))
    return kind, encoder_config_from_hf(hf, final_norm=not hf.use_mean_pooling), hf


def classifier_config(cfg: FinetuneConfig, class_names: list[str] | None = None) -> VideoClassifierConfig:
    """The classifier this config describes: the init's encoder (or the preset) + head for the classes."""
    m = cfg.model
    kind, enc, src = source_encoder_config(cfg.finetune.init)
    try:
        if enc is None:
            enc = VideoViTConfig.from_preset(m.preset, **encoder_overrides(m))
        else:
            over = {}
            for name in ("img_size", "num_frames"):
                value = getattr(m, name)
                if value is not None and value != getattr(enc, name):
                    if enc.pos_embed != "sincos":
                        raise ConfigError(
                            f"model.{name}={value}: the init has learned positions for {getattr(enc, name)}"
                        )
                    over[name] = value
            enc = dataclasses.replace(enc, **over)
        enc = dataclasses.replace(enc, drop_path_rate=m.drop_path_rate, attn_impl=m.attn_impl)
        if class_names is None and cfg.data.shards and m.num_classes is None:
            from data_shards.format import load_manifest

            class_names = load_manifest(cfg.data.shards).classes
        n = m.num_classes or (len(class_names) if class_names else 0)
        if n < 1:
            raise ConfigError("no classes: set model.num_classes or build the shards with labels")
        if class_names is not None and len(class_names) != n:
            class_names = None
        # A new fc_norm uses HF's fixed eps (1e-5) so HF exports are exact; a classifier init keeps its own.
        fc_eps = src.fc_norm_eps if isinstance(src, VideoClassifierConfig) else HF_FIXED_NORM_EPS
        return VideoClassifierConfig(
            encoder=enc,
            num_classes=n,
            use_mean_pooling=m.use_mean_pooling,
            head_dropout=m.head_dropout,
            fc_norm_eps=fc_eps,
            class_names=class_names,
        )
    except KeyError as e:
        raise ConfigError(f"model.preset: {e.args[0]}") from e
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model ({kind} init): {e}") from e


def source_state_dict(path: str | Path) -> tuple[str, dict[str, torch.Tensor], str]:
    """(kind, weights in *classifier* key names, source architecture) of a starting point."""
    kind = init_kind(path)
    if kind == "run":
        from pretrain.engine import checkpoint as ckpt_io

        ckpt = ckpt_io.find_export_checkpoint(Path(path))
        return kind, ckpt_io.consolidated_state_dict(ckpt), "MaskedVideoAutoencoder"
    if kind == "model":
        from pretrain.models import load_model

        model = load_model(path)
    else:
        from pretrain.models.hf import from_hf

        model = from_hf(path)
    arch = type(model).__name__
    sd = model.state_dict()
    if arch == "VideoViT":
        sd = {f"encoder.{k}": v for k, v in sd.items()}
    return kind, dict(sd), arch


_EXPECTED_NEW = {
    "head.": "new classification head",
    "fc_norm.": "new pooling norm (VideoMAE: mean pooling + fc_norm replaces the encoder's final norm)",
}
_EXPECTED_DROPPED = {
    "decoder.": "MAE decoder (pretraining only)",
    "encoder_to_decoder.": "MAE encoder→decoder projection (pretraining only)",
    "mask_token": "MAE mask token (pretraining only)",
    "encoder.norm.": "encoder final norm (the classifier mean-pools and normalises with fc_norm)",
}


def load_init_weights(model: VideoClassifier, path: str | Path) -> dict[str, Any]:
    """Copy the starting point's weights into `model`; returns a report of what was (not) loaded.

    Expected gaps (new head, fc_norm, the MAE decoder, the final norm) are listed with their reason;
    any other missing encoder weight or shape clash is an error naming the keys.
    """
    kind, src, arch = source_state_dict(path)
    own = model.state_dict()
    report: dict[str, Any] = {"source": str(path), "kind": kind, "architecture": arch}
    head_dropped = []
    for k in ("head.weight", "head.bias"):
        if k in src and k in own and src[k].shape != own[k].shape:
            head_dropped.append(f"{k}: {tuple(src[k].shape)} → {tuple(own[k].shape)}")
            src.pop(k)
    shapes = [
        f"{k}: source {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in src.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = sorted(set(own) - set(src))
    unexpected = sorted(set(src) - set(own))

    def explain(keys: list[str], table: dict[str, str]) -> tuple[dict[str, list[str]], list[str]]:
        known: dict[str, list[str]] = {}
        other = []
        for k in keys:
            why = next((w for p, w in table.items() if k.startswith(p)), None)
            if why is None:
                other.append(k)
            else:
                known.setdefault(why, []).append(k)
        return known, other

    new, bad_missing = explain(missing, _EXPECTED_NEW)
    dropped, bad_unexpected = explain(unexpected, _EXPECTED_DROPPED)
    if shapes or bad_missing:
        raise ConfigError(
            f"finetune.init={path}: its weights do not fit the classifier: shape mismatches {shapes}; "
            f"missing encoder weights {bad_missing}. Use an init with the same encoder architecture."
        )
    model.load_state_dict({k: v for k, v in src.items() if k in own}, strict=False)
    report.update(
        loaded=len([k for k in src if k in own]),
        expected_new={w: ks for w, ks in new.items()},
        expected_dropped={w: len(ks) for w, ks in dropped.items()},
        unexpected_other=bad_unexpected,
        head_reinitialised=head_dropped,
    )
    return report


def format_init_report(r: dict[str, Any]) -> str:
    lines = [
        f"[finetune] init from {r['kind']} {r['source']} ({r['architecture']}): {r['loaded']} tensors loaded"
    ]
    for why, keys in r["expected_new"].items():
        lines.append(f"[finetune]   missing (expected, {why}): {', '.join(keys)}")
    for why, n in r["expected_dropped"].items():
        lines.append(f"[finetune]   not used (expected, {why}): {n} tensors")
    for item in r["head_reinitialised"]:
        lines.append(f"[finetune]   head re-initialised (class count differs): {item}")
    if r["unexpected_other"]:
        lines.append(f"[finetune]   WARNING unexpected keys ignored: {r['unexpected_other']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- mixup/cutmix


def soft_targets(labels_B: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((labels_B.shape[0], num_classes), off, device=labels_B.device).scatter_(
        1, labels_B.unsqueeze(1), 1.0 - smoothing + off
    )


def mix_batch(
    video_BCTHW: torch.Tensor,
    targets_BK: torch.Tensor,
    aug: AugmentSection,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix for video (timm's batch mode, partner = the batch reversed).

    CutMix cuts the SAME spatial box from every frame (a tube), so motion stays coherent inside it;
    the label weight is the box's exact area fraction. Returns (video, soft targets, λ).
    """
    use_mix, use_cut = aug.mixup > 0, aug.cutmix > 0
    if not (use_mix or use_cut) or rng.random() >= aug.mix_prob:
        return video_BCTHW, targets_BK, 1.0
    cut = use_cut and (not use_mix or rng.random() < aug.switch_prob)
    lam = float(rng.beta(aug.cutmix, aug.cutmix) if cut else rng.beta(aug.mixup, aug.mixup))
    partner = video_BCTHW.flip(0)
    if cut:
        h, w = video_BCTHW.shape[-2:]
        ratio = (1.0 - lam) ** 0.5
        ch, cw = int(h * ratio), int(w * ratio)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
        x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
        video_BCTHW = video_BCTHW.clone()
        video_BCTHW[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - float((y1 - y0) * (x1 - x0)) / (h * w)
    else:
        video_BCTHW = video_BCTHW * lam + partner * (1.0 - lam)
    return video_BCTHW, targets_BK * lam + targets_BK.flip(0) * (1.0 - lam), lam


# ------------------------------------------------------------------------------------------------ task


class ClassificationTask:
    """Video classification on the engine: loads a starting point, applies a PEFT method, soft-target CE."""

    def __init__(self, cfg: FinetuneConfig, *, arch_dir: str | Path | None = None) -> None:
        """`arch_dir`: an existing fine-tuning run dir; the architecture comes from its classifier.json and
        `build_model` loads no starting weights (export: the checkpoint supplies every weight)."""
        self.cfg = cfg
        self.spec = method_spec(cfg)
        self.arch_only = arch_dir is not None
        if arch_dir is not None and (Path(arch_dir) / CLASSIFIER_JSON).is_file():
            from pretrain.models._config import config_from_dict

            data = json.loads((Path(arch_dir) / CLASSIFIER_JSON).read_text())
            self.clf_cfg = config_from_dict(VideoClassifierConfig, data)
        else:
            self.clf_cfg = classifier_config(cfg)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.rank, self.world_size, self.seed = 0, 1, cfg.train.seed
        self.run_dir = Path(cfg.train.run_dir)
        self.rng = np.random.default_rng([cfg.train.seed, 0])
        self.best_top1, self.best_step, self.bad_evals = -1.0, -1, 0
        self.init_report: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}

    # -- engine protocol ---------------------------------------------------------------------------
    def setup(self, ctx: TaskContext) -> None:
        self.device, self.rank, self.world_size, self.seed = ctx.device, ctx.rank, ctx.world_size, ctx.seed
        self.run_dir = ctx.run_dir
        ds = self.cfg.deepspeed
        self.dtype = torch.bfloat16 if ds.bf16 else torch.float16 if ds.fp16 else torch.float32
        self.rng = np.random.default_rng([ctx.seed, ctx.rank, 0x319])
        if ctx.rank == 0:
            ctx.run_dir.mkdir(parents=True, exist_ok=True)
            (ctx.run_dir / CLASSIFIER_JSON).write_text(json.dumps(dataclasses.asdict(self.clf_cfg), indent=1))

    def build_model(self) -> nn.Module:
        """Classifier ← starting weights (unless export) ← PEFT method; prints both reports on rank 0."""
        model = VideoClassifier(self.clf_cfg)
        init = self.cfg.finetune.init
        if not self.arch_only and init_kind(init) != "scratch":
            self.init_report = load_init_weights(model, init)
            if self.rank == 0:
                print(format_init_report(self.init_report), flush=True)
                (self.run_dir / INIT_REPORT).write_text(json.dumps(self.init_report, indent=1) + "\n")
        elif not self.arch_only and self.rank == 0:
            print("[finetune] init: random initialisation (from scratch)", flush=True)
        self.summary = apply_method(model, self.spec)
        if self.rank == 0 and not self.arch_only:
            s = self.summary
            print(
                f"[finetune] method {self.spec.method}: {s['trainable']:,} trainable of {s['total']:,} "
                f"parameters ({s['percent']:.3f}%) in {len(s['names'])} tensors",
                flush=True,
            )
        return model

    def tracking_params(self) -> dict[str, Any]:
        s, r = self.summary, self.init_report
        out: dict[str, Any] = {
            "finetune.trainable_params": s.get("trainable"),
            "finetune.total_params": s.get("total"),
            "finetune.trainable_pct": round(s.get("percent", 0.0), 4),
            "finetune.num_classes": self.clf_cfg.num_classes,
            "init.kind": r.get("kind", "scratch"),
        }
        if r:
            out.update(
                {
                    "init.loaded_tensors": r["loaded"],
                    "init.missing_expected": sorted(k for ks in r["expected_new"].values() for k in ks),
                    "init.dropped_expected": r["expected_dropped"],
                    "init.unexpected_other": r["unexpected_other"],
                }
            )
        return out

    def sampling_spec(self, split: str, train: bool) -> SamplingSpec:
        enc, a, e = self.clf_cfg.encoder, self.cfg.augment, self.cfg.eval
        return SamplingSpec(
            frames=enc.num_frames,
            stride=a.stride,
            size=enc.img_size,
            clips_per_video=1,
            train=train,
            eval_clips=e.val_clips,
            eval_crops=e.val_crops,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            scales=tuple(a.scales),
            flip=a.flip,
        )

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        video = batch["video"].to(self.device, self.dtype)
        labels = batch["label"].to(self.device)
        k = self.clf_cfg.num_classes
        targets = soft_targets(labels, k, self.cfg.augment.label_smoothing)
        video, targets, lam = mix_batch(video, targets, self.cfg.augment, self.rng)
        logits = model(video).float()
        loss = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        acc = float((logits.argmax(-1) == labels).float().mean()) if lam == 1.0 else float("nan")
        return StepOutput(loss, {"acc": acc} if lam == 1.0 else {})

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Per-video averaged softmax over the val views, gathered over ranks: identical on every rank."""
        from finetune.evaluate import collect_scores, gather_scores, summarize

        keys, probs, labels = gather_scores(*collect_scores(model, batches, self.device, self.dtype))
        m = summarize(keys, probs, labels)
        return {"top1": m["top1"], "top5": m["top5"], "loss": m["loss"], "videos": float(m["n"])}

    def after_evaluate(self, model: nn.Module, metrics: dict[str, float], step: int) -> EvalOutcome:
        """Track the best val top-1: write it as `<run_dir>/best` and count evaluations for early stopping."""
        e = self.cfg.eval
        top1 = float(metrics["top1"])
        artifacts: list[Path] = []
        if top1 > self.best_top1 + e.min_delta or self.best_step < 0:
            self.best_top1, self.best_step, self.bad_evals = top1, step, 0
            if e.keep_best:
                path = self.save_best(model, step, top1)
                artifacts = [path] if path is not None else []
        else:
            self.bad_evals += 1
        stop = e.patience > 0 and self.bad_evals >= e.patience
        if stop and self.rank == 0:
            print(
                f"[finetune] early stopping: val top-1 has not improved for {self.bad_evals} evaluations "
                f"(best {self.best_top1:.4f} at step {self.best_step})",
                flush=True,
            )
        return EvalOutcome(
            stop, {"val/best_top1": self.best_top1, "val/best_step": float(self.best_step)}, artifacts
        )

    def save_best(self, model: nn.Module, step: int, top1: float) -> Path | None:
        """Collective under ZeRO-3 (parameters gathered); rank 0 writes the model directory."""
        module = getattr(model, "module", model)
        if self.cfg.deepspeed.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        else:
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        if self.rank != 0:
            return None
        fresh = self.fresh_model()
        fresh.load_state_dict(state)
        return self.export(fresh, self.run_dir / BEST_DIR, {"step": step, "val_top1": top1})

    def fresh_model(self) -> nn.Module:
        """The training architecture (method applied) without starting weights."""
        model = VideoClassifier(self.clf_cfg)
        apply_method(model, self.spec)
        return model

    def visualize(self, model: nn.Module, batch: dict[str, Any], out_dir: Path | None) -> list[Path]:
        return []

    def flops_per_sample(self) -> float:
        enc = self.clf_cfg.encoder
        n, d, h = enc.num_patches, enc.embed_dim, enc.mlp_hidden_dim
        fwd = 2 * n * enc.patch_dim * d + enc.depth * (2 * n * d * (4 * d + 2 * h) + 4 * n * n * d)
        fwd += 2 * d * self.clf_cfg.num_classes
        return float(3 * fwd)

    def tokens_per_sample(self) -> int:
        return self.clf_cfg.encoder.num_patches

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": json.dumps(self.rng.bit_generator.state),
            "best_top1": self.best_top1,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = json.loads(state["rng"])
        self.best_top1, self.best_step = float(state["best_top1"]), int(state["best_step"])
        self.bad_evals = int(state["bad_evals"])

    def export(self, model: nn.Module, out_dir: Path, extra: dict[str, Any]) -> Path:
        from finetune.export import export_model_dir

        return export_model_dir(model, self.clf_cfg, self.spec, out_dir, {**extra, **self.model_extra()})

    def model_extra(self) -> dict[str, Any]:
        """What evaluate/predict need to sample clips like training did (stored in config.json "extra")."""
        a, e = self.cfg.augment, self.cfg.eval
        return {
            "sampling": {
                "stride": a.stride,
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
                "test_clips": e.test_clips,
                "test_crops": e.test_crops,
            },
            "finetune": {
                "method": self.spec.method,
                "init": self.cfg.finetune.init,
                "trainable_params": self.summary.get("trainable"),
                "trainable_pct": self.summary.get("percent"),
            },
        }
