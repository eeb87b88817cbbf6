"""The HF export is complete: `transformers.pipeline("video-classification", model=HF_DIR)` runs on it with no
extra arguments (the processor configuration is exported beside the weights) and agrees with `predict`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

MOTION_NAMES = ("move_right", "move_left", "move_down", "move_up")
MEAN, STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)  # not ImageNet's: the processor must read the model's


def _one_clip_per_class(folder: Path, frames: int) -> dict[str, Path]:
    """A 48 x 64 (non-square) H.264 clip of each motion, exactly `frames` frames long."""
    from data_shards.synth import SynthSpec, encode_clip, render_clip

    clips: dict[str, Path] = {}
    spec = SynthSpec(videos=64, classes=4, frames=frames, size=64, codec="h264")
    for i in range(spec.videos):
        rgb_THWC, motion = render_clip(i, spec)
        if motion not in clips:
            clips[motion] = folder / f"{motion}.mp4"
            encode_clip(rgb_THWC[:, 8:56], clips[motion], "h264", 8)
        if len(clips) == len(MOTION_NAMES):
            return clips
    raise AssertionError(f"synth gave only {sorted(clips)}")


def _separated_model_dir(tiny_classifier: Path, clips: dict[str, Path], out: Path, margin: float) -> Path:
    """`tiny_classifier`'s encoder with a head that maps each class's clip to that class by `margin` logits,
    exported with stride 1 and this file's mean/std (a trained-looking model: the four clips get four
    different labels)."""
    from finetune.config import FinetuneSection
    from finetune.model_dir import export_model_dir
    from finetune.predict import Predictor
    from pretrain.models import load_model

    model = load_model(tiny_classifier)
    extra = json.loads((tiny_classifier / "config.json").read_text())["extra"]
    extra["sampling"].update(stride=1, mean=list(MEAN), std=list(STD))
    names = list(model.cfg.class_names)
    plain = export_model_dir(model, model.cfg, FinetuneSection(), out / "plain", extra)
    p = Predictor(plain)
    feats_KD = torch.stack([p.embeddings([p.decode(clips[n].read_bytes())])[0] for n in names])
    centred_KD = feats_KD - feats_KD.mean(0)
    target_KK = margin * (torch.eye(len(names)) - 1 / len(names))
    weight = target_KK.T @ torch.linalg.pinv(centred_KD).T  # weight @ centred_k = target_k (rank K-1)
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(-weight @ feats_KD.mean(0))
    return export_model_dir(model, model.cfg, FinetuneSection(), out / "model", extra)


def test_hf_pipeline_runs_on_the_export_and_agrees_with_predict(
    tiny_classifier: Path, tmp_path: Path
) -> None:
    """export --hf writes preprocessor_config.json (VideoMAEImageProcessor: the model's frames and size,
    shorter side → size, centre crop, the model's mean/std), so `pipeline("video-classification",
    model=HF_DIR)` works with no arguments; its answer has the pipeline's shape ([{"score", "label"}], all our
    class names) and the same top-1 as `predict` on every clip, with scores within 0.1.

    Same frames on both sides: each clip is exactly `frames` (8) frames long and the model's stride is 1, so
    our eval window (centred, 1 frame apart) and the pipeline's (the first 8 frames) are the same frames; the
    clips are 48 x 64, so both the short-side resize and the centre crop are exercised. Not vacuous: the
    head is set so the four classes' clips are well separated (4 logits apart on our features), and each
    clip must get ITS class from both paths: four different labels, which a random head (one class wins
    everywhere) or a mis-normalised / mis-cropped processor (the margin is lost) would not give. Scores
    differ a little (PIL vs torch resize, crop offsets, FFmpeg vs our YUV → RGB; HF's fixed fc_norm eps)."""
    pytest.importorskip("av")
    from transformers import pipeline

    from finetune.export import export_hf
    from finetune.predict import predict_files
    from pretrain.models.hf import HF_PROCESSOR_NAME

    clips = _one_clip_per_class(tmp_path, frames=8)
    model_dir = _separated_model_dir(tiny_classifier, clips, tmp_path, margin=4.0)
    with pytest.warns(UserWarning, match="fc_norm_eps"):
        hf = export_hf(model_dir, tmp_path / "hf")

    proc = json.loads((hf / HF_PROCESSOR_NAME).read_text())
    assert proc["image_processor_type"] == "VideoMAEImageProcessor" and proc["num_frames"] == 8
    assert proc["size"] == {"shortest_edge": 32} and proc["crop_size"] == {"height": 32, "width": 32}
    assert (proc["image_mean"], proc["image_std"]) == (list(MEAN), list(STD))
    assert proc["do_rescale"] and proc["do_normalize"] and proc["do_center_crop"] and proc["resample"] == 2

    classify = pipeline("video-classification", model=str(hf))
    ours = {
        Path(r["video"]).stem: r["top"] for r in predict_files(model_dir, [str(c) for c in clips.values()])
    }
    for name, clip in clips.items():
        theirs = classify(str(clip))
        assert [set(r) for r in theirs] == [{"score", "label"}] * 4
        assert sorted(r["label"] for r in theirs) == sorted(MOTION_NAMES)
        assert theirs[0]["label"] == ours[name][0]["label"] == name, (name, theirs, ours[name])
        score = {r["label"]: r["score"] for r in ours[name]}
        assert all(abs(r["score"] - score[r["label"]]) < 0.1 for r in theirs), (name, theirs, ours[name])
