import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.models import (
    MAEConfig,
    MaskedVideoAutoencoder,
    forward_flops_per_clip,
    make_mask,
    reconstruct_video,
    training_flops_per_clip,
)
from pretrain.models.mae import compute_targets, patchify, replace_encoder
from pretrain.models.vit import gather_tokens, mask_to_ids


def setup(seed: int = 0, **enc):
    torch.manual_seed(seed)
    cfg = replace_encoder(MAEConfig.from_preset("tiny"), **enc) if enc else MAEConfig.from_preset("tiny")
    model = MaskedVideoAutoencoder(cfg)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, 8, 32, 32, generator=g)
    mask = make_mask("tube", 3, cfg.encoder.grid_size, 0.75, g)
    return cfg, model, x, mask


def test_shapes_and_every_parameter_gets_a_gradient() -> None:
    cfg, model, x, mask = setup()
    out = model(x, mask)
    n_masked = int(mask[0].sum())
    assert out.pred.shape == out.target.shape == (3, n_masked, cfg.encoder.patch_dim)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert torch.equal(torch.gather(mask, 1, out.pred_ids), torch.ones_like(out.pred_ids, dtype=torch.bool))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_deterministic_for_fixed_seed() -> None:
    a = setup(1)[1:]
    b = setup(1)[1:]
    assert torch.equal(a[0](*a[1:]).loss, b[0](*b[1:]).loss)


def test_encoder_only_sees_visible_tokens() -> None:
    """Changing pixels of hidden tubes must not change the predictions (the target does change)."""
    _, model, x, mask = setup()
    model.eval()
    hidden_px = (
        mask.view(3, 4, 4, 4)[:, 0].repeat_interleave(8, 1).repeat_interleave(8, 2)
    )  # tube: same over t
    x2 = x.clone()
    x2.permute(0, 2, 1, 3, 4)[hidden_px[:, None, None].expand(-1, 8, 3, -1, -1)] = 5.0
    assert not torch.equal(x, x2)
    torch.testing.assert_close(model(x, mask).pred, model(x2, mask).pred)


def test_target_layout_and_norm_pix() -> None:
    cfg, _, x, _ = setup()
    t = compute_targets(x, cfg)
    assert t.shape == (3, cfg.encoder.num_patches, cfg.encoder.patch_dim)
    per_channel = t.view(3, -1, 2 * 8 * 8, 3)
    torch.testing.assert_close(per_channel.mean(-2), torch.zeros(3, 64, 3), atol=1e-5, rtol=0)
    # un-normalized target = ImageNet-denormalized pixels, (t p0)(h p1)(w p2) with channel last
    raw = compute_targets(x, MAEConfig(encoder=cfg.encoder, norm_pix_loss=False))
    px = x[0, :, 0, 0, 0] * torch.tensor(cfg.pixel_std) + torch.tensor(cfg.pixel_mean)
    torch.testing.assert_close(raw[0, 0, :3], px)
    assert torch.equal(patchify(x, 2, 8)[0, 1, 0], x[0, :, 0, 0, 8])  # token 1 = next column of patches


def test_dual_masking_running_cell() -> None:
    cfg, model, x, mask = setup()
    dmask = make_mask("running_cell", 3, cfg.encoder.grid_size, 0.5, torch.Generator().manual_seed(0))
    out = model(x, mask, dmask)
    assert out.pred.shape[1] == cfg.encoder.num_patches // 2
    assert torch.equal(out.loss_weight.bool(), torch.gather(mask, 1, out.pred_ids))
    err = (out.pred - out.target).pow(2).mean(-1)
    torch.testing.assert_close(out.loss, err[out.loss_weight.bool()].mean())
    out.loss.backward()


