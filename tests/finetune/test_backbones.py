"""CNN backbones (R(2+1)D, R3D, CNN+RNN) on the fine-tuning engine: which methods apply and what they train,
config errors naming the key, export / load / evaluate / predict of a CNN model directory, 2-rank ZeRO-2
fine-tunes of every backbone, and an exact 2-rank resume (batch-norm statistics averaged every step)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ft_helpers import REPO, ft_args, ok, run_cli, run_ranks

from finetune.config import FinetuneConfig, FinetuneSection
from finetune.export import export_hf
from finetune.model_dir import export_model_dir, load_finetuned
from finetune.peft_methods import apply_method
from pretrain.engine import ConfigError, load_config
from pretrain.models import BackboneClassifier, BackboneClassifierConfig

TINY = REPO / "finetune" / "configs" / "tiny_cpu.yaml"


def cnn(backbone: str = "r2plus1d", **over: object) -> BackboneClassifier:
    torch.manual_seed(0)
    cfg = BackboneClassifierConfig.from_preset(backbone, "tiny", num_classes=4, **over)
    return BackboneClassifier(cfg)


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_methods_on_a_cnn_train_what_they_say() -> None:
    m = cnn()
    apply_method(m, FinetuneSection(method="linear"))
    assert trainable(m) == {"head.weight", "head.bias"}
    m = cnn()
    apply_method(m, FinetuneSection(method="partial", partial_blocks=1))
    assert trainable(m) - {"head.weight", "head.bias"} and all(
        n.startswith(("encoder.layer4.", "head.")) for n in trainable(m)
    )
    m = cnn()
    s = apply_method(m, FinetuneSection(method="lora", lora_rank=2))
    lora = trainable(m) - {"head.weight", "head.bias"}
    assert lora and all(".lora_" in n for n in lora) and 0 < s["percent"] < 50
    assert any("stem.0" in n for n in lora) and any("layer4" in n for n in lora)  # every convolution
    m = cnn("cnn_rnn")
    apply_method(m, FinetuneSection(method="lora", lora_targets=["proj"]))
    assert {n.split(".lora_")[0] for n in trainable(m) if ".lora_" in n} == {"encoder.proj"}
    for method in ("adapter", "prompt"):
        with pytest.raises(ValueError, match="needs the ViT's token sequence"):
            apply_method(cnn(), FinetuneSection(method=method))


def test_frozen_batch_norms_keep_their_statistics() -> None:
    m = cnn()
    apply_method(m, FinetuneSection(method="linear"))
    before = {n: b.clone() for n, b in m.named_buffers() if "running_mean" in n}
    m.train()
    m(torch.randn(2, 3, 8, 32, 32)).sum().backward()
    assert all(torch.equal(before[n], b) for n, b in m.named_buffers() if n in before)
    full = cnn()
    apply_method(full, FinetuneSection(method="full"))
    full.train()
    full(torch.randn(2, 3, 8, 32, 32))
    assert any(not torch.equal(before[n], b) for n, b in full.named_buffers() if n in before)


def test_lora_cnn_exports_merged_and_hf_export_is_refused(tmp_path: Path) -> None:
    m = cnn()
    spec = FinetuneSection(method="lora", lora_rank=2)
    apply_method(m, spec)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a trained-looking LoRA
    m.eval()
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        expected = m(x)
    out = export_model_dir(m, m.cfg, spec, tmp_path / "model", {})
    loaded = load_finetuned(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-4)
    assert not any("lora" in k for k in loaded.state_dict())
    with pytest.raises(ValueError, match="HF VideoMAE can only express the ViT"):
        export_hf(out, tmp_path / "hf")


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (
            ["model.backbone=r3d", "finetune.method=adapter"],
            r"finetune\.method=adapter needs the ViT's token sequence",
        ),
        (["model.backbone=r3d", "model.rnn=lstm"], r"model\.rnn applies to model\.backbone=cnn_rnn only"),
        (["model.backbone=r2plus1d", "model.preset=huge"], r"model\.preset: .*unknown preset 'huge'"),
        (
            ["model.backbone=r2plus1d", "finetune.method=lora", "finetune.lora_targets=[qkv]"],
            r"choose among \['conv', 'proj', 'dynamic'\]",
        ),
        (["model.backbone=resnet"], r"model\.backbone: 'resnet' is not one of"),
    ],
)
def test_cnn_config_errors_name_the_key(shards: Path, over: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(FinetuneConfig, TINY, [f"data.shards={shards}", *over]).validate()


def test_a_vit_init_is_refused_for_a_cnn(shards: Path, mae_dir: Path) -> None:
    cfg = load_config(
        FinetuneConfig, TINY, [f"data.shards={shards}", "model.backbone=r3d", f"finetune.init={mae_dir}"]
    )
    with pytest.raises(ConfigError, match=r"holds a MaskedVideoAutoencoder, not a r3d"):
        cfg.validate()


def cnn_args(run: Path, shards: Path, backbone: str, *extra: str) -> list[str]:
    return ft_args(
        run, shards, None, f"model.backbone={backbone}", "model.preset=tiny", "augment.stride=1", *extra
    )


# r3d is the same VideoResNet module as r2plus1d with other convs: -m slow (7 s)
@pytest.mark.parametrize("backbone", ["r2plus1d", pytest.param("r3d", marks=pytest.mark.slow), "cnn_rnn"])
def test_two_rank_zero2_fine_tune_of_every_backbone(tmp_path: Path, shards: Path, backbone: str) -> None:
    run = tmp_path / backbone
    extra = ["deepspeed.zero_stage=2", "train.micro_batch_size=2", "train.steps=3", "eval.val_clips=1"]
    ok(run_ranks(cnn_args(run, shards, backbone, *extra), 2))
    model = load_finetuned(run / "model")
    assert isinstance(model, BackboneClassifier) and model.cfg.backbone == backbone
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert next(r for r in rows if "val/videos" in r)["val/videos"] == 4  # the val split, gathered over ranks
    assert [r for r in rows if "loss" in r][-1]["mfu"] != 0  # analytic FLOPs known (MFU is NaN on CPU)


@pytest.mark.slow  # 25 s; 2-rank CNN fine-tunes stay in the default run (every backbone, above)
def test_exact_two_rank_resume_of_a_cnn_and_its_evaluate_predict(
    tmp_path: Path, shards: Path, raw_videos: list[Path]
) -> None:
    common = [
        "deepspeed.zero_stage=2",
        "train.micro_batch_size=2",
        "train.steps=4",
        "train.eval_every=0",
        "data.val_split=null",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ok(run_ranks(cnn_args(straight, shards, "r2plus1d", *common), 2))
    ok(run_ranks(cnn_args(resumed, shards, "r2plus1d", *common, "train.stop_at=2"), 2))
    ok(run_ranks([*cnn_args(resumed, shards, "r2plus1d", *common), "--resume", "auto"], 2))

    def losses(run: Path) -> list[float]:
        return [
            json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
        ]

    assert losses(straight) == losses(resumed) and len(losses(straight)) == 4
    a, b = load_finetuned(straight / "model").state_dict(), load_finetuned(resumed / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # batch-norm statistics included

    r = run_cli(
        [
            "evaluate",
            "--model",
            str(straight / "model"),
            "--shards",
            str(shards),
            "--split",
            "test",
            "--json",
            "--no-mlflow",
            "--backend",
            "pyav",
        ]
    )
    ok(r)
    line = json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][-1])
    assert line["n"] == 4 and line["views"] == "2x1"
    r = run_cli(["predict", "--model", str(straight / "model"), str(raw_videos[0]), "--json"])
    ok(r)
    assert len(json.loads(r.stdout.splitlines()[-1])["top"]) == 4
