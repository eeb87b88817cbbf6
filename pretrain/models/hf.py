"""Converters between tubelet models and transformers' VideoMAE / the original VideoMAE checkpoints.

Only key renaming and config translation live here; numerics are shared (the parity tests in
``tests/models/test_hf_parity.py`` bind them to transformers within 1e-4 in fp32).
Layouts differ in two ways: HF splits attention into query/key/value Linears (we keep VideoMAE's fused
``qkv`` + ``q_bias``/``v_bias``), and HF takes ``pixel_values`` as [B, T, C, H, W] (we take [B, C, T, H, W]).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._config import config_from_dict, config_to_dict
from .classifier import VideoClassifier, VideoClassifierConfig
from .io import architecture_of, input_geometry, load_state_dict_strict
from .mae import IMAGENET_MEAN, IMAGENET_STD, MAEConfig, MaskedVideoAutoencoder
from .vit import VideoViT, VideoViTConfig

HF_FIXED_NORM_EPS = 1e-5  # HF VideoMAE's decoder.norm and fc_norm use nn.LayerNorm's default eps

# ---------------------------------------------------------------------------------------------------
# configs


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"HF {name}={value}: only square sizes are supported")
        value = value[0]
    return int(value)


def _ratio(hidden: int, dim: int, name: str) -> float:
    ratio = hidden / dim
    if int(dim * ratio) != hidden:
        raise ValueError(f"HF {name}={hidden} is not representable as int({dim} * mlp_ratio)")
    return ratio


def encoder_config_from_hf(hf_cfg: Any, final_norm: bool) -> VideoViTConfig:
    """Encoder config of an HF ``VideoMAEConfig`` (``layer_norm_eps`` carried over as ``norm_eps``)."""
    if hf_cfg.hidden_act != "gelu":
        raise ValueError(f"HF hidden_act={hf_cfg.hidden_act!r}: only exact 'gelu' is supported")
    if hf_cfg.hidden_dropout_prob or hf_cfg.attention_probs_dropout_prob:
        warnings.warn(
            "HF dropout probabilities are not carried over (tubelet blocks have no dropout)", stacklevel=2
        )
    return VideoViTConfig(
        embed_dim=hf_cfg.hidden_size,
        depth=hf_cfg.num_hidden_layers,
        num_heads=hf_cfg.num_attention_heads,
        img_size=_square(hf_cfg.image_size, "image_size"),
        num_frames=hf_cfg.num_frames,
        patch_size=_square(hf_cfg.patch_size, "patch_size"),
        tubelet_size=hf_cfg.tubelet_size,
        in_chans=hf_cfg.num_channels,
        mlp_ratio=_ratio(hf_cfg.intermediate_size, hf_cfg.hidden_size, "intermediate_size"),
        qkv_bias=hf_cfg.qv_bias,
        norm_eps=hf_cfg.layer_norm_eps,
        final_norm=final_norm,
    )


def mae_config_from_hf(hf_cfg: Any) -> MAEConfig:
    """``MAEConfig`` equivalent to HF ``VideoMAEForPreTraining`` (HF: no encoder norm iff use_mean_pooling)."""
    three = hf_cfg.num_channels == 3
    return MAEConfig(
        encoder=encoder_config_from_hf(hf_cfg, final_norm=not hf_cfg.use_mean_pooling),
        decoder_embed_dim=hf_cfg.decoder_hidden_size,
        decoder_depth=hf_cfg.decoder_num_hidden_layers,
        decoder_num_heads=hf_cfg.decoder_num_attention_heads,
        decoder_mlp_ratio=_ratio(
            hf_cfg.decoder_intermediate_size, hf_cfg.decoder_hidden_size, "decoder_intermediate_size"
        ),
        norm_pix_loss=hf_cfg.norm_pix_loss,
        pixel_mean=IMAGENET_MEAN if three else None,
        pixel_std=IMAGENET_STD if three else None,
        decoder_norm_eps=None,
        decoder_final_norm_eps=HF_FIXED_NORM_EPS,
    )


def classifier_config_from_hf(hf_cfg: Any) -> VideoClassifierConfig:
    n = hf_cfg.num_labels
    names = [str(hf_cfg.id2label[i]) for i in range(n)] if hf_cfg.id2label else None
    if names == [f"LABEL_{i}" for i in range(n)]:
        names = None
    return VideoClassifierConfig(
        encoder=encoder_config_from_hf(hf_cfg, final_norm=not hf_cfg.use_mean_pooling),
        num_classes=n,
        use_mean_pooling=hf_cfg.use_mean_pooling,
        fc_norm_eps=HF_FIXED_NORM_EPS,
        class_names=names,
    )


def hf_config_from_ours(cfg: MAEConfig | VideoClassifierConfig | VideoViTConfig) -> Any:
    """An HF ``VideoMAEConfig`` for our config; raises where HF cannot express the architecture."""
    from transformers import VideoMAEConfig

    return VideoMAEConfig(**_hf_kwargs(cfg))


def _hf_kwargs(cfg: MAEConfig | VideoClassifierConfig | VideoViTConfig) -> dict[str, Any]:
    """The ``VideoMAEConfig`` fields our config sets (what HF can express of it)."""
    enc = cfg if isinstance(cfg, VideoViTConfig) else cfg.encoder
    if enc.pos_embed != "sincos":
        raise ValueError(
            "HF VideoMAE only has fixed sin-cos positions; pos_embed='learned' cannot be exported"
        )
    if enc.layer_scale_init is not None:
        raise ValueError("HF VideoMAE has no layer scale (gamma_1/gamma_2); this model cannot be exported")
    kw: dict[str, Any] = dict(
        image_size=enc.img_size,
        patch_size=enc.patch_size,
        num_channels=enc.in_chans,
        num_frames=enc.num_frames,
        tubelet_size=enc.tubelet_size,
        hidden_size=enc.embed_dim,
        num_hidden_layers=enc.depth,
        num_attention_heads=enc.num_heads,
        intermediate_size=enc.mlp_hidden_dim,
        hidden_act="gelu",
        layer_norm_eps=enc.norm_eps,
        qv_bias=enc.qkv_bias,
    )
    if isinstance(cfg, MAEConfig):
        if cfg.decoder_norm_eps not in (None, enc.norm_eps):
            raise ValueError("HF VideoMAE uses one layer_norm_eps for encoder and decoder blocks")
        if cfg.encoder.in_chans == 3 and (
            cfg.pixel_mean is None
            or not torch.allclose(torch.tensor(cfg.pixel_mean), torch.tensor(IMAGENET_MEAN))
            or not torch.allclose(torch.tensor(cfg.pixel_std), torch.tensor(IMAGENET_STD))
        ):
            raise ValueError("HF VideoMAEForPreTraining hard-codes ImageNet mean/std for its target")
        if cfg.encoder.in_chans != 3 and cfg.pixel_mean is not None:
            raise ValueError(
                "HF VideoMAEForPreTraining does not un-normalize non-RGB inputs (set pixel_mean=None)"
            )
        _warn_eps(cfg.decoder_final_norm_eps, "decoder_final_norm_eps")
        kw.update(
            use_mean_pooling=not enc.final_norm,
            decoder_hidden_size=cfg.decoder_embed_dim,
            decoder_num_hidden_layers=cfg.decoder_depth,
            decoder_num_attention_heads=cfg.decoder_num_heads,
            decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.decoder_mlp_ratio),
            norm_pix_loss=cfg.norm_pix_loss,
            architectures=["VideoMAEForPreTraining"],
        )
    elif isinstance(cfg, VideoClassifierConfig):
        if cfg.use_mean_pooling:
            _warn_eps(cfg.fc_norm_eps, "fc_norm_eps")
        names = cfg.class_names or [f"LABEL_{i}" for i in range(cfg.num_classes)]
        kw.update(
            use_mean_pooling=cfg.use_mean_pooling,
            num_labels=cfg.num_classes,
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            architectures=["VideoMAEForVideoClassification"],
        )
    else:
        kw.update(use_mean_pooling=not enc.final_norm, architectures=["VideoMAEModel"])
    return kw


TUBELET_KEY = "tubelet_extra"  # HF config.json: our exact config and model-dir extra (sampling), namespaced


def tubelet_extra(cfg: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an HF config cannot express, kept for an exact round trip: our whole architecture config (norm
    eps HF hard-codes, preset, drop path, attention backend, ...) and the model directory's ``extra``
    (fine-tuning's sampling: stride, test clips × crops, mean/std)."""
    return {"architecture": architecture_of(cfg), "config": config_to_dict(cfg), "extra": extra or {}}