def test_analytic_flops_match_flop_counter() -> None:
    cfg, model, x, mask = setup(attn_impl="math")
    with FlopCounterMode(display=False) as fc:
        out = model(x, mask)
    measured = fc.get_total_flops() / x.shape[0]
    assert forward_flops_per_clip(cfg, 0.75) == pytest.approx(measured, rel=0.02)
    with FlopCounterMode(display=False) as fc:
        model(x, mask).loss.backward()
    measured_train = fc.get_total_flops() / x.shape[0]
    # 3× forward is the convention; it over-counts only the input-gradient of the first (embedding) layer
    assert 0.8 * training_flops_per_clip(cfg, 0.75) <= measured_train <= training_flops_per_clip(cfg, 0.75)
    assert out.loss.isfinite()


def test_reconstruct_video_round_trips_with_perfect_prediction() -> None:
    cfg, model, x, mask = setup()
    out = model(x, mask)
    out.pred = out.target.clone()  # a perfect model
    frames = reconstruct_video(out, x, cfg)
    pixels = x * torch.tensor(cfg.pixel_std).view(1, 3, 1, 1, 1) + torch.tensor(cfg.pixel_mean).view(
        1, 3, 1, 1, 1
    )
    assert frames.original.shape == frames.reconstruction.shape == frames.masked.shape == x.shape
    torch.testing.assert_close(frames.original, pixels)
    torch.testing.assert_close(frames.reconstruction, pixels.clamp(0, 1), atol=1e-4, rtol=1e-4)
    grey = (frames.masked == 0.5).all(1)  # hidden tubes are grey in the masked view
    assert grey.float().mean().item() == pytest.approx(0.75, abs=0.01)


def test_fast_paths_compute_the_reference_function() -> None:
    """Issue 28: the step embeds only the visible tokens (a Linear, not the Conv3d over the clip), builds the
    targets of the reconstructed tokens only and runs the decoder's last block on those rows only; each equals
    the straightforward computation (all tokens through the Conv3d, every target, every row, then select)."""
    cfg, model, x, mask = setup(attn_impl="math")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-trivial biases, norms and mask token
    vis, hidden = mask_to_ids(mask)
    enc = model.encoder
    full_BND = enc.embed(x)  # Conv3d over the whole clip
    fast_BKD = enc.embed_visible(x, vis)
    torch.testing.assert_close(fast_BKD, gather_tokens(full_BND, vis), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        compute_targets(x, cfg, hidden), gather_tokens(compute_targets(x, cfg), hidden), atol=1e-5, rtol=1e-5
    )
    tokens_BND = torch.randn(3, 20, cfg.decoder_embed_dim)
    block = model.decoder.blocks[-1]
    torch.testing.assert_close(
        block(tokens_BND, keep_last=7), block(tokens_BND)[:, -7:], atol=1e-5, rtol=1e-5
    )
    # the whole step against the reference written out with the slow pieces
    out = model(x, mask)
    latent = model.encoder_to_decoder(enc.forward_blocks(gather_tokens(full_BND, vis)))
    pos = model.decoder_pos_embed.expand(3, -1, -1)
    dec_in = torch.cat([latent + gather_tokens(pos, vis), model.mask_token + gather_tokens(pos, hidden)], 1)
    for b in model.decoder.blocks:
        dec_in = b(dec_in)
    pred = model.decoder.head(model.decoder.norm(dec_in[:, -hidden.shape[1] :]))
    target = gather_tokens(compute_targets(x, cfg), hidden)
    torch.testing.assert_close(out.pred, pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ((pred - target) ** 2).mean(), atol=1e-6, rtol=1e-5)
    # gradients too: the Linear embedding's weight gradient is the Conv3d's
    out.loss.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ((pred - target) ** 2).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_gather_tokens_shared_table_and_batch() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1, 10, 4, generator=g)
    ids = torch.tensor([[0, 3, 9], [1, 2, 3]])
    ref = torch.gather(table.expand(2, -1, -1), 1, ids[..., None].expand(-1, -1, 4))
    assert torch.equal(gather_tokens(table, ids), ref)
    tokens = torch.randn(2, 10, 4, generator=g)
    assert torch.equal(gather_tokens(tokens, ids), torch.gather(tokens, 1, ids[..., None].expand(-1, -1, 4)))
