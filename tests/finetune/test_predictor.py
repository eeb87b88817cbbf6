"""The one inference path (`finetune.predict.Predictor`) in process: each kind of bad input is refused with its
reason, batching several videos into one forward changes nothing, top-k is clipped, the sampling is the one
`evaluate` uses, and a CNN classifier gets its input geometry through the same helper as the ViT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ft_helpers import BAD_INPUTS

from finetune.predict import Predictor, VideoInputError


@pytest.fixture(scope="module")
def predictor(tiny_classifier: Path) -> Predictor:
    return Predictor(tiny_classifier)


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_is_refused_with_its_reason(predictor: Predictor, video_inputs: dict, kind: str) -> None:
    reason, status = BAD_INPUTS[kind]
    with pytest.raises(VideoInputError) as e:
        predictor.decode(video_inputs[kind])
    assert (e.value.reason, e.value.status) == (reason, status), str(e.value)


def test_views_follow_the_exported_eval_sampling(predictor: Predictor, video_inputs: dict) -> None:
    from finetune.model_dir import model_extra, sampling_for

    assert predictor.spec == sampling_for(predictor.model, model_extra(predictor.model_dir), None, None, None)
    views = predictor.decode(video_inputs["webm"])
    assert views.shape == (2, 3, 8, 32, 32)  # 2 test clips x 1 crop, 8 frames, 32 px
    d = predictor.describe()
    assert d["input"] | {"mean": None, "std": None} == {
        "layout": "BCTHW", "frames": 8, "size": 32, "stride": 2, "clips": 2, "crops": 1, "views_per_video": 2,
        "mean": None, "std": None,
    }  # fmt: skip
    assert d["labels"] == ["move_right", "move_left", "move_down", "move_up"] and d["embedding_dim"] == 64


def test_a_batch_of_videos_gives_what_each_video_gives_alone(
    predictor: Predictor, video_inputs: dict
) -> None:
    a, b = predictor.decode(video_inputs["mp4"]), predictor.decode(video_inputs["webm"])
    together = predictor.probabilities([a, b])
    alone = [predictor.probabilities([a])[0], predictor.probabilities([b])[0]]
    for x, y in zip(together, alone):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
        assert x.shape == (4,) and abs(float(x.sum()) - 1) < 1e-5
    emb = predictor.embeddings([a, b])
    assert [e.shape for e in emb] == [(64,), (64,)]
    torch.testing.assert_close(emb[1], predictor.embeddings([b])[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the embedding is the pooled feature the head reads, averaged over views
        torch.testing.assert_close(emb[0], predictor.model.forward_features(a).mean(0), atol=1e-5, rtol=1e-5)


def test_top_k_is_clipped_to_the_classes(predictor: Predictor) -> None:
    probs = torch.tensor([0.1, 0.6, 0.2, 0.1])
    top = predictor.top(probs, 10)
    assert [t["label"] for t in top[:2]] == ["move_left", "move_down"] and len(top) == 4
    assert [t["index"] for t in predictor.top(probs, 0)] == [1]  # at least one


def test_a_cnn_classifier_is_served_through_the_same_path(tmp_path: Path, video_inputs: dict) -> None:
    from finetune.config import FinetuneSection
    from finetune.model_dir import export_model_dir
    from pretrain.models import BackboneClassifier, BackboneClassifierConfig

    cfg = BackboneClassifierConfig.from_preset("r3d", "tiny", num_classes=3, img_size=48, num_frames=4)
    cfg.class_names = ["a", "b", "c"]
    out = export_model_dir(BackboneClassifier(cfg), cfg, FinetuneSection(), tmp_path / "cnn", {})
    p = Predictor(out)
    views = p.decode(video_inputs["mp4"])
    assert views.shape == (1, 3, 4, 48, 48)  # geometry from the CNN's config; 1 view when none was exported
    assert p.describe()["architecture"] == "BackboneClassifier"
    assert (
        len(p.top(p.probabilities([views])[0])) == 3
        and p.embeddings([views])[0].numel() == p.model.feature_dim
    )


def test_hf_round_trip_keeps_the_config_and_the_sampling(
    tiny_classifier: Path, mae_dir: Path, video_inputs: dict, tmp_path: Path
) -> None:
    """export --hf → convert from-hf: the same architecture config (fc_norm_eps HF hard-codes, preset) and
    extra.sampling, so predict answers the same without --stride/--clips; a pretrained MAE's to-hf → from-hf
    keeps decoder_final_norm_eps and preset (and gets the HF processor config too)."""
    import json

    from finetune.export import export_hf
    from pretrain.convert import main as convert

    def meta(d: Path) -> dict:
        return json.loads((d / "config.json").read_text())

    hf = export_hf(tiny_classifier, tmp_path / "hf")
    assert meta(hf)["tubelet_extra"]["extra"]["sampling"] == meta(tiny_classifier)["extra"]["sampling"]
    assert convert(["from-hf", str(hf), str(tmp_path / "back")]) == 0
    before, after = meta(tiny_classifier), meta(tmp_path / "back")
    assert after["config"] == before["config"] and after["preset"] == "tiny"
    assert after["extra"]["sampling"] == before["extra"]["sampling"]
    a, b = Predictor(tiny_classifier), Predictor(tmp_path / "back")
    assert a.spec == b.spec
    views = a.decode(video_inputs["mp4"])
    assert torch.equal(b.decode(video_inputs["mp4"]), views)
    assert torch.equal(a.probabilities([views])[0], b.probabilities([views])[0])
    assert Predictor(hf).spec == a.spec  # the HF directory itself predicts with the exported sampling

    assert convert(["to-hf", str(mae_dir), str(tmp_path / "mae_hf")]) == 0
    processor = json.loads((tmp_path / "mae_hf" / "preprocessor_config.json").read_text())
    assert processor["num_frames"] == 8 and processor["crop_size"] == {"height": 32, "width": 32}
    assert convert(["from-hf", str(tmp_path / "mae_hf"), str(tmp_path / "mae_back")]) == 0
    before, after = meta(mae_dir), meta(tmp_path / "mae_back")
    assert after["config"] == before["config"] and after["preset"] == before["preset"] == "tiny"
    assert after["config"]["decoder_final_norm_eps"] == 1e-6
