"""Numerical parity with transformers' VideoMAE (random init, no hub), both directions, plus the CLI."""

import dataclasses

import pytest
import torch
from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification

from pretrain.convert import main as convert_main
from pretrain.models import MaskedVideoAutoencoder, VideoClassifier, load_model, make_mask, save_model
from pretrain.models.hf import from_hf_model, hf_config_from_ours, mae_config_from_hf, to_hf_model

# (image, patch, frames, tubelet, mean_pool, norm_pix, channels)
CONFIGS = [
    (32, 8, 4, 2, False, True, 3),
    (32, 16, 4, 1, True, False, 3),
    (48, 16, 6, 2, True, True, 3),
    (16, 8, 2, 1, False, True, 1),
]


def hf_config(img, patch, frames, tubelet, mean_pool, norm_pix, chans, **kw) -> VideoMAEConfig:
    return VideoMAEConfig(
        image_size=img,
        patch_size=patch,
        num_frames=frames,
        tubelet_size=tubelet,
        num_channels=chans,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
        use_mean_pooling=mean_pool,
        norm_pix_loss=norm_pix,
        **kw,
    )


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Random non-trivial biases/norms/mask token so every weight matters in the comparison."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def inputs(cfg, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)
    mask = make_mask("tube", batch, cfg.grid_size, 0.75, g)
    return x, mask


def hf_video(x_BCTHW: torch.Tensor) -> torch.Tensor:
    return x_BCTHW.permute(0, 2, 1, 3, 4)  # HF pixel_values are [B, T, C, H, W]


@pytest.mark.parametrize("spec", CONFIGS)
def test_pretraining_parity_hf_to_ours(spec) -> None:
    torch.manual_seed(0)
    hf = perturb(VideoMAEForPreTraining(hf_config(*spec)))
    ours = from_hf_model(hf).eval()
    x, mask = inputs(ours.cfg.encoder)
    with torch.no_grad():
        o, h = ours(x, mask), hf(hf_video(x), bool_masked_pos=mask)
    assert (o.pred - h.logits).abs().max() < 1e-4
    assert abs(o.loss.item() - h.loss.item()) < 1e-4


@pytest.mark.parametrize("spec", CONFIGS)
def test_pretraining_parity_ours_to_hf(spec) -> None:
    torch.manual_seed(1)
    cfg = mae_config_from_hf(hf_config(*spec))
    ours = perturb(MaskedVideoAutoencoder(cfg))
    hf = to_hf_model(ours)
    x, mask = inputs(cfg.encoder, seed=1)
    with torch.no_grad():
        o, h = ours(x, mask), hf(hf_video(x), bool_masked_pos=mask)
    assert (o.pred - h.logits).abs().max() < 1e-4
    assert abs(o.loss.item() - h.loss.item()) < 1e-4


@pytest.mark.parametrize("spec", CONFIGS)
def test_classification_parity_both_directions(spec) -> None:
    torch.manual_seed(2)
    hf = perturb(VideoMAEForVideoClassification(hf_config(*spec, num_labels=5)))
    ours = from_hf_model(hf).eval()
    assert isinstance(ours, VideoClassifier)
    x, _ = inputs(ours.cfg.encoder)
    with torch.no_grad():
        assert (ours(x) - hf(hf_video(x)).logits).abs().max() < 1e-4
        perturb(ours)
        back = to_hf_model(ours)
        assert (ours(x) - back(hf_video(x)).logits).abs().max() < 1e-4


def test_export_refuses_what_hf_cannot_express() -> None:
    cfg = mae_config_from_hf(hf_config(*CONFIGS[0]))
    bad = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, layer_scale_init=0.1))
    with pytest.raises(ValueError, match="layer scale"):
        hf_config_from_ours(bad)
    with pytest.raises(ValueError, match="ImageNet"):
        hf_config_from_ours(dataclasses.replace(cfg, pixel_mean=(0.5,) * 3, pixel_std=(0.5,) * 3))


