"""Supervised (and parameter-efficient) video classification as an engine task.

The config is `finetune/config.py`, the starting weights `finetune/init.py`, the PEFT methods
`finetune/peft_methods.py`, Mixup/CutMix `finetune/augment.py`; this file wires them into the engine's hooks:
architecture (+ method), initial weights, loaders, soft-target cross-entropy, multi-view validation with the
best model kept and early stopping, export.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data_shards.loader import SamplingSpec
from data_shards.loader.audio import AudioSpec
from finetune.augment import mix_batch
from finetune.config import FinetuneConfig, classifier_config, head_kind
from finetune.heads import make_head
from finetune.init import format_init_report, load_init_weights
from finetune.peft_methods import apply_method
from pretrain.data import ShardData, micro_batch_key, why_no_validation
from pretrain.engine import EvalOutcome, StepOutput, Task, TaskContext, keyed_rng, mix_seed
from pretrain.engine.tracking import Tracker
from pretrain.models import (
    BackboneClassifierConfig,
    VideoClassifierConfig,
    VideoViTConfig,
    apply_activation_checkpointing,
    classifier_training_flops_per_clip,
    compile_model,
)
from pretrain.models.io import build_model, input_geometry, write_run_model
from pretrain.sources import Source, load_source

INIT_REPORT = "init_report.json"
BEST_DIR = "best"


def no_validation_warning(cfg: FinetuneConfig, run_dir: Path) -> str:
    """One line: why this run validates nothing (the val split and the splits the shards have), and that
    it writes no `best` model, so `evaluate --model RUN/best` has nothing to read."""
    return (
        f"[finetune] warning: no validation ({why_no_validation(cfg.data)}): no model selection or early "
        f"stopping, and no {run_dir / BEST_DIR} will be written (the final model is {run_dir / 'model'})"
    )


class ClassificationTask(ShardData, Task):
    """Video classification on the engine: classifier + PEFT method, soft-target CE, best-model tracking."""

    def __init__(
        self, cfg: FinetuneConfig, clf_cfg: VideoClassifierConfig | BackboneClassifierConfig | None = None
    ) -> None:
        """`clf_cfg`: the architecture, when it is already known (export of a run: its `model.json`);
        otherwise it is resolved from the config (the init's encoder or the preset, the manifest's classes)."""
        self.cfg = cfg
        self.clf_cfg = clf_cfg or classifier_config(cfg)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.rank, self.seed = 0, cfg.train.seed
        self.run_dir = Path(cfg.train.run_dir)
        self.rng = np.random.default_rng([cfg.train.seed, 0])
        self.best_score, self.best_step, self.bad_evals = -1.0, -1, 0
        self.init_report: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        # what a label means: the loss, scores and metrics (finetune/heads.py)
        self.head = make_head(head_kind(cfg), cfg.model.pos_weight, cfg.eval.view_reduce, cfg.audio.offsets)
        self.threshold: float | None = None  # multi-label: the decision threshold best on the last val

    # -- engine hooks ------------------------------------------------------------------------------
    def setup(self, ctx: TaskContext) -> None:
        super().setup(ctx)
        self.device, self.rank, self.seed, self.run_dir = ctx.device, ctx.rank, ctx.seed, ctx.run_dir
        ds = self.cfg.deepspeed
        self.dtype = torch.bfloat16 if ds.bf16 else torch.float16 if ds.fp16 else torch.float32
        self.rng = np.random.default_rng([ctx.seed, ctx.rank, 0x319])
        if ctx.is_main:  # the architecture of this run, for export and `load_source`
            write_run_model(self.clf_cfg, ctx.run_dir)

    def build_model(self) -> nn.Module:
        """Classifier (ViT or CNN backbone) + the PEFT method (+ activation checkpointing); random weights."""
        model = build_model(self.clf_cfg)
        self.summary = apply_method(model, self.cfg.finetune)
        if isinstance(self.clf_cfg, VideoClassifierConfig):
            apply_activation_checkpointing(model, self.cfg.model.activation_checkpointing)
        if self.cfg.model.compile:
            compile_model(model)
        return model

    def init_weights(self, model: nn.Module) -> None:
        """The starting point's weights (`finetune.init`); rank 0 prints and records what was loaded."""
        init = self.cfg.finetune.init
        if init is not None:
            self.init_report = self.load_init(model, load_source(init))
        if self.ctx.is_main:
            self._print_init()

    def load_init(self, model: nn.Module, src: Source) -> dict[str, Any]:
        """Weight surgery from a starting point into the (method-applied) classifier; returns the report."""
        return load_init_weights(model, src)

    def _print_init(self) -> None:
        if self.cfg.finetune.init is None:
            print("[finetune] init: random initialisation (from scratch)", flush=True)
        else:
            print(format_init_report(self.init_report), flush=True)
            (self.run_dir / INIT_REPORT).write_text(json.dumps(self.init_report, indent=1) + "\n")
        note = getattr(self.cfg, "optim_note", None)
        if note:
            print(f"[finetune] {note}", flush=True)
        s = self.summary
        print(
            f"[finetune] method {self.cfg.finetune.method}: {s['trainable']:,} trainable of {s['total']:,} "
            f"parameters ({s['percent']:.3f}%) in {len(s['names'])} tensors",
            flush=True,
        )

    def needs_validation(self) -> bool:
        return True  # no validation means no `best` model: always said

    def no_validation_warning(self, run_dir: Path) -> str:
        return no_validation_warning(self.cfg, run_dir)

    def sampling_spec(self, train: bool) -> SamplingSpec:
        a, e = self.cfg.augment, self.cfg.eval
        frames, size = input_geometry(self.clf_cfg)
        return SamplingSpec(
            frames=frames,
            stride=a.stride,
            size=size,
            clips_per_video=1,
            train=train,
            eval_clips=e.val_clips,
            eval_crops=e.val_crops,
            scales=tuple(a.scales),
            flip=a.flip,
            audio=self.audio_spec(),
        )

    def audio_spec(self) -> AudioSpec | None:
        """The sound beside each clip (the av_sync head), shifted by one of `audio.offsets` per video."""
        if self.head.kind != "av_sync":
            return None
        a = self.cfg.audio
        return AudioSpec(
            rate=a.rate, seconds=a.seconds, n_mels=a.n_mels, offsets=tuple(a.offsets), sync_prob=a.sync_prob
        )

    def forward(
        self, model: nn.Module, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(logits, soft targets, labels, video as fed) of a micro-batch, Mixup/CutMix applied; `lam` = 1
        unmixed. Labels are head indices (`head_labels`)."""
        video = batch["video"].to(self.device, self.dtype)
        labels = self.batch_labels(batch)
        targets = self.head.targets(labels, self.clf_cfg.num_classes, self.cfg.augment.label_smoothing)
        video, targets, lam = mix_batch(video, targets, self.cfg.augment, self.mix_rng(batch))
        key = micro_batch_key(batch)  # dropout / drop-path keyed by the micro-batch, like the mix
        with keyed_rng(mix_seed(self.seed, 0xD7, *key), self.device) if key else contextlib.nullcontext():
            extra = [x.to(self.device, self.dtype) for x in self.head.inputs(batch)]
            logits = model(video, *extra).float()
        return logits, targets, labels, video, lam

    def mix_rng(self, batch: dict[str, Any]) -> np.random.Generator:
        """Mixup/CutMix draws of a micro-batch, keyed by (seed, epoch, global index of its first sample, size):
        the loader deals the same micro-batches to 2 ranks as to 1 rank's 2 accumulation steps (and after an
        elastic resume), so they mix the same pairs with the same λ. Batches without "index" (a custom
        loader) draw from the per-rank stream `self.rng` (checkpointed; `reseed` on a world-size change)."""
        key = micro_batch_key(batch)
        return self.rng if key is None else np.random.default_rng([self.seed, 0x319, *key])

    def batch_labels(self, batch: dict[str, Any]) -> torch.Tensor:
        """The head's labels of a batch on the device (shard labels mapped to head indices first)."""
        mapped = {**batch, "label": self.head_labels(batch["label"].to(self.device))}
        return self.head.batch_labels(mapped, self.clf_cfg.num_classes).to(self.device)

    def head_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Shard labels → head indices (the identity here; continual learning's head covers fewer classes)."""
        return labels

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        """The head's loss (smoothing, Mixup/CutMix); `acc` only on unmixed batches (NaN otherwise)."""
        logits, targets, labels, _, lam = self.forward(model, batch)
        loss = self.head.loss(logits, targets)
        acc = self.head.accuracy(logits, labels) if lam == 1.0 else logits.new_tensor(float("nan"))
        return StepOutput(loss, {"acc": acc.detach()})

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """The head's metrics of the val views (per video, or per clip for the temporal head), gathered over
        ranks: identical on every rank. Multi-label: the F1-best threshold on val is kept for the model."""
        from finetune.evaluate import collect_scores, gather_scores, summarize

        mapped = ({**b, "label": self.head_labels(b["label"])} for b in batches)
        keys, probs, labels = gather_scores(
            *collect_scores(model, mapped, self.device, self.dtype, self.head)
        )
        m = summarize(keys, probs, labels, self.head)
        if "threshold" in m and m["n"]:
            self.threshold = float(m["threshold"])
        return {**{k: m[k] for k in self.head.metric_names}, "videos": float(m["n"])}

    def after_evaluate(self, model: nn.Module, metrics: dict[str, float], step: int) -> EvalOutcome:
        """Track the best val score (the head's primary metric: top-1, mAP, frame accuracy): write it as
        `<run_dir>/best` and count evaluations for early stopping."""
        e, name = self.cfg.eval, self.head.primary
        score = float(metrics[name])
        artifacts: list[Path] = []
        if score > self.best_score + e.min_delta or self.best_step < 0:
            self.best_score, self.best_step, self.bad_evals = score, step, 0
            if e.keep_best:
                path = self.save_best(model, step, score)
                artifacts = [path] if path is not None else []
        else:
            self.bad_evals += 1
        stop = e.patience > 0 and self.bad_evals >= e.patience
        if stop and self.rank == 0:
            print(
                f"[finetune] early stopping: val {name} has not improved for {self.bad_evals} evaluations "
                f"(best {self.best_score:.4f} at step {self.best_step})",
                flush=True,
            )
        return EvalOutcome(
            stop, {f"val/best_{name}": self.best_score, "val/best_step": float(self.best_step)}, artifacts
        )

    def save_best(self, model: nn.Module, step: int, score: float) -> Path | None:
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
        fresh = self.build_model()
        fresh.load_state_dict(state)
        return self.export(fresh, self.run_dir / BEST_DIR, {"step": step, f"val_{self.head.primary}": score})

    def flops_per_sample(self) -> float:
        return float(classifier_training_flops_per_clip(self.clf_cfg))

    def tokens_per_sample(self) -> float:
        enc = self.clf_cfg.encoder
        return float(enc.num_patches) if isinstance(enc, VideoViTConfig) else math.nan

    def tracking_params(self) -> dict[str, Any]:
        s, r = self.summary, self.init_report
        saved = self.run_dir / INIT_REPORT
        if not r and saved.is_file():  # a resumed run loads no init: the report of its first start
            r = json.loads(saved.read_text())
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

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": json.dumps(self.rng.bit_generator.state),
            "best_score": self.best_score,
            "threshold": self.threshold,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = json.loads(state["rng"])
        self.best_score = float(state.get("best_score", state.get("best_top1", -1.0)))  # older: best_top1
        self.best_step, self.threshold = int(state["best_step"]), state.get("threshold")
        self.bad_evals = int(state["bad_evals"])

    def log_model(self, model_dir: Path, tracker: Tracker) -> None:
        """The final model (and the best one, when kept) as MLflow pyfunc models `model` / `best` of this run;
        with `tracking.register_as`, `registered_dir` becomes a new version of that registered model.
        MLflow failures warn and never fail the run (`Tracker.call`); a registration asked for and not made
        is said at the end, where the user reads the outcome."""
        if not tracker.active:
            if self.cfg.tracking.register_as:
                print(f"[finetune] NOT registered as {self.cfg.tracking.register_as!r}: MLflow at {tracker.uri} "
                      "was unavailable (see the warning at the start); the model directory is complete",
                      flush=True)  # fmt: skip
            return
        from finetune.mlflow_model import log_model

        best = self.run_dir / BEST_DIR
        dirs = {"model": model_dir, **({"best": best} if self.cfg.eval.keep_best and best.is_dir() else {})}
        register = self.registered_dir(model_dir)
        for name, path in dirs.items():
            info = tracker.call(
                lambda name=name, path=path: log_model(
                    path,
                    uri=tracker.uri,
                    run_id=tracker.run_id,
                    experiment_id=tracker.experiment_id,
                    name=name,
                    register_as=self.cfg.tracking.register_as if path == register else None,
                )
            )
            if info is None:
                lost = f", NOT registered as {self.cfg.tracking.register_as!r}" if path == register and (
                    self.cfg.tracking.register_as) else ""  # fmt: skip
                print(f"[finetune] MLflow model {name!r} not logged{lost} (MLflow unavailable: see the warnings)")
                continue
            version = info.registered_model_version
            where = f"; registered as {self.cfg.tracking.register_as} version {version}" if version else ""
            print(f"[finetune] MLflow model {name!r}: {info.model_uri}{where}", flush=True)

    def registered_dir(self, model_dir: Path) -> Path:
        """Which model a run registers: the best one when kept (what `evaluate` reports), else the final."""
        best = self.run_dir / BEST_DIR
        return best if self.cfg.eval.keep_best and best.is_dir() else model_dir

    def reseed(self, step: int) -> None:
        self.rng = np.random.default_rng([self.seed, self.rank, 0x319, step])

    def export(self, model: nn.Module, out_dir: Path, extra: dict[str, Any]) -> Path:
        from finetune.model_dir import export_model_dir

        return export_model_dir(
            model, self.clf_cfg, self.cfg.finetune, out_dir, {**extra, **self.model_extra()}
        )

    def model_extra(self) -> dict[str, Any]:
        """What evaluate/predict need to sample clips like training did (stored in config.json "extra")."""
        a, e, spec = self.cfg.augment, self.cfg.eval, self.sampling_spec(False)
        return {
            "head": self.head.kind,
            **({"threshold": self.threshold} if self.threshold is not None else {}),
            **({"pos_weight": self.cfg.model.pos_weight} if self.cfg.model.pos_weight is not None else {}),
            **({"view_reduce": e.view_reduce} if e.view_reduce != "auto" else {}),
            **({"audio": asdict(spec.audio) | {"offsets": list(spec.audio.offsets)}} if spec.audio else {}),
            "sampling": {
                "stride": a.stride,
                "mean": list(spec.mean),
                "std": list(spec.std),
                "test_clips": e.test_clips,
                "test_crops": e.test_crops,
            },
            "finetune": {
                "method": self.cfg.finetune.method,
                "init": self.cfg.finetune.init,
                "trainable_params": self.summary.get("trainable"),
                "trainable_pct": self.summary.get("percent"),
            },
        }
