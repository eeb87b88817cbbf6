"""PEFT methods on the real classifier, in process: which parameters train, what the optimizer holds,
zero-initialised methods start at the base model, merge / export parity, HF export parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.config import FinetuneSection
from finetune.export import export_hf
from finetune.model_dir import export_model_dir, load_finetuned
from finetune.peft_methods import SIDECAR_NAME, apply_method
from pretrain.engine.config import EngineConfig
from pretrain.engine.optim import build_optimizer
from pretrain.models import VideoClassifier, VideoClassifierConfig, VideoViTConfig, load_model

ENC = VideoViTConfig.from_preset("tiny", img_size=32, num_frames=8)
CFG = VideoClassifierConfig(encoder=ENC, num_classes=4, fc_norm_eps=1e-5, class_names=["a", "b", "c", "d"])


def base_model(seed: int = 0) -> VideoClassifier:
    torch.manual_seed(seed)
    m = VideoClassifier(CFG)
    with torch.no_grad():  # a non-trivial head so logits differ between inputs
        m.head.weight.normal_(0, 0.5)
    return m.eval()


def video(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 32, 32, generator=torch.Generator().manual_seed(seed))


def applied(method: str, **kw: object) -> tuple[VideoClassifier, dict]:
    m = base_model()
    s = apply_method(m, FinetuneSection(method=method, **kw))
    return m, s


HEAD = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


@pytest.mark.parametrize(
    ("method", "kw", "check"),
    [
        ("full", {}, lambda n, all_: n == all_),
        ("linear", {}, lambda n, all_: n == {"head.weight", "head.bias"}),
        (
            "partial",
            {"partial_blocks": 1},
            lambda n, all_: n == HEAD | {k for k in all_ if k.startswith("encoder.blocks.1.")},
        ),
        ("bitfit", {}, lambda n, all_: n >= HEAD and all(k in HEAD or k.endswith(("bias",)) for k in n)),
        (
            "lora",
            {"lora_targets": ["qkv", "proj", "fc1", "fc2"]},
            lambda n, all_: len(n - HEAD) == 2 * 2 * 4 and all(".lora_" in k for k in n - HEAD),
        ),
        (
            "peft",
            {"peft_type": "IA3", "lora_targets": ["qkv", "fc2"]},
            lambda n, all_: all(".ia3_" in k for k in n - HEAD),
        ),
        (
            "adapter",
            {"adapter_width": 8},
            lambda n, all_: len(n - HEAD) == 2 * 4 and all(".adapter." in k for k in n - HEAD),
        ),
        ("prompt", {"prompt_tokens": 4}, lambda n, all_: n - HEAD == {"prompt.tokens"}),
    ],
)
def test_exactly_the_intended_parameters_train(method: str, kw: dict, check) -> None:
    m, s = applied(method, **kw)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    all_names = {n for n, _ in m.named_parameters()}
    assert names == set(s["names"])
    assert check(names, all_names), sorted(names)
    assert s["trainable"] == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert 0 < s["percent"] <= 100
    if method != "full":
        assert s["percent"] < 50
    # the engine's optimizer holds exactly the trainable tensors
    opt = build_optimizer(m, EngineConfig(), torch.device("cpu"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in m.parameters() if p.requires_grad}


def test_bitfit_includes_attention_biases() -> None:
    m, _ = applied("bitfit")
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {
        "encoder.blocks.0.attn.q_bias",
        "encoder.blocks.0.attn.v_bias",
        "encoder.blocks.1.mlp.fc1.bias",
    } <= names
    assert "encoder.blocks.0.mlp.fc1.weight" not in names


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("lora", {"lora_targets": ["qkv", "proj", "fc1", "fc2"]}),
        ("peft", {"peft_type": "IA3", "lora_targets": ["qkv", "proj", "fc1", "fc2"]}),
        ("peft", {"peft_type": "LoHa", "lora_targets": ["qkv", "fc1"]}),
        ("adapter", {"adapter_width": 8}),
    ],
)
def test_zero_initialised_methods_start_at_the_base_model(method: str, kw: dict) -> None:
    x = video()
    with torch.no_grad():
        ref = base_model()(x)
        m, _ = applied(method, **kw)
        out = m.eval()(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_lora_on_qkv_takes_effect_and_gets_gradients() -> None:
    """Attention calls F.linear with qkv.weight directly: the method must route qkv through its module."""
    m, _ = applied("lora", lora_targets=["qkv"])
    x = video()
    with torch.no_grad():
        ref = m(x)
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        moved = m(x)
    assert not torch.allclose(ref, moved, atol=1e-4)
    m.train()
    m(x).sum().backward()
    grads = [p.grad for n, p in m.named_parameters() if "qkv.lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def _perturb(m: torch.nn.Module, pattern: str) -> None:
    with torch.no_grad():
        for n, p in m.named_parameters():
            if pattern in n:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize(
    ("method", "kw", "pattern"),
    [
        ("lora", {"lora_targets": ["qkv", "proj", "fc1", "fc2"]}, "lora_B"),
        ("lora", {"lora_targets": ["qkv", "patch_embed"]}, "lora_B"),  # the tubelet Conv3d too
        ("peft", {"peft_type": "IA3", "lora_targets": ["qkv", "fc2"]}, "ia3_l"),
    ],
)
def test_merged_export_gives_the_adapted_logits_without_peft(
    tmp_path: Path, method: str, kw: dict, pattern: str
) -> None:
    m, _ = applied(method, **kw)
    _perturb(m, pattern)
    x = video()
    with torch.no_grad():
        adapted = m.eval()(x)
    out = export_model_dir(
        m, CFG, FinetuneSection(method=method, **kw), tmp_path / "model", {"finetune": {"method": method}}
    )
    assert not (out / SIDECAR_NAME).exists()
    meta = json.loads((out / "config.json").read_text())
    assert meta["extra"]["finetune"]["merged"] is True
    plain = load_model(out).eval()  # the plain loader: no peft involved
    assert not any("lora" in n or "ia3" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), adapted, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("method", "kw", "pattern"),
    [
        ("adapter", {"adapter_width": 8}, ".adapter.up"),
        ("prompt", {"prompt_tokens": 3, "prompt_deep": True}, "prompt."),
    ],
)
def test_unmergeable_methods_export_a_sidecar(tmp_path: Path, method: str, kw: dict, pattern: str) -> None:
    m, _ = applied(method, **kw)
    _perturb(m, pattern)
    x = video()
    with torch.no_grad():
        adapted = m.eval()(x)
    out = export_model_dir(m, CFG, FinetuneSection(method=method, **kw), tmp_path / "model", {})
    assert (out / SIDECAR_NAME).is_file()
    assert json.loads((out / "config.json").read_text())["extra"]["finetune"]["merged"] is False
    with torch.no_grad():
        torch.testing.assert_close(load_finetuned(out)(x), adapted, atol=1e-6, rtol=1e-5)
        base = load_model(out).eval()(x)  # documented: the plain loader strips the method
    assert not torch.allclose(base, adapted, atol=1e-4)
    with pytest.raises(ValueError, match="cannot express"):
        export_hf(out, tmp_path / "hf")


def test_prompt_tokens_are_stripped_before_pooling() -> None:
    m, _ = applied("prompt", prompt_tokens=5)
    tokens = m.encoder(video())
    assert tokens.shape[1] == ENC.num_patches


def test_hf_export_of_a_merged_lora_model_matches(tmp_path: Path) -> None:
    from transformers import VideoMAEForVideoClassification

    kw = {"lora_targets": ["qkv", "fc1"]}
    m, _ = applied("lora", **kw)
    _perturb(m, "lora_B")
    out = export_model_dir(m, CFG, FinetuneSection(method="lora", **kw), tmp_path / "model", {})
    hf_dir = export_hf(out, tmp_path / "hf")
    hf = VideoMAEForVideoClassification.from_pretrained(str(hf_dir)).eval()
    x = video()
    with torch.no_grad():
        ours = load_model(out).eval()(x)
        theirs = hf(pixel_values=x.permute(0, 2, 1, 3, 4)).logits  # HF takes [B, T, C, H, W]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    assert hf.config.id2label[0] == "a"
