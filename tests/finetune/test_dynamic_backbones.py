"""Dynamic convolution backbones on the fine-tuning engine: TAda2D (`model.backbone=tada2d`) and the video
ResNets with `model.dynamic=kernel_mixture|selective_kernel`. What each method trains, LoRA targets on the new
modules (shared kernels, branches, route / attention MLPs) and an exact merged export, config errors naming
the key, and short real `python -m finetune` runs (1 rank and 2-rank ZeRO-2) with evaluate / predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ft_helpers import ft_args, ok, run_cli, run_ranks
from test_backbones import TINY, trainable

from finetune.config import FinetuneConfig, FinetuneSection, classifier_config
from finetune.model_dir import export_model_dir, load_finetuned
from finetune.peft_methods import apply_method
from pretrain.engine import ConfigError, load_config
from pretrain.models import BackboneClassifier, BackboneClassifierConfig

HEAD = {"head.weight", "head.bias"}


def model(backbone: str = "tada2d", **over: object) -> BackboneClassifier:
    torch.manual_seed(0)
    return BackboneClassifier(BackboneClassifierConfig.from_preset(backbone, "tiny", num_classes=4, **over))


def lora_layers(m: torch.nn.Module) -> set[str]:
    return {n.split(".lora_")[0] for n in trainable(m) if ".lora_" in n}


def test_lora_targets_on_tada2d() -> None:
    m = model()
    apply_method(m, FinetuneSection(method="lora", lora_rank=2))  # default: [conv]
    layers = lora_layers(m)
    assert (
        "encoder.layer1.0.conv1.conv" in layers and "encoder.layer4.0.conv2.conv" in layers
    )  # shared kernels
    assert "encoder.conv1" in layers and "encoder.layer2.0.downsample.0" in layers  # Conv2d 1×1 merges
    assert not any(".route." in n for n in layers)
    m = model()
    apply_method(m, FinetuneSection(method="lora", lora_rank=2, lora_targets=["dynamic"]))
    layers = lora_layers(m)
    assert {n.rsplit(".", 1)[1] for n in layers} == {"context", "a", "b"}  # the route's Linear and Conv1ds
    assert all(".route." in n for n in layers) and len(layers) == 3 * 8  # 8 TAda convs in the tiny net
    assert trainable(m) - HEAD == {n for n in trainable(m) if ".lora_" in n}


def test_lora_targets_on_dynamic_video_resnets() -> None:
    km = model("r2plus1d", dynamic="kernel_mixture")
    apply_method(km, FinetuneSection(method="lora", lora_targets=["conv", "dynamic"]))
    layers = lora_layers(km)
    assert {"encoder.stem.0", "encoder.stem.3"} <= layers  # the static convs
    assert (
        "encoder.layer1.0.conv1.0.0.attention.fc1" in layers
        and "encoder.layer1.0.conv1.0.0.attention.fc2" in layers
    )
    assert not any(n.endswith(".weight") for n in layers)  # the K-kernel bank is a tensor: not wrapped
    sk = model("r3d", dynamic="selective_kernel")
    apply_method(sk, FinetuneSection(method="lora"))
    assert {"encoder.layer1.0.conv1.0.branches.0", "encoder.layer1.0.conv1.0.branches.1"} <= lora_layers(sk)


@pytest.mark.parametrize(
    ("backbone", "over"),
    [
        ("tada2d", {}),
        ("tada2d", {"block": "bottleneck"}),
        ("r2plus1d", {"dynamic": "kernel_mixture"}),
        ("r3d", {"dynamic": "selective_kernel"}),
    ],
    ids=["tada2d", "tada2d-bottleneck", "r2plus1d-kernel_mixture", "r3d-selective_kernel"],
)
def test_lora_on_convs_and_routes_exports_merged(tmp_path: Path, backbone: str, over: dict) -> None:
    m = model(backbone, **over)
    spec = FinetuneSection(method="lora", lora_rank=2, lora_targets=["conv", "dynamic"])
    apply_method(m, spec)
    with torch.no_grad():  # trained-looking LoRA and routes / attentions
        for n, p in m.named_parameters():
            if "lora_B" in n or n.endswith(
                ("b.base_layer.weight", "fc2.base_layer.weight", "select.base_layer.weight")
            ):
                p.normal_(0, 0.05)
    m.eval()
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        expected = m(x)
    loaded = load_finetuned(export_model_dir(m, m.cfg, spec, tmp_path / "model", {}))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-4)
    assert not any("lora" in k for k in loaded.state_dict()) and loaded.cfg.encoder == m.cfg.encoder


def test_other_methods_on_tada2d() -> None:
    m = model()
    apply_method(m, FinetuneSection(method="partial", partial_blocks=1))
    assert trainable(m) - HEAD and all(n.startswith(("encoder.layer4.", "head.")) for n in trainable(m))
    assert any(".route." in n for n in trainable(m))
    m = model()
    apply_method(m, FinetuneSection(method="bitfit"))
    assert {n for n in trainable(m) if n.startswith("encoder.")} == {
        n for n, _ in m.named_parameters() if n.endswith("bias") and n.startswith("encoder.")
    }
    m = model()
    apply_method(m, FinetuneSection(method="linear"))
    assert trainable(m) == HEAD


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (
            ["model.backbone=tada2d", "model.dynamic=kernel_mixture"],
            r"model\.dynamic applies to model\.backbone in",
        ),
        (["model.backbone=cnn_rnn", "model.dynamic=selective_kernel"], r"model\.dynamic applies"),
        (
            ["model.backbone=r3d", "model.dynamic=condconv"],
            r"model\.dynamic: 'condconv' is not",
        ),
        (["model.backbone=tada2d", "model.preset=101"], r"unknown preset '101'"),
        (
            ["model.backbone=r2plus1d", "finetune.method=lora", "finetune.lora_targets=[proj]"],
            r"lora_targets \['proj'\]: no such layer",
        ),
    ],
)
def test_dynamic_config_errors_name_the_key(shards: Path, over: list[str], message: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=message):
        cfg = load_config(FinetuneConfig, TINY, [f"data.shards={shards}", *over])
        cfg.validate()
        apply_method(BackboneClassifier(classifier_config(cfg)), cfg.finetune)


def test_dynamic_keys_reach_the_encoder(shards: Path) -> None:
    over = ["model.backbone=mc3", "model.dynamic=kernel_mixture", "model.encoder.dynamic_kernels=2"]
    cfg = load_config(FinetuneConfig, TINY, [f"data.shards={shards}", *over])
    cfg.validate()
    enc = classifier_config(cfg).encoder
    assert (enc.dynamic, enc.dynamic_kernels, enc.arch) == ("kernel_mixture", 2, "mc3")
    assert (cfg.optim.lr, cfg.optim.layer_decay) == (3e-3, 1.0)  # the CNN family's recipe
    cfg = load_config(FinetuneConfig, TINY, [f"data.shards={shards}", "model.backbone=tada2d"])
    cfg.validate()
    assert classifier_config(cfg).encoder.preset == "tiny" and cfg.optim.lr == 3e-3
    # YAML reads 50 as a number: a string field takes it as the name "50"
    cfg = load_config(
        FinetuneConfig, TINY, [f"data.shards={shards}", "model.backbone=tada2d", "model.preset=50"]
    )
    assert cfg.model.preset == "50" and classifier_config(cfg).encoder.block == "bottleneck"


def args(run: Path, shards: Path, backbone: str, *extra: str) -> list[str]:
    return ft_args(
        run, shards, None, f"model.backbone={backbone}", "model.preset=tiny", "augment.stride=1", *extra
    )


@pytest.mark.parametrize(
    ("backbone", "extra"),
    [
        ("tada2d", ["finetune.method=lora", "finetune.lora_targets=[conv,dynamic]"]),
        ("r2plus1d", ["model.dynamic=kernel_mixture"]),
    ],
    ids=["tada2d-lora", "r2plus1d-kernel_mixture"],
)
@pytest.mark.slow  # 11 + 9 s; the dynamic convs' parity, FLOPs and model dirs stay in the default run
def test_cli_fine_tune_then_predict(
    tmp_path: Path, shards: Path, raw_videos: list[Path], backbone: str, extra: list[str]
) -> None:
    run = tmp_path / backbone
    ok(run_cli(args(run, shards, backbone, "train.steps=3", *extra)))
    m = load_finetuned(run / "model")
    assert isinstance(m, BackboneClassifier) and m.cfg.backbone == backbone
    assert not any("lora" in k for k in m.state_dict())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3] and losses[-1]["mfu"] != 0  # analytic FLOPs known
    r = run_cli(["predict", "--model", str(run / "model"), str(raw_videos[0]), "--json"])
    ok(r)
    assert len(json.loads(r.stdout.splitlines()[-1])["top"]) == 4


@pytest.mark.slow  # the default run keeps the R(2+1)D 2-rank exact resume (test_backbones)
def test_two_rank_zero2_fine_tune_and_exact_resume_of_tada2d(tmp_path: Path, shards: Path) -> None:
    common = ["deepspeed.zero_stage=2", "train.micro_batch_size=2", "train.steps=4", "data.val_split=null"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ok(run_ranks(args(straight, shards, "tada2d", *common), 2))
    ok(run_ranks(args(resumed, shards, "tada2d", *common, "train.stop_at=2"), 2))
    ok(run_ranks([*args(resumed, shards, "tada2d", *common), "--resume", "auto"], 2))

    def losses(run: Path) -> list[float]:
        return [
            json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
        ]

    assert losses(straight) == losses(resumed) and len(losses(straight)) == 4
    a, b = load_finetuned(straight / "model").state_dict(), load_finetuned(resumed / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # route batch-norm statistics included


@pytest.mark.slow  # the default run keeps the R(2+1)D 2-rank exact resume (test_backbones)
def test_two_rank_zero2_fine_tune_of_a_kernel_mixture_r2plus1d(tmp_path: Path, shards: Path) -> None:
    run = tmp_path / "km"
    extra = [
        "model.dynamic=kernel_mixture",
        "deepspeed.zero_stage=2",
        "train.micro_batch_size=2",
        "train.steps=3",
    ]
    ok(run_ranks(args(run, shards, "r2plus1d", *extra, "eval.val_clips=1"), 2))
    m = load_finetuned(run / "model")
    assert m.cfg.encoder.dynamic == "kernel_mixture" and m.encoder.layer1[0].conv1[0][0].weight.shape[0] == 4
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert next(r for r in rows if "val/videos" in r)["val/videos"] == 4  # gathered over the ranks
