import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pretrain.models import (
    MAEConfig,
    MaskedVideoAutoencoder,
    VideoClassifier,
    VideoClassifierConfig,
    VideoViTConfig,
    apply_activation_checkpointing,
    load_model,
    make_mask,
    save_model,
)


def clf(mean_pool: bool = True) -> VideoClassifier:
    torch.manual_seed(0)
    enc = VideoViTConfig.from_preset("tiny")
    return VideoClassifier(
        VideoClassifierConfig(
            encoder=enc, num_classes=3, use_mean_pooling=mean_pool, class_names=["a", "b", "c"]
        )
    )


@pytest.mark.parametrize("mean_pool", [True, False])
def test_classifier_shapes_and_grads(mean_pool: bool) -> None:
    model = clf(mean_pool)
    assert (model.fc_norm is not None) == mean_pool
    assert isinstance(model.encoder.norm, torch.nn.Identity) == mean_pool  # VideoMAE convention
    x = torch.randn(2, 3, 8, 32, 32)
    assert model.forward_features(x).shape == (2, 64)
    logits = model(x)
    assert logits.shape == (2, 3)
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.head.weight.abs().max() < 0.02 * 0.001 * 2.5  # init_scale applied


def test_classifier_rejects_bad_class_names() -> None:
    with pytest.raises(ValueError, match="class_names"):
        VideoClassifierConfig(num_classes=3, class_names=["a"])


@pytest.mark.parametrize("kind", ["mae", "clf"])
def test_save_load_round_trip(tmp_path, kind: str) -> None:
    torch.manual_seed(0)
    model = MaskedVideoAutoencoder(MAEConfig.from_preset("tiny")) if kind == "mae" else clf(False)
    apply_activation_checkpointing(model, "all")  # keys must be saved without the wrapper prefix
    save_model(model, tmp_path, extra={"step": 7})
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["architecture"] == type(model).__name__ and meta["preset"] == "tiny"
    assert meta["task"] == ("pretrain" if kind == "mae" else "classification")
    assert meta["extra"] == {"step": 7}
    if kind == "clf":
        assert meta["class_names"] == ["a", "b", "c"]
    loaded = load_model(tmp_path)
    assert loaded.cfg == model.cfg
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 8, 32, 32)
    model.eval()
    loaded.eval()
    if kind == "mae":
        mask = make_mask("tube", 2, model.cfg.encoder.grid_size, 0.75, torch.Generator().manual_seed(0))
        assert torch.equal(model(x, mask).loss, loaded(x, mask).loss)
    else:
        assert torch.equal(model(x), loaded(x))
    save_model(loaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["config"] == meta["config"]


def test_load_errors_name_the_keys(tmp_path) -> None:
    save_model(clf(), tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["surprise"] = torch.zeros(1)
    del sd["head.bias"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['head.bias'\]; unexpected keys \['surprise'\]"):
        load_model(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["encoder"]["emb_dim"] = 3
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown config keys \\['emb_dim'\\]"):
        load_model(tmp_path)