def restore_config(hf_cfg: Any, derived: Any) -> Any:
    """Our config stored in ``hf_cfg.tubelet_extra`` when it still describes this HF config (same fields
    HF expresses), else ``derived`` (the HF config's translation), with a warning if one was stored."""
    stored = getattr(hf_cfg, TUBELET_KEY, None)
    if not isinstance(stored, dict) or "config" not in stored:
        return derived
    try:
        if stored.get("architecture") != architecture_of(derived):
            raise ValueError(f"it holds a {stored.get('architecture')}")
        ours = config_from_dict(type(derived), stored["config"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the eps warnings of an export
            same = all(getattr(hf_cfg, k, None) == v for k, v in _hf_kwargs(ours).items())
        if not same:
            raise ValueError("the HF config was changed after export")
    except (TypeError, ValueError) as e:
        warnings.warn(f"HF config's {TUBELET_KEY} not used ({e}): config from the HF fields", stacklevel=2)
        return derived
    return ours


def stored_extra(hf_dir: str | Path) -> dict[str, Any]:
    """The model directory ``extra`` an export kept in the HF config (``{}`` for any other HF directory)."""
    path = Path(hf_dir) / "config.json"
    stored = json.loads(path.read_text()).get(TUBELET_KEY) if path.is_file() else None
    return dict(stored.get("extra") or {}) if isinstance(stored, dict) else {}


def _warn_eps(eps: float, name: str) -> None:
    if eps != HF_FIXED_NORM_EPS:
        warnings.warn(
            f"{name}={eps} but HF VideoMAE uses {HF_FIXED_NORM_EPS} there: exported outputs differ slightly",
            stacklevel=4,
        )


# ---------------------------------------------------------------------------------------------------
# state dicts

_HF_BLOCK_PARTS = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_TOP_LEVEL = {
    "videomae.embeddings.patch_embeddings.projection": "encoder.patch_embed.proj",
    "videomae.layernorm": "encoder.norm",
    "encoder_to_decoder": "encoder_to_decoder",
    "mask_token": "mask_token",
    "decoder.norm": "decoder.norm",
    "decoder.head": "decoder.head",
    "fc_norm": "fc_norm",
    "classifier": "head",
}
_HF_BLOCK_RE = re.compile(r"^(videomae\.encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)$")
_OUR_BLOCK_RE = re.compile(r"^(encoder\.blocks|decoder\.blocks)\.(\d+)\.(.+)$")
_BLOCK_PREFIX = {"videomae.encoder.layer": "encoder.blocks", "decoder.decoder_layers": "decoder.blocks"}


def _rename(key: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if key == src or key.startswith(src + "."):
            return dst + key[len(src) :]
    return None


def hf_state_dict_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF VideoMAE keys → tubelet keys (query/key/value fused into ``qkv``).

    A ``key.bias`` (transformers versions whose key Linear has one, e.g. 5.17, where it is zero) is dropped:
    it adds ``q·b_k`` to every score of a query's row, which the softmax cancels exactly."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _HF_BLOCK_RE.match(key)
        if m:
            prefix = f"{_BLOCK_PREFIX[m.group(1)]}.{m.group(2)}."
            rest = m.group(3)
            if rest.startswith("attention.attention."):
                qkv.setdefault(prefix, {})[rest[len("attention.attention.") :]] = value
                continue
            new = _rename(rest, _HF_BLOCK_PARTS)
            if new is None:
                raise KeyError(f"unexpected HF VideoMAE key {key}")
            out[prefix + new] = value
            continue
        new = _rename(key, _TOP_LEVEL)
        if new is None:
            raise KeyError(f"unexpected HF VideoMAE key {key}")
        out[new] = value
    for prefix, parts in qkv.items():
        out[prefix + "attn.qkv.weight"] = torch.cat(
            [parts["query.weight"], parts["key.weight"], parts["value.weight"]]
        )
        if "query.bias" in parts:
            out[prefix + "attn.q_bias"] = parts["query.bias"]
            out[prefix + "attn.v_bias"] = parts["value.bias"]
    return out


def ours_state_dict_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_state_dict_to_ours`."""
    inv_top = {v: k for k, v in _TOP_LEVEL.items()}
    inv_block = {v: k for k, v in _HF_BLOCK_PARTS.items()}
    inv_prefix = {v: k for k, v in _BLOCK_PREFIX.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _OUR_BLOCK_RE.match(key)
        if m:
            prefix = f"{inv_prefix[m.group(1)]}.{m.group(2)}."
            rest = m.group(3)
            att = prefix + "attention.attention."
            if rest == "attn.qkv.weight":
                q, k, v = value.chunk(3, dim=0)
                out[att + "query.weight"], out[att + "key.weight"], out[att + "value.weight"] = q, k, v
            elif rest == "attn.q_bias":
                out[att + "query.bias"] = value
            elif rest == "attn.v_bias":
                out[att + "value.bias"] = value
            else:
                new = _rename(rest, inv_block)
                if new is None:
                    raise KeyError(f"{key} has no HF VideoMAE equivalent")
                out[prefix + new] = value
            continue
        new = _rename(key, inv_top)
        if new is None:
            raise KeyError(f"{key} has no HF VideoMAE equivalent")
        out[new] = value
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------
# models


def from_hf_model(hf_model: nn.Module) -> nn.Module:
    """Our module with the weights of an in-memory HF VideoMAE model (PreTraining / VideoClassification / Model)."""
    name = type(hf_model).__name__
    sd = dict(hf_model.state_dict())
    c = hf_model.config
    if name == "VideoMAEForPreTraining":
        model: nn.Module = MaskedVideoAutoencoder(restore_config(c, mae_config_from_hf(c)))
    elif name == "VideoMAEForVideoClassification":
        model = VideoClassifier(restore_config(c, classifier_config_from_hf(c)))
    elif name == "VideoMAEModel":
        model = VideoViT(restore_config(c, encoder_config_from_hf(c, final_norm=not c.use_mean_pooling)))
        sd = {f"videomae.{k}": v for k, v in sd.items()}
    else:
        raise TypeError(f"unsupported HF model class {name}")
    ours = hf_state_dict_to_ours(sd)
    if isinstance(model, VideoViT):
        ours = {k.removeprefix("encoder."): v for k, v in ours.items()}
    load_state_dict_strict(model, ours, f"HF {name}")
    return model


def to_hf_model(model: nn.Module) -> nn.Module:
    """An in-memory HF VideoMAE model with our weights (strict: every HF weight must be covered)."""
    from transformers import VideoMAEForPreTraining, VideoMAEForVideoClassification, VideoMAEModel

    model = getattr(model, "_orig_mod", model)
    hf_cfg = hf_config_from_ours(model.cfg)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if isinstance(model, MaskedVideoAutoencoder):
        hf_model = VideoMAEForPreTraining(hf_cfg)
    elif isinstance(model, VideoClassifier):
        hf_model = VideoMAEForVideoClassification(hf_cfg)
    elif isinstance(model, VideoViT):
        hf_model = VideoMAEModel(hf_cfg)
        sd = {f"encoder.{k}": v for k, v in sd.items()}
    else:
        raise TypeError(f"cannot export {type(model).__name__} to HF")
    hf_sd = ours_state_dict_to_hf(sd)
    if isinstance(hf_model, VideoMAEModel):
        hf_sd = {k.removeprefix("videomae."): v for k, v in hf_sd.items()}
    for k, v in hf_model.state_dict().items():  # a key Linear with a bias (transformers 5.17): zero, exact
        if k.endswith("attention.attention.key.bias") and k not in hf_sd:
            hf_sd[k] = torch.zeros_like(v)
    load_state_dict_strict(hf_model, hf_sd, f"tubelet {type(model).__name__}")
    return hf_model.eval()


def from_hf(hf_dir: str | Path) -> nn.Module:
    """Load an HF ``save_pretrained`` directory (config.json + safetensors) as our module."""
    from transformers import (
        VideoMAEConfig,
        VideoMAEForPreTraining,
        VideoMAEForVideoClassification,
        VideoMAEModel,
    )

    hf_cfg = VideoMAEConfig.from_pretrained(str(hf_dir))
    arch = (hf_cfg.architectures or ["VideoMAEModel"])[0]
    classes = {
        "VideoMAEForPreTraining": VideoMAEForPreTraining,
        "VideoMAEForVideoClassification": VideoMAEForVideoClassification,
        "VideoMAEModel": VideoMAEModel,
    }
    if arch not in classes:
        raise ValueError(f"{hf_dir}: unsupported architecture {arch}; expected one of {sorted(classes)}")
    hf_model = classes[arch].from_pretrained(str(hf_dir), use_safetensors=True)
    return from_hf_model(hf_model)


def config_from_hf_dir(hf_dir: str | Path) -> tuple[str, Any]:
    """(our architecture name, our config) of an HF VideoMAE directory, without reading its weights."""
    from transformers import VideoMAEConfig

    hf_cfg = VideoMAEConfig.from_pretrained(str(hf_dir))
    arch = (hf_cfg.architectures or ["VideoMAEModel"])[0]
    if arch == "VideoMAEForPreTraining":
        return "MaskedVideoAutoencoder", restore_config(hf_cfg, mae_config_from_hf(hf_cfg))
    if arch == "VideoMAEForVideoClassification":
        return "VideoClassifier", restore_config(hf_cfg, classifier_config_from_hf(hf_cfg))
    if arch == "VideoMAEModel":
        derived = encoder_config_from_hf(hf_cfg, final_norm=not hf_cfg.use_mean_pooling)
        return "VideoViT", restore_config(hf_cfg, derived)
    raise ValueError(f"{hf_dir}: unsupported HF architecture {arch}")


def to_hf(model: nn.Module, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write our model as an HF ``save_pretrained`` directory (config.json + model.safetensors + the processor's
    preprocessor_config.json, see :func:`save_processor`); the config also keeps ``tubelet_extra`` (our config
    and the model directory's ``extra``): ``from_hf`` restores them."""
    out = Path(out_dir)
    cfg = getattr(model, "_orig_mod", model).cfg
    hf_model = to_hf_model(model)
    setattr(hf_model.config, TUBELET_KEY, tubelet_extra(cfg, extra))
    hf_model.save_pretrained(str(out), safe_serialization=True)
    save_processor(cfg, out, extra)
    return out


HF_PROCESSOR_NAME = "preprocessor_config.json"  # transformers' IMAGE_PROCESSOR_NAME


def processor_kwargs(cfg: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``VideoMAEImageProcessor`` settings equivalent to our eval view of one clip: frames and size of the
    model (``input_geometry``), mean/std of the model directory's ``extra.sampling`` (ImageNet's when absent,
    as ``finetune.model_dir.sampling_for``), shorter side resized to size then a center size × size crop,
    bilinear (antialiased when shrinking, as ours), uint8 / 255."""
    frames, size = input_geometry(cfg)
    sampling = (extra or {}).get("sampling") or {}
    return dict(
        num_frames=frames,
        do_resize=True,
        size={"shortest_edge": size},
        resample=2,  # PIL.Image.BILINEAR
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[float(v) for v in sampling.get("mean", IMAGENET_MEAN)],
        image_std=[float(v) for v in sampling.get("std", IMAGENET_STD)],
    )


def save_processor(cfg: Any, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path | None:
    """Write ``preprocessor_config.json`` (``VideoMAEImageProcessor``, :func:`processor_kwargs`) so that
    ``pipeline("video-classification", model=DIR)`` and ``AutoImageProcessor.from_pretrained(DIR)`` work with
    no extra arguments (``AutoVideoProcessor`` reads the same file when torchvision is installed). None for a
    model whose input is not RGB (HF's processors assume 3 channels).

    What HF's processing cannot reproduce of our eval sampling (``data_shards.loader.sampling``):

    * temporal: we take ``frames`` frames ``stride`` apart from ``test_clips`` windows spread uniformly over
      the video (one window: centred) and average the softmax over the windows; the pipeline with this image
      processor decodes (PyAV) the FIRST ``num_frames x frame_sampling_rate`` frames (rate 1 by default: the
      first ``num_frames`` consecutive frames) and runs one clip. With torchvision installed, transformers
      builds ``VideoMAEVideoProcessor`` from this same file and the pipeline uses it instead: it decodes with
      torchcodec (then needed; not installed nor tested here) and samples ``num_frames`` frames uniformly
      over the whole video (for a video of exactly ``num_frames`` frames: all of them). The same frames
      are seen only when the video is exactly ``frames`` frames long and the stride is 1 (the pipeline takes
      a file or URL, not frames: for our sampling feed the frames ``predict`` takes to the processor and the
      model, or use ``python -m finetune predict``);
    * spatial: ``test_crops`` 3 (both ends and centre of the long side, averaged) becomes the centre crop
      only; for one crop, ours crops the centred min(H, W) square and resizes it (torch, uint8, antialiased
      bilinear) while HF resizes the shorter side (PIL bilinear, long side truncated) and then crops, so
      pixels differ by interpolation rounding and, on non-square videos, by a sub-pixel crop offset;
    * decoding: ours converts YUV 4:2:0 → RGB (bilinear chroma, BT.601 limited range) in torch; the
      pipeline uses FFmpeg's ``rgb24`` conversion (swscale), which rounds differently.
    """
    out = Path(out_dir)
    if int(getattr(getattr(cfg, "encoder", cfg), "in_chans", 3)) != 3:
        (out / HF_PROCESSOR_NAME).unlink(missing_ok=True)  # not a stale one from an earlier export either
        return None
    from transformers import VideoMAEImageProcessorPil  # the PIL backend: no torchvision needed to write it

    VideoMAEImageProcessorPil(**processor_kwargs(cfg, extra)).save_pretrained(str(out))
    return out / HF_PROCESSOR_NAME


# ---------------------------------------------------------------------------------------------------
# original VideoMAE / VideoMAE V2 checkpoints (.pth)

# num_heads of the published encoders / decoders by width (head dim is not stored in the weights)
_HEADS_BY_DIM = {192: 3, 384: 6, 512: 8, 640: 8, 768: 12, 1024: 16, 1280: 16, 1408: 16}


def read_videomae_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of an original VideoMAE/V2 ``.pth`` (never unpickles code: ``weights_only=True``)."""
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("model", "module", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(wrapper), dict):
            ckpt = ckpt[wrapper]
            break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(
            f"{path}: not a VideoMAE state dict (expected tensors, optionally under 'model'/'module')"
        )
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def _depth(sd: dict[str, torch.Tensor], prefix: str) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _encoder_from_videomae(
    sd: dict[str, torch.Tensor], prefix: str, num_frames: int, img_size: int | None, num_heads: int | None
) -> VideoViTConfig:
    w = sd[prefix + "patch_embed.proj.weight"]  # [D, C, tubelet, p, p]
    dim, chans, tubelet, patch = w.shape[0], w.shape[1], w.shape[2], w.shape[3]
    pos = sd.get(prefix + "pos_embed")
    if pos is not None and img_size is None:
        side = math.isqrt(pos.shape[1] // (num_frames // tubelet))
        img_size = side * patch
    hidden = sd[prefix + "blocks.0.mlp.fc1.weight"].shape[0]
    return VideoViTConfig(
        embed_dim=dim,
        depth=_depth(sd, prefix),
        num_heads=num_heads or _HEADS_BY_DIM.get(dim, max(1, dim // 64)),
        img_size=img_size or 224,
        num_frames=num_frames,
        patch_size=patch,
        tubelet_size=tubelet,
        in_chans=chans,
        mlp_ratio=hidden / dim,
        qkv_bias=prefix + "blocks.0.attn.q_bias" in sd,
        layer_scale_init=1.0 if prefix + "blocks.0.gamma_1" in sd else None,
        pos_embed="learned" if pos is not None else "sincos",
        final_norm=prefix + "norm.weight" in sd,
    )


def from_videomae_checkpoint(
    path: str | Path,
    num_frames: int = 16,
    img_size: int | None = None,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    norm_pix_loss: bool = True,
    class_names: list[str] | None = None,
) -> nn.Module:
    """Build our model from an original VideoMAE / V2 checkpoint (pretrain ``encoder.*``/``decoder.*``
    layout → MaskedVideoAutoencoder; fine-tune ``blocks.*``/``head`` layout → VideoClassifier).

    Frames, image size (with fixed positions) and head counts are not stored in the weights: pass them
    when they differ from the published defaults (16 frames, 224 px, 64-80-88-dim heads by width).
    """
    sd = read_videomae_state_dict(path)
    if "encoder.patch_embed.proj.weight" in sd:
        enc = _encoder_from_videomae(sd, "encoder.", num_frames, img_size, num_heads)
        dd = sd["encoder_to_decoder.weight"].shape[0]
        hidden = sd["decoder.blocks.0.mlp.fc1.weight"].shape[0]
        cfg = MAEConfig(
            encoder=enc,
            decoder_embed_dim=dd,
            decoder_depth=_depth(sd, "decoder."),
            decoder_num_heads=decoder_num_heads or _HEADS_BY_DIM.get(dd, max(1, dd // 64)),
            decoder_mlp_ratio=hidden / dd,
            norm_pix_loss=norm_pix_loss,
            pixel_mean=IMAGENET_MEAN if enc.in_chans == 3 else None,
            pixel_std=IMAGENET_STD if enc.in_chans == 3 else None,
        )
        model: nn.Module = MaskedVideoAutoencoder(cfg)
        ours = {k: v for k, v in sd.items() if not k.startswith("encoder.head.")}
    elif "patch_embed.proj.weight" in sd:
        enc = _encoder_from_videomae(sd, "", num_frames, img_size, num_heads)
        mean_pool = "fc_norm.weight" in sd
        n_cls = sd["head.weight"].shape[0]
        ccfg = VideoClassifierConfig(
            encoder=enc, num_classes=n_cls, use_mean_pooling=mean_pool, class_names=class_names
        )
        model = VideoClassifier(ccfg)
        ours = {}
        for k, v in sd.items():
            ours[k if k.split(".")[0] in ("fc_norm", "head") else f"encoder.{k}"] = v
    else:
        raise ValueError(
            f"{path}: neither a VideoMAE pretrain (encoder.*) nor fine-tune (blocks.*) checkpoint"
        )
    load_state_dict_strict(model, ours, str(path))
    return model
