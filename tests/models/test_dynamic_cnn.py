"""Dynamic convolution backbones: TAdaConv / TAda2D and the kernel-mixture / selective-kernel video ResNets.

Parity first (a TAdaConv with calibration 1 is the plain Conv2d on every frame, bit for bit; a kernel mixture
of K identical kernels and a selective kernel of identical branches are the plain Conv3d), then the calibrated
/ mixed kernels against a per-frame / per-sample reference, 2-D weights into TAda2D, shapes and gradients of
every preset and option, FLOPs against ``torch.utils.flop_counter``, and the model directory round trip."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pretrain.models import (
    BackboneClassifier,
    BackboneClassifierConfig,
    CnnRnnConfig,
    TAda2D,
    TAda2DConfig,
    VideoResNetConfig,
    backbone_config,
    classifier_forward_flops_per_clip,
    classifier_training_flops_per_clip,
    count_backbone_parameters,
    load_model,
    save_model,
    tada2d_from_resnet_state_dict,
)
from pretrain.models.cnn_rnn import FrameResNet
from pretrain.models.dynamic_conv import KernelMixtureConv3d, SelectiveKernelConv3d, TAdaConv2d
from pretrain.models.io import read_model_config
from pretrain.models.tada2d import TemporalAggregation

BN1 = nn.BatchNorm1d
DYNAMIC = [
    (arch, kind) for arch in ("r2plus1d", "r3d", "mc3") for kind in ("kernel_mixture", "selective_kernel")
]
# (backbone, encoder overrides): every new model the tests build at the tiny scale
VARIANTS = [("tada2d", {}), ("tada2d", {"block": "bottleneck"}), *((a, {"dynamic": k}) for a, k in DYNAMIC)]
VARIANT_IDS = ["tada2d", "tada2d-bottleneck", *(f"{a}-{k}" for a, k in DYNAMIC)]


def tiny(backbone: str, seed: int = 0, **enc: object) -> BackboneClassifier:
    torch.manual_seed(seed)
    return BackboneClassifier(BackboneClassifierConfig.from_preset(backbone, "tiny", 3, **enc))


def clip(cfg, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)


def randomize_routes(model: nn.Module, std: float = 0.5) -> None:
    """Give the zero-initialised last route / attention layers values (a trained-looking calibration)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("route.b.weight", "attention.fc2.weight", "attention.select.weight")):
                p.normal_(0.0, std)


# -- parity: the dynamic layers against the plain convolution -----------------------------------------


@pytest.mark.parametrize("stride", [1, 2])
def test_tada_conv_with_unit_calibration_is_the_plain_conv_per_frame(stride: int) -> None:
    torch.manual_seed(0)
    tada = TAdaConv2d(6, 10, 3, stride, BN1).train()
    plain = nn.Conv2d(6, 10, 3, stride=stride, padding=1, bias=False)
    plain.weight.data.copy_(tada.conv.weight)
    x_NCHW = torch.randn(2 * 5, 6, 12, 12)  # 2 clips × 5 frames
    assert torch.equal(tada.calibration(x_NCHW, 5), torch.ones(10, 10))  # α = 1 at init, exactly
    assert torch.equal(tada(x_NCHW, 5), plain(x_NCHW))


def test_tada_conv_is_the_per_frame_calibrated_kernel() -> None:
    torch.manual_seed(0)
    tada = TAdaConv2d(6, 10, 3, 1, BN1).eval()
    randomize_routes(tada)
    x_NCHW = torch.randn(2 * 5, 6, 12, 12)
    alpha_NO = tada.calibration(x_NCHW, 5)
    assert not torch.allclose(alpha_NO, torch.ones_like(alpha_NO))
    assert not torch.allclose(alpha_NO[0], alpha_NO[1])  # frames of one clip get different kernels
    want = torch.cat(
        [
            F.conv2d(x_NCHW[n : n + 1], tada.conv.weight * alpha_NO[n, :, None, None, None], padding=1)
            for n in range(10)
        ]
    )
    torch.testing.assert_close(tada(x_NCHW, 5), want, rtol=1e-5, atol=1e-5)
    # temporal context: changing the last frame of clip 0 changes the calibration of its other frames only
    x2 = x_NCHW.clone()
    x2[4] += 1.0
    alpha2 = tada.calibration(x2, 5)
    assert not torch.allclose(alpha2[:4], alpha_NO[:4]) and torch.equal(alpha2[5:], alpha_NO[5:])