def test_cli_round_trip(tmp_path, capsys) -> None:
    torch.manual_seed(3)
    hf = perturb(
        VideoMAEForVideoClassification(
            hf_config(*CONFIGS[0], num_labels=3, id2label={0: "x", 1: "y", 2: "z"})
        )
    )
    hf.save_pretrained(tmp_path / "hf")
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert "VideoClassifier" in capsys.readouterr().out
    ours = load_model(tmp_path / "ours").eval()
    assert ours.cfg.class_names == ["x", "y", "z"]
    assert convert_main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf2")]) == 0
    hf2 = VideoMAEForVideoClassification.from_pretrained(tmp_path / "hf2").eval()
    assert hf2.config.id2label[2] == "z"
    x, _ = inputs(ours.cfg.encoder)
    with torch.no_grad():
        ref = hf(hf_video(x)).logits
        assert (ours(x) - ref).abs().max() < 1e-4
        assert (hf2(hf_video(x)).logits - ref).abs().max() < 1e-4


@pytest.mark.parametrize("wrapper", ["model", "module", None])
def test_original_videomae_checkpoint(tmp_path, wrapper) -> None:
    """A synthetic original-layout .pth: our keys *are* VideoMAE's, so save ours and reload via the CLI."""
    torch.manual_seed(4)
    cfg = mae_config_from_hf(hf_config(*CONFIGS[2]))
    cfg = dataclasses.replace(
        cfg, encoder=dataclasses.replace(cfg.encoder, norm_eps=1e-6), decoder_final_norm_eps=1e-6
    )
    ours = perturb(MaskedVideoAutoencoder(cfg))
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    if wrapper == "module":
        sd = {f"module.{k}": v for k, v in sd.items()}
    torch.save({wrapper: sd, "epoch": 3} if wrapper else sd, tmp_path / "ckpt.pth")
    args = ["from-videomae", str(tmp_path / "ckpt.pth"), str(tmp_path / "out"), "--num-frames", "6"]
    assert convert_main([*args, "--img-size", "48", "--num-heads", "3", "--decoder-num-heads", "2"]) == 0
    loaded = load_model(tmp_path / "out").eval()
    x, mask = inputs(cfg.encoder)
    with torch.no_grad():
        assert torch.equal(loaded(x, mask).pred, ours(x, mask).pred)


def test_original_videomae_finetune_checkpoint(tmp_path) -> None:
    torch.manual_seed(5)
    hf = perturb(VideoMAEForVideoClassification(hf_config(*CONFIGS[1], num_labels=4)))
    ours = from_hf_model(hf).eval()
    # fine-tune layout: encoder weights at top level (blocks.*, patch_embed.*), fc_norm, head
    sd = {k.removeprefix("encoder."): v for k, v in ours.state_dict().items()}
    torch.save({"module": sd}, tmp_path / "ft.pth")
    args = ["from-videomae", str(tmp_path / "ft.pth"), str(tmp_path / "out"), "--num-frames", "4"]
    assert convert_main([*args, "--img-size", "32", "--num-heads", "3"]) == 0
    loaded = load_model(tmp_path / "out").eval()
    assert loaded.cfg.use_mean_pooling
    x, _ = inputs(ours.cfg.encoder)
    with torch.no_grad():
        assert (loaded(x) - hf(hf_video(x)).logits).abs().max() < 1e-4
    save_model(loaded, tmp_path / "again")


def test_tubelet_extra_is_restored_only_while_it_describes_the_hf_config(tmp_path) -> None:
    import json

    from pretrain.models.hf import from_hf, to_hf

    torch.manual_seed(4)
    cfg = mae_config_from_hf(hf_config(*CONFIGS[0]))
    ours = MaskedVideoAutoencoder(dataclasses.replace(cfg, decoder_final_norm_eps=1e-6))
    with pytest.warns(UserWarning, match="decoder_final_norm_eps"):
        to_hf(ours, tmp_path / "hf", {"note": 1})
    assert from_hf(tmp_path / "hf").cfg == ours.cfg  # exact, though HF hard-codes 1e-5 there
    path = tmp_path / "hf" / "config.json"
    edited = json.loads(path.read_text()) | {"layer_norm_eps": 1e-5}  # changed after export
    path.write_text(json.dumps(edited))
    with pytest.warns(UserWarning, match="tubelet_extra not used .*changed after export"):
        back = from_hf(tmp_path / "hf")
    assert back.cfg.encoder.norm_eps == 1e-5 and back.cfg.decoder_final_norm_eps == 1e-5
