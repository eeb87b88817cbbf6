"""Optimizer parameter groups (no-weight-decay set, layer-wise LR decay) and the per-step LR schedule."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.engine.config import load_config
from pretrain.engine.optim import WarmupCosine, build_optimizer, lr_at, param_groups
from pretrain.models import MAEConfig, MaskedVideoAutoencoder, apply_activation_checkpointing
from pretrain.task import PretrainConfig


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
    assert scale["encoder.patch_embed.proj.weight"] == pytest.approx(decay**layers)  # layer 0
    assert scale["encoder.blocks.0.attn.qkv.weight"] == pytest.approx(decay ** (layers - 1))
    assert scale["encoder.blocks.1.mlp.fc2.weight"] == pytest.approx(decay ** (layers - 2))
    assert scale["decoder.head.weight"] == pytest.approx(decay ** (layers - 3))  # depth + 1
    assert all(g["lr_scale"] == 1.0 for g in param_groups(model, 0.05, layer_decay=1.0))


def test_lr_schedule_values() -> None:
    assert lr_at(0, 1.0, 10, 100) == 0.0
    assert lr_at(5, 1.0, 10, 100) == pytest.approx(0.5)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100, min_lr=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, 1.0, 10, 100, min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(0, 2.0, 0, 10) == 2.0


def test_scheduler_honours_group_scales_per_step() -> None:
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
    sched = WarmupCosine(opt, 1.0, warmup=2, total=10, min_lr=0.0)
    seen = []
    for _ in range(4):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    scales = [g["lr_scale"] for g in opt.param_groups]
    for step, lrs in enumerate(seen):
        for lr, s in zip(lrs, scales):
            assert lr == pytest.approx(lr_at(step, 1.0, 2, 10) * s)
    # resume: only the position is restored; the shape follows the current run's settings
    state = sched.state_dict()
    assert state == {"last_epoch": 4}
    sched2 = WarmupCosine(opt, 1.0, warmup=2, total=20, min_lr=0.0)
    sched2.load_state_dict(state)
    assert opt.param_groups[-1]["lr"] == pytest.approx(lr_at(4, 1.0, 2, 20) * scales[-1])
    assert not math.isnan(opt.param_groups[0]["lr"])