def test_kernel_mixture_with_identical_kernels_is_the_plain_conv() -> None:
    torch.manual_seed(0)
    km = KernelMixtureConv3d(6, 8, (3, 3, 3), (1, 2, 2), (1, 1, 1), kernels=4)
    randomize_routes(km, std=2.0)
    with torch.no_grad():
        km.weight.copy_(km.weight[0].expand_as(km.weight))
    x = torch.randn(3, 6, 4, 10, 10)
    pi_BK = km.mixture(x)
    torch.testing.assert_close(pi_BK.sum(1), torch.ones(3))
    assert pi_BK.std(1).min() > 0.01  # the attention is not uniform, yet the result is the plain conv
    want = F.conv3d(x, km.weight[0], stride=(1, 2, 2), padding=1)
    torch.testing.assert_close(km(x), want, rtol=1e-5, atol=1e-5)


def test_kernel_mixture_is_the_per_sample_mixed_kernel() -> None:
    torch.manual_seed(0)
    km = KernelMixtureConv3d(6, 8, (3, 1, 1), (2, 1, 1), (1, 0, 0), kernels=3, temperature=0.5)
    assert torch.equal(km.mixture(torch.randn(2, 6, 4, 5, 5)), torch.full((2, 3), 1 / 3))  # uniform at init
    randomize_routes(km, std=2.0)
    x = torch.randn(3, 6, 4, 5, 5)
    pi_BK = km.mixture(x)
    want = torch.cat(
        [
            F.conv3d(
                x[b : b + 1],
                torch.einsum("k,koc...->oc...", pi_BK[b], km.weight),
                stride=(2, 1, 1),
                padding=(1, 0, 0),
            )
            for b in range(3)
        ]
    )
    torch.testing.assert_close(km(x), want, rtol=1e-5, atol=1e-5)


def test_selective_kernel_with_identical_branches_is_the_plain_conv() -> None:
    torch.manual_seed(0)
    sk = SelectiveKernelConv3d(6, 8, (3, 3, 3), (1, 1, 1), (1, 1, 1), temporal_kernels=(3, 3))
    randomize_routes(sk, std=2.0)
    with torch.no_grad():
        sk.branches[1].weight.copy_(sk.branches[0].weight)
    x = torch.randn(2, 6, 4, 7, 7)
    torch.testing.assert_close(sk(x), sk.branches[0](x), rtol=1e-5, atol=1e-5)


def test_selective_kernel_weighs_its_temporal_sizes_per_sample_and_channel() -> None:
    torch.manual_seed(0)
    sk = SelectiveKernelConv3d(6, 8, (3, 1, 1), (2, 1, 1), (1, 0, 0), temporal_kernels=(3, 5))
    assert [b.kernel_size for b in sk.branches] == [(3, 1, 1), (5, 1, 1)]
    x = torch.randn(2, 6, 4, 5, 5)
    torch.testing.assert_close(sk(x), (sk.branches[0](x) + sk.branches[1](x)) / 2)  # equal weights at init
    randomize_routes(sk, std=2.0)
    u = torch.stack([b(x) for b in sk.branches])
    a_BMO = sk.selection(u)
    torch.testing.assert_close(a_BMO.sum(1), torch.ones(2, 8))
    want = a_BMO[:, 0, :, None, None, None] * u[0] + a_BMO[:, 1, :, None, None, None] * u[1]
    torch.testing.assert_close(sk(x), want)


def test_temporal_aggregation_averages_neighbouring_frames() -> None:
    agg = TemporalAggregation(4, 3, lambda c: nn.Identity())
    y = torch.randn(2 * 5, 4, 3, 3)  # 2 clips × 5 frames
    out = agg(y, 5)
    torch.testing.assert_close(out[2], (y[1] + y[2] + y[3]) / 3)
    torch.testing.assert_close(out[5], (y[5] + y[6]) / 3)  # clip 1's first frame: zero padding, no leak
    assert TemporalAggregation(4, 0, BN1)(y, 5) == 0.0
    plain = TAda2D(TAda2DConfig.from_preset("tiny", temporal_aggregation=0))
    assert not any(".agg" in n for n, _ in plain.named_parameters())
    assert plain(torch.randn(1, 3, 8, 32, 32)).shape == (1, 64)


# -- TAda2D: presets, 2-D weights ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "params", "resnet"),
    # the 2-D part is torchvision's resnet18 / resnet50 without fc (11,176,512 / 23,508,032); the rest: routes
    # and the temporal aggregations' norms
    [("tiny", 168_974, None), ("18", 14_091_120, 11_176_512), ("50", 26_665_872, 23_508_032)],
)
def test_tada2d_presets(preset: str, params: int, resnet: int | None) -> None:
    cfg = backbone_config("tada2d", preset)
    assert count_backbone_parameters(cfg) == params
    with torch.device("meta"):
        model = TAda2D(cfg)
        assert model(torch.empty(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size)).shape == (
            2,
            cfg.feature_dim,
        )
    if resnet is not None:
        assert (
            sum(p.numel() for n, p in model.named_parameters() if ".route." not in n and ".agg" not in n)
            == resnet
        )
    r2plus1d = count_backbone_parameters(backbone_config("r2plus1d", "tiny"))
    if preset == "tiny":  # the demo's scale: comparable to R(2+1)D-tiny
        assert (cfg.num_frames, cfg.img_size) == (8, 32) and 0.8 * r2plus1d <= params <= 1.2 * r2plus1d
    assert (backbone_config("tada2d", "50").feature_dim, backbone_config("tada2d").preset) == (2048, "18")


