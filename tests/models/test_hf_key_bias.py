"""transformers versions whose VideoMAE key Linear has a bias (5.17, on the GPU machine) against ours, which
has none: exporting fills it with zeros, importing drops it (softmax cancels a key bias exactly)."""

import pytest
import torch
from torch import nn
from transformers.models.videomae import modeling_videomae

from pretrain.models import MAEConfig, MaskedVideoAutoencoder, make_mask
from pretrain.models.hf import from_hf_model, to_hf_model


@pytest.fixture
def hf_key_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    init = modeling_videomae.VideoMAESelfAttention.__init__

    def with_key_bias(self, config) -> None:  # type: ignore[no-untyped-def]
        init(self, config)
        self.key = nn.Linear(config.hidden_size, self.all_head_size, bias=True)

    monkeypatch.setattr(modeling_videomae.VideoMAESelfAttention, "__init__", with_key_bias)


def _model_and_inputs() -> tuple[MaskedVideoAutoencoder, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    cfg = MAEConfig.from_preset("tiny", num_frames=4, img_size=32)
    cfg.decoder_final_norm_eps = 1e-5
    ours = MaskedVideoAutoencoder(cfg).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 32, 32, generator=g)
    return ours, x, make_mask("tube", 2, cfg.encoder.grid_size, 0.75, g)


def test_export_fills_a_zero_key_bias(hf_key_bias: None) -> None:
    ours, x, mask = _model_and_inputs()
    hf = to_hf_model(ours)
    biases = [m.key.bias for m in hf.modules() if isinstance(m, modeling_videomae.VideoMAESelfAttention)]
    assert biases and all(b is not None and not b.any() for b in biases)
    with torch.no_grad():
        got = hf(x.permute(0, 2, 1, 3, 4), bool_masked_pos=mask).loss
        want = ours(x, mask).loss
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_import_drops_a_key_bias_exactly(hf_key_bias: None) -> None:
    ours, x, mask = _model_and_inputs()
    hf = to_hf_model(ours)
    with torch.no_grad():
        for m in hf.modules():
            if isinstance(m, modeling_videomae.VideoMAESelfAttention):
                m.key.bias.normal_()
        want = hf(x.permute(0, 2, 1, 3, 4), bool_masked_pos=mask).loss
        got = from_hf_model(hf).eval()(x, mask).loss
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
