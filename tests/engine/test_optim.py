"""Optimizer parameter groups (no-weight-decay set, layer-wise LR decay) and the per-step LR schedule."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import PretrainConfig
from pretrain.engine.config import load_config
from pretrain.engine.optim import build_optimizer, lr_at, param_groups, set_lr
from pretrain.models import MAEConfig, MaskedVideoAutoencoder, apply_activation_checkpointing


def tiny_mae(**enc: object) -> MaskedVideoAutoencoder:
    return MaskedVideoAutoencoder(MAEConfig.from_preset("tiny", **enc))


def test_no_weight_decay_for_norms_biases_positions_and_mask_token() -> None:
    model = tiny_mae(pos_embed="learned")
    groups = param_groups(model, weight_decay=0.05)
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert wd["mask_token"] == 0.0
    assert wd["encoder.pos_embed"] == 0.0
    assert wd["encoder.blocks.0.norm1.weight"] == 0.0
    assert wd["encoder.blocks.0.mlp.fc1.bias"] == 0.0
    assert wd["encoder.blocks.0.mlp.fc1.weight"] == 0.05
    assert wd["encoder.patch_embed.proj.weight"] == 0.05
    assert wd["decoder.head.weight"] == 0.05
    assert set(wd) == {n for n, p in model.named_parameters()}


def test_layer_decay_scales() -> None:
    model = tiny_mae()
    apply_activation_checkpointing(model, "all")  # wrapper segments must not change the grouping
    decay, layers = 0.75, model.num_layers_for_lr_decay  # depth 2 + 2 = 4
    groups = param_groups(model, 0.05, layer_decay=decay)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    # VideoMAE: decay ** (depth + 1 - layer_id), ids 0 (embeddings) .. depth + 1 (head): the head at 1.0
    assert scale["encoder.patch_embed.proj.weight"] == pytest.approx(decay ** (layers - 1))  # layer 0
    assert scale["encoder.blocks.0.attn.qkv.weight"] == pytest.approx(decay ** (layers - 2))
    assert scale["encoder.blocks.1.mlp.fc2.weight"] == pytest.approx(decay ** (layers - 3))
    assert scale["decoder.head.weight"] == pytest.approx(1.0)  # depth + 1
    assert all(g["lr_scale"] == 1.0 for g in param_groups(model, 0.05, layer_decay=1.0))


def test_lr_schedule_values() -> None:
    assert lr_at(0, 1.0, 10, 100) == 0.0
    assert lr_at(5, 1.0, 10, 100) == pytest.approx(0.5)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100, min_lr=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, 1.0, 10, 100, min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(0, 2.0, 0, 10) == 2.0
    # a floor above the peak (a searched lr under the config's min_lr) holds the peak, never climbs
    assert [lr_at(s, 1e-6, 2, 10, min_lr=1e-5) for s in (2, 5, 10)] == [1e-6] * 3


def test_lr_is_set_per_step_with_group_scales_and_a_vetoed_step_changes_nothing() -> None:
    cfg = load_config(
        PretrainConfig,
        None,
        [
            "model.preset=tiny",
            "optim.lr=1.0",
            "optim.layer_decay=0.5",
            "train.steps=10",
            "data.backend=synthetic",
        ],
    )
    model = tiny_mae()
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    scales = [g["lr_scale"] for g in opt.param_groups]
    assert len(set(scales)) > 1
    for step in range(4):
        set_lr(opt, lr_at(step, 1.0, 2, 10))
        for g, s in zip(opt.param_groups, scales):
            assert g["lr"] == pytest.approx(lr_at(step, 1.0, 2, 10) * s)
    # the trainer's veto: weights and Adam moments stay exactly as they were
    x = torch.randn(1, 3, 8, 32, 32)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[:, :48] = True
    model(x, mask).loss.backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with opt.veto(True):
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not opt.state and not opt.vetoed
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not math.isnan(opt.param_groups[0]["lr"])
