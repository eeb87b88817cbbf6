import dataclasses

import pytest
import torch
from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table as hf_table

from pretrain.models import (
    PRESETS,
    MAEConfig,
    MaskedVideoAutoencoder,
    VideoClassifier,
    VideoClassifierConfig,
    VideoViT,
    VideoViTConfig,
    apply_activation_checkpointing,
    compile_model,
    count_parameters,
    make_mask,
)
from pretrain.models.vit import get_sinusoid_encoding_table, param_count_table

# Published encoder sizes (VideoMAE / VideoMAE V2), in millions.
PUBLISHED_M = {"vit-s": (21.5, 22.5), "vit-b": (86.0, 87.0), "vit-l": (303.0, 305.0), "vit-h": (630.0, 634.0)}
PUBLISHED_M["vit-g"] = (1009.0, 1013.0)


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_preset_param_counts_match_published(name: str) -> None:
    lo, hi = PUBLISHED_M[name]
    assert lo <= count_parameters(PRESETS[name]) / 1e6 <= hi


def test_param_count_table_lists_every_preset() -> None:
    table = param_count_table()
    for name in PRESETS:
        assert name in table
    assert "86.2M" in table


@pytest.mark.parametrize(("n", "d"), [(1568, 768), (64, 64), (2048, 1408), (392, 96)])
def test_sincos_table_is_bit_identical_to_hf(n: int, d: int) -> None:
    assert torch.equal(get_sinusoid_encoding_table(n, d), hf_table(n, d))


def test_grid_and_shapes() -> None:
    cfg = VideoViTConfig.from_preset("tiny", num_frames=4, img_size=48)
    assert cfg.grid_size == (2, 6, 6) and cfg.num_patches == 72 and cfg.patch_dim == 2 * 8 * 8 * 3
    enc = VideoViT(cfg)
    x = torch.randn(2, 3, 4, 48, 48)
    assert enc(x).shape == (2, 72, 64)
    mask = make_mask("tube", 2, cfg.grid_size, 0.75, torch.Generator().manual_seed(0))
    assert enc(x, mask).shape == (2, 18, 64)
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        enc(torch.randn(2, 4, 3, 48, 48))


def test_tokens_are_t_h_w_ordered() -> None:
    """Token i of the embedding sees exactly the pixels of tubelet (t, h, w) = unravel(i)."""
    cfg = VideoViTConfig(embed_dim=8, depth=0, num_heads=1, img_size=16, num_frames=4, patch_size=8)
    enc = VideoViT(cfg)
    x = torch.zeros(1, 3, 4, 16, 16)
    x[:, :, 2:4, 8:16, 0:8] = 1.0  # t'=1, h'=1, w'=0 → index 1*4 + 1*2 + 0 = 6
    tokens = enc.patch_embed(x) - enc.patch_embed(torch.zeros_like(x))
    changed = tokens.abs().sum(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [6]


def test_layer_index_and_no_weight_decay() -> None:
    cfg = MAEConfig.from_preset("tiny")
    model = MaskedVideoAutoencoder(
        dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, pos_embed="learned"))
    )
    depth = cfg.encoder.depth
    assert model.num_layers_for_lr_decay == depth + 2
    assert model.layer_index("encoder.patch_embed.proj.weight") == 0
    assert model.layer_index("encoder.pos_embed") == 0
    assert model.layer_index("encoder.blocks.0.attn.qkv.weight") == 1
    assert model.layer_index(f"encoder.blocks.{depth - 1}.mlp.fc1.bias") == depth
    assert model.layer_index("encoder.norm.weight") == depth + 1
    assert model.layer_index("decoder.blocks.0.attn.qkv.weight") == depth + 1
    assert model.layer_index("mask_token") == depth + 1
    names = {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay() == {"mask_token", "encoder.pos_embed"} <= names
    clf = VideoClassifier(VideoClassifierConfig(encoder=cfg.encoder, num_classes=3))
    assert (
        clf.layer_index("head.weight") == depth + 1 and clf.layer_index("encoder.blocks.1.norm1.weight") == 2
    )
    assert clf.no_weight_decay() == set()  # fixed sin-cos table is a buffer, not a parameter
    apply_activation_checkpointing(model, "all")
    wrapped = [n for n, _ in model.named_parameters() if "blocks.1." in n and n.startswith("encoder.")]
    assert wrapped and all(model.layer_index(n) == 2 for n in wrapped)


def test_layer_scale_and_drop_path() -> None:
    cfg = VideoViTConfig.from_preset("tiny", layer_scale_init=0.1, drop_path_rate=0.2)
    enc = VideoViT(cfg)
    assert torch.allclose(enc.blocks[0].gamma_1, torch.full((64,), 0.1))
    assert enc.blocks[0].drop_path.p == 0.0 and enc.blocks[-1].drop_path.p == pytest.approx(0.2)
    x = torch.randn(4, 3, 8, 32, 32)
    enc.eval()
    torch.testing.assert_close(enc(x), enc(x))
    enc.train()
    torch.manual_seed(0)
    a = enc(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, enc(x))  # stochastic depth is active in training


@pytest.mark.parametrize("mode", ["all", 1])
def test_activation_checkpointing_gives_same_grads(mode: object) -> None:
    torch.manual_seed(0)
    cfg = MAEConfig.from_preset("tiny")
    ref = MaskedVideoAutoencoder(cfg)
    ckpt = MaskedVideoAutoencoder(cfg)
    ckpt.load_state_dict(ref.state_dict())
    n = apply_activation_checkpointing(ckpt, mode)
    assert n == (cfg.encoder.depth + cfg.decoder_depth if mode == "all" else 1)
    assert apply_activation_checkpointing(ckpt, "none") == 0
    assert list(ckpt.state_dict()) == list(ref.state_dict())  # keys unchanged by the wrapper
    x = torch.randn(2, 3, 8, 32, 32)
    mask = make_mask("tube", 2, cfg.encoder.grid_size, 0.75, torch.Generator().manual_seed(0))
    ref(x, mask).loss.backward()
    ckpt(x, mask).loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ckpt.named_parameters():
        want = ref_grads[name.replace("._checkpoint_wrapped_module", "")].grad
        torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="checkpointing mode"):
        apply_activation_checkpointing(ckpt, "some")


@pytest.mark.slow  # ~40 s of inductor compilation on 2 cores
def test_compiled_blocks_compute_the_same_step() -> None:
    """`model.compile`: the same loss and gradients as eager (CPU inductor here; CUDA in tests/gpu)."""
    torch.manual_seed(0)
    cfg = MAEConfig.from_preset("tiny")
    ref = MaskedVideoAutoencoder(cfg)
    fast = MaskedVideoAutoencoder(cfg)
    fast.load_state_dict(ref.state_dict())
    assert compile_model(fast) == cfg.encoder.depth + cfg.decoder_depth
    assert list(fast.state_dict()) == list(ref.state_dict())  # checkpoints load either way
    x = torch.randn(2, 3, 8, 32, 32)
    mask = make_mask("tube", 2, cfg.encoder.grid_size, 0.75, torch.Generator().manual_seed(0))
    for _ in range(2):  # the second step runs the cached graphs
        ref.zero_grad()
        fast.zero_grad()
        want, got = ref(x, mask).loss, fast(x, mask).loss
        want.backward()
        got.backward()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