def test_tada2d_at_init_is_its_2d_resnet_on_every_frame() -> None:
    """2-D weights load by name (TAda kernels under .conv); with calibration 1 it is the 2-D net per frame."""
    torch.manual_seed(1)
    tcfg = TAda2DConfig.from_preset("tiny", num_frames=4)
    resnet = FrameResNet(
        CnnRnnConfig(widths=tcfg.widths, depths=tcfg.depths, img_size=32, num_frames=4)
    ).eval()
    with torch.no_grad():  # non-trivial norm statistics
        for name, buf in resnet.named_buffers():
            if "running" in name:
                buf.uniform_(0.5, 1.5)
    model = BackboneClassifier(BackboneClassifierConfig(backbone="tada2d", encoder=tcfg, num_classes=3))
    state, left = tada2d_from_resnet_state_dict(
        {**resnet.state_dict(), "fc.weight": torch.zeros(1000, 64)}, model
    )
    assert torch.equal(
        state["encoder.layer1.0.conv1.conv.weight"], resnet.state_dict()["layer1.0.conv1.weight"]
    )
    assert left and all(".route." in k or ".agg" in k or k.startswith("head.") for k in left)
    assert any(".agg1.norm." in k for k in left)
    model.load_state_dict(state)
    model.eval()
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        want = rearrange(resnet(rearrange(x, "b c t h w -> (b t) c h w")), "(b t) d -> b t d", t=4).mean(1)
        torch.testing.assert_close(model.forward_features(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"missing keys \['encoder.layer4.0.bn2.weight'\]"):
        sd = dict(resnet.state_dict())
        del sd["layer4.0.bn2.weight"]
        tada2d_from_resnet_state_dict(sd, model)


# -- every preset and option: shapes, gradients, configs ------------------------------------------------


@pytest.mark.parametrize(("backbone", "enc"), VARIANTS, ids=VARIANT_IDS)
def test_forward_backward_and_every_parameter_learns(backbone: str, enc: dict) -> None:
    """The routes / attentions start neutral (their last layer is zero), so their first layers get gradient
    from the second step on: two SGD steps, then every parameter has a gradient."""
    model = tiny(backbone, **enc).train()
    x, y = clip(model.cfg), torch.tensor([0, 2])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        logits = model(x)
        assert logits.shape == (2, 3) and logits.isfinite().all()
        F.cross_entropy(logits, y).backward()
        opt.step()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(("backbone", "enc"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize(("frames", "size"), [(8, 32), (16, 112), (4, 48)])
def test_output_shapes_for_other_geometries(backbone: str, enc: dict, frames: int, size: int) -> None:
    cfg = BackboneClassifierConfig.from_preset(backbone, "tiny", 5, num_frames=frames, img_size=size, **enc)
    with torch.device("meta"):
        model = BackboneClassifier(cfg)
        assert model(torch.empty(3, 3, frames, size, size)).shape == (3, 5)


def test_which_convs_are_dynamic() -> None:
    km = tiny("r2plus1d", dynamic="kernel_mixture").encoder
    assert isinstance(km.stem[0], nn.Conv3d) and isinstance(km.layer2[0].downsample[0], nn.Conv3d)
    assert isinstance(km.layer1[0].conv1[0][0], KernelMixtureConv3d)  # spatial factor
    assert isinstance(km.layer1[0].conv1[0][3], KernelMixtureConv3d)  # temporal factor
    sk = tiny("r2plus1d", dynamic="selective_kernel").encoder
    assert isinstance(sk.layer1[0].conv1[0][0], nn.Conv3d)  # 1×3×3: no temporal extent to select
    assert isinstance(sk.layer1[0].conv1[0][3], SelectiveKernelConv3d)
    mc3 = tiny("mc3", dynamic="selective_kernel").encoder
    assert isinstance(mc3.layer1[0].conv1[0], SelectiveKernelConv3d) and isinstance(
        mc3.layer2[0].conv1[0], nn.Conv3d
    )
    tada = tiny("tada2d").encoder
    assert isinstance(tada.layer1[0].conv1, TAdaConv2d) and isinstance(tada.conv1, nn.Conv2d)
    bott = tiny("tada2d", block="bottleneck").encoder
    assert isinstance(bott.layer1[0].conv2, TAdaConv2d) and isinstance(bott.layer1[0].conv1, nn.Conv2d)


def test_dynamic_configs_errors_and_hooks() -> None:
    with pytest.raises(ValueError, match="dynamic='condconv'"):
        VideoResNetConfig(dynamic="condconv")
    with pytest.raises(ValueError, match="sk_kernels"):
        VideoResNetConfig(dynamic="selective_kernel", sk_kernels=(3, 4))
    with pytest.raises(ValueError, match="dynamic_temperature"):
        VideoResNetConfig(dynamic_temperature=0.0)
    with pytest.raises(ValueError, match="block='wide'"):
        TAda2DConfig(block="wide")
    with pytest.raises(ValueError, match="temporal_aggregation=2"):
        TAda2DConfig(temporal_aggregation=2)
    with pytest.raises(KeyError, match=r"unknown preset '101'"):
        backbone_config("tada2d", "101")
    model = tiny("tada2d")
    stages = model.stage_prefixes()
    assert stages[0] == ("encoder.conv1.", "encoder.bn1.") and len(stages) == 5
    for name, _ in model.named_parameters():
        owners = [i for i, s in enumerate(stages) if name.startswith(s)]
        assert owners == ([] if name.startswith("head.") else [model.layer_index(name)]), name
    decayed = [n for n, p in model.named_parameters() if p.ndim > 1]
    assert all(".bias" not in n for n in decayed)


def test_group_norm_tada2d_is_batch_independent() -> None:
    model = tiny("tada2d", norm="group").train().double()  # float64: the calibrations amplify fp32 rounding
    randomize_routes(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = clip(model.cfg, batch=3).double()
    torch.testing.assert_close(model(x)[:1], model(x[:1]))


# -- FLOPs ---------------------------------------------------------------------------------------------


def counted(fn) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as fc:
            fn()
    return fc.get_total_flops()


@pytest.mark.parametrize(("backbone", "enc"), VARIANTS, ids=VARIANT_IDS)
def test_analytic_flops_match_flop_counter(backbone: str, enc: dict) -> None:
    model = tiny(backbone, **enc)
    # batch 1 for the training count: the flop counter's weight-gradient formula ignores conv groups, so it
    # counts a kernel mixture's per-sample grouped conv B times over for B > 1 (the forward is exact for any B)
    x = clip(model.cfg, batch=2)
    assert counted(lambda: model(x)) == 2 * classifier_forward_flops_per_clip(model.cfg)
    train = counted(lambda: model(x[:1]).sum().backward())
    expected = classifier_training_flops_per_clip(model.cfg)
    assert 0.8 * expected <= train <= expected


@pytest.mark.parametrize("preset", ["18", "50"])
def test_tada2d_large_preset_flops_on_meta(preset: str) -> None:
    cfg = BackboneClassifierConfig.from_preset("tada2d", preset, 400)
    with torch.device("meta"):
        model = BackboneClassifier(cfg)
        n = counted(lambda: model(torch.empty(1, 3, cfg.num_frames, cfg.img_size, cfg.img_size)))
    assert n == classifier_forward_flops_per_clip(cfg)
    if preset == "50":  # torchvision's resnet50: 4.09 GMACs per 224² frame; the routes add under 0.1 %
        assert 4.08 * 8 <= (n - 2 * 2048 * 400) / 2e9 <= 4.1 * 8


# -- model directory -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backbone", "enc"), VARIANTS, ids=VARIANT_IDS)
def test_save_load_round_trip(tmp_path, backbone: str, enc: dict) -> None:
    model = tiny(backbone, **enc)
    randomize_routes(model)
    model.cfg.class_names = ["a", "b", "c"]
    model.train()
    model(clip(model.cfg))  # norm statistics move (routes included): they must be saved too
    save_model(model, tmp_path)
    arch, cfg, meta = read_model_config(tmp_path)
    assert arch == "BackboneClassifier" and cfg == model.cfg and meta["config"]["backbone"] == backbone
    loaded = load_model(tmp_path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    x = clip(model.cfg, seed=1)
    assert torch.equal(model.eval()(x), loaded.eval()(x))


def test_bare_tada2d_round_trip(tmp_path) -> None:
    enc = TAda2D(backbone_config("tada2d", "tiny"))
    save_model(enc, tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded) is TAda2D and loaded.cfg == enc.cfg
    x = clip(enc.cfg)
    assert torch.equal(enc.eval()(x), loaded.eval()(x))
