"""Parameter-efficient fine-tuning methods, applied to a plain `VideoClassifier` from OUTSIDE it.

The model code stays architecture-only (ARCHITECTURE.md, Layers). Every method here
(1) freezes / unfreezes parameters, (2) optionally adds modules and hooks, (3) knows how to undo itself
for export. What to apply is the config's `finetune` section (`FinetuneSection`, below); the
methods are the `@method`-registered functions of `METHODS`. Methods:

    full      every parameter trains
    linear    linear probe: only `head` trains; `fc_norm` stays frozen. Starting from a pretraining (MAE)
              model `fc_norm` is new and sits at weight 1 / bias 0, so the probe is a *non-affine*
              LayerNorm of the mean-pooled tokens followed by a linear layer: BatchNorm-free (no running
              statistics to sync across ranks or to fold at export), the MAE/VideoMAE probe without the BN.
    partial   the last `partial_blocks` encoder blocks + fc_norm + head
    bitfit    every bias (q/v biases, Linear and LayerNorm biases) + head
    lora      peft LoRA on any of qkv / proj / fc1 / fc2 / patch_embed (+ fc_norm + head); merged on export
    peft      any other peft tuner that handles nn.Linear (IA3, LoHa, LoKr, ...) by `peft_type`; merged on export
    adapter   AdaptFormer: a parallel bottleneck (down → ReLU → up, up zero-initialised) beside each block's
              MLP, scaled by `adapter_scale`; cannot be merged (non-linear), exported as a sidecar
    prompt    visual prompt tuning: `prompt_tokens` learnable tokens prepended after the position embedding
              (shallow), or fresh tokens at the input of every block (deep); stripped before pooling;
              exported as a sidecar (prompts change the sequence, no weight can absorb them)

`split_state_dict` separates the keys only a method adds (adapters, prompts) for the sidecar.
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from einops import rearrange
from torch import nn

from data_shards import storage
from pretrain.engine import require, resume_key

LORA_TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
LORA_TARGET_NAMES = (*LORA_TARGETS, "patch_embed")  # the first ones are the default ([qkv, proj])
# CNN backbones (video ResNets, CNN+RNN, TAda2D): every method that needs no token sequence (CNN_METHODS,
# below), LoRA on the convolutions ("conv", see _lora_conv: TAda2D's shared kernels and selective-kernel
# branches included), on cnn_rnn's Linear into the RNN ("proj") and on the dynamic layers' route / attention
# MLPs ("dynamic"). GRU/LSTM weights and a kernel mixture's K-kernel bank are parameter tensors, not modules
# peft can wrap.
CNN_LORA_TARGET_NAMES = ("conv", "proj", "dynamic")
SIDECAR_NAME = "peft_sidecar.safetensors"
SIDECAR_CONFIG = "peft.json"


@dataclass
class FinetuneSection:
    """Where the weights come from and which parameters train (finetune/peft_methods.py applies it)."""

    init: str | None = resume_key(None)  # run dir | model dir | HF dir | null (scratch)
    # which parameters train: full | linear | partial | bitfit | lora | peft | adapter | prompt
    method: Literal[METHOD_NAMES] = resume_key("full")  # type: ignore[valid-type]
    # method=partial: the last N encoder blocks (ViT) or stages (CNN) train
    partial_blocks: int = resume_key(1)
    lora_rank: int = resume_key(8)  # method=lora
    lora_alpha: float = resume_key(16.0)  # method=lora: the update is scaled by alpha / rank
    lora_dropout: float = resume_key(0.0)  # method=lora
    # ViT: among qkv, proj, fc1, fc2 (every block), patch_embed (the tubelet Conv3d); None = [qkv, proj].
    # CNNs: conv (every Conv2d/Conv3d of the backbone), proj (cnn_rnn's Linear into the RNN), dynamic (the
    # Linear / Conv1d layers of TAda routes and kernel-mixture / selective-kernel attentions); None = [conv]
    lora_targets: list[str] | None = field(default=None, metadata={"resume": True})
    peft_type: str = resume_key("IA3")  # method=peft: IA3 | LoHa | LoKr | VeRA | LoRA
    # method=peft: the tuner's own config fields
    peft_options: dict[str, Any] = field(default_factory=dict, metadata={"resume": True})
    adapter_width: int = resume_key(64)  # method=adapter: the bottleneck's width
    adapter_scale: float = resume_key(0.1)  # method=adapter: the branch's output scale
    prompt_tokens: int = resume_key(8)  # method=prompt: learnable tokens
    # method=prompt: fresh tokens at every block (deep VPT), else at the input
    prompt_deep: bool = resume_key(False)
    train_fc_norm: bool = resume_key(True)  # not for method=linear (probe on a frozen, non-affine norm)

    def check(self, backbone: str = "vit") -> None:
        for name in ("partial_blocks", "lora_rank", "adapter_width", "prompt_tokens"):
            require(getattr(self, name) >= 1, f"finetune.{name} must be >= 1")
        require(0 <= self.lora_dropout < 1, "finetune.lora_dropout must be in [0, 1)")
        allowed = LORA_TARGET_NAMES if backbone == "vit" else CNN_LORA_TARGET_NAMES
        targets = self.lora_targets if self.lora_targets is not None else list(allowed[:1])
        bad = sorted(set(targets) - set(allowed))
        uses_targets = self.method in ("lora", "peft")
        require(
            not uses_targets or (bool(targets) and not bad),
            f"finetune.lora_targets {self.lora_targets}: with model.backbone={backbone} choose among {list(allowed)}",
        )
        require(
            backbone == "vit" or self.method in CNN_METHODS,
            f"finetune.method={self.method} needs the ViT's token sequence; with model.backbone={backbone} use "
            f"one of {list(CNN_METHODS)}",
        )
        require(
            self.init is None or storage.isdir(self.init),
            f"finetune.init={self.init}: no such directory (null = train from scratch)",
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------- helpers


def trainable_summary(model: nn.Module) -> dict[str, Any]:
    """Trainable / total parameter counts (and %), and the trainable names: what every method reports."""
    total = sum(p.numel() for p in model.parameters())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "trainable": trainable,
        "total": total,
        "percent": 100.0 * trainable / max(total, 1),
        "names": names,
    }


def _set_trainable(model: nn.Module, keep: Any) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(bool(keep(name)))


NEW_PARTS = ("head.", "audio.")  # what no starting point has: trained by every method (audio: `AudioBranch`)


def _head(name: str, train_fc_norm: bool) -> bool:
    return name.startswith(NEW_PARTS) or (train_fc_norm and name.startswith("fc_norm."))


def _lora_aware_qkv(attn: nn.Module) -> None:
    """Make `Attention` call its `qkv` module, so a peft-wrapped qkv takes effect.

    Our Attention computes `F.linear(x, self.qkv.weight, [q_bias, 0, v_bias])` (VideoMAE's layout), which
    would silently bypass any wrapper around `qkv`. This per-instance forward is the same maths with the
    module called: `qkv(x) + bias`. Applied only when a peft method targets qkv; the class is untouched.
    """
    from pretrain.models.attention import attend

    def forward(self: nn.Module, x_BND: torch.Tensor, keep_last: int | None = None) -> torch.Tensor:
        qkv_BN3D = self.qkv(x_BND)
        if self.q_bias is not None:
            qkv_BN3D = qkv_BN3D + torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = rearrange(qkv_BN3D, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        if keep_last is not None:  # as Attention.forward: outputs for the last tokens only
            q = q[:, :, q.shape[2] - keep_last :]
        return self.proj(rearrange(attend(q, k, v, self.attn_impl), "b h n d -> b n (h d)"))

    attn.forward = types.MethodType(forward, attn)


def is_cnn(model: nn.Module) -> bool:
    """A CNN classifier (`BackboneClassifier`): stages instead of transformer blocks."""
    return hasattr(model, "stage_prefixes")


def lora_targets(spec: FinetuneSection, model: nn.Module) -> list[str]:
    """`finetune.lora_targets`, or the backbone's default ([qkv, proj] on the ViT, [conv] on a CNN)."""
    if spec.lora_targets is not None:
        return list(spec.lora_targets)
    return ["conv"] if is_cnn(model) else ["qkv", "proj"]


def _target_regex(model: nn.Module, targets: list[str]) -> str:
    """A full-match regex over module names. ViT: block layers by short name, `patch_embed` = the tubelet
    Conv3d. CNN: `conv` = every Conv2d/Conv3d of the backbone, `proj` = cnn_rnn's Linear into the RNN,
    `dynamic` = the Linear / Conv1d layers inside route / attention modules (`DynamicRoute`)."""
    allowed = CNN_LORA_TARGET_NAMES if is_cnn(model) else LORA_TARGET_NAMES
    unknown = sorted(set(targets) - set(allowed))
    if unknown or not targets:
        raise ValueError(f"finetune.lora_targets {targets}: choose among {list(allowed)}")
    if is_cnn(model):
        routes = _dynamic_layers(model) if "dynamic" in targets else set()
        names = [
            n
            for n, mod in model.named_modules()
            if n.startswith("encoder.")
            and (
                ("conv" in targets and _lora_conv(mod))
                or ("proj" in targets and n == "encoder.proj")
                or n in routes
            )
        ]
        if not names:
            raise ValueError(f"finetune.lora_targets {targets}: no such layer in this {type(model).__name__}")
        return "|".join(re.escape(n) for n in names)
    alts = "|".join(re.escape(LORA_TARGETS[t]) for t in targets if t in LORA_TARGETS)
    pats = [rf"encoder\.blocks\.\d+\.({alts})"] if alts else []  # never the head
    if "patch_embed" in targets:
        pats.append(r"encoder\.patch_embed\.proj")
    return "|".join(f"(?:{p})" for p in pats)


def _dynamic_layers(model: nn.Module) -> set[str]:
    """Names of the Linear / Conv1d layers inside the dynamic convolutions' route / attention modules."""
    from pretrain.models.dynamic_conv import DynamicRoute

    return {
        f"{name}.{sub}"
        for name, mod in model.named_modules()
        if isinstance(mod, DynamicRoute)
        for sub, layer in mod.named_modules()
        if isinstance(layer, (nn.Linear, nn.Conv1d))
    }


def _lora_conv(module: nn.Module) -> bool:
    """A convolution LoRA can wrap and merge back: every Conv2d, and Conv3d except 1×1×k kernels (the video
    ResNets' 1×1×1 downsample projections), whose merge peft computes with its Conv2d 1×1 formula and fails."""
    if isinstance(module, nn.Conv3d):
        return tuple(module.kernel_size[:2]) != (1, 1)
    return isinstance(module, nn.Conv2d)


def freeze_norm_statistics(model: nn.Module) -> int:
    """Batch norms whose parameters all stay frozen keep their running statistics too (evaluation mode in
    training forwards), as a linear probe or LoRA on a frozen CNN expects; returns how many."""
    frozen = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.register_forward_pre_hook(_hold_statistics)
            frozen += 1
    return frozen


def _hold_statistics(module: nn.Module, args: tuple[Any, ...]) -> None:
    module.train(False)  # normalise with the running statistics, never update them


# ------------------------------------------------------------------------------------------- adapter


class Adapter(nn.Module):
    """AdaptFormer bottleneck: `scale · up(ReLU(down(x)))`; `up` starts at zero so step 0 = base model."""

    def __init__(self, dim: int, width: int, scale: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.act = nn.ReLU()
        self.up = nn.Linear(width, dim)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x_BND))) * self.scale


def _adapter_hook(block: nn.Module) -> Any:
    def hook(mlp: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        return out + block.adapter(args[0])  # parallel to the MLP, on the same (norm2) input

    return hook


def apply_adapters(model: nn.Module, width: int, scale: float) -> None:
    """`block.adapter` beside every `block.mlp` (a forward hook adds it to the MLP output)."""
    dim = model.cfg.encoder.embed_dim
    for block in model.encoder.blocks:
        block.adapter = Adapter(dim, width, scale)
        block.mlp.register_forward_hook(_adapter_hook(block))


# -------------------------------------------------------------------------------------------- prompts


class VisualPrompts(nn.Module):
    """`tokens` [L, P, D]: L = 1 (shallow) or depth (deep) sets of P learnable tokens (VPT init: uniform)."""

    def __init__(self, layers: int, tokens: int, dim: int) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(layers, tokens, dim))
        bound = (6.0 / (tokens + dim)) ** 0.5  # VPT's xavier-uniform bound
        nn.init.uniform_(self.tokens, -bound, bound)


def apply_prompts(model: nn.Module, tokens: int, deep: bool) -> None:
    """Prepend prompts at block 0 (and replace them at every block when deep); strip after the last block."""
    dim, depth = model.cfg.encoder.embed_dim, model.cfg.encoder.depth
    model.prompt = VisualPrompts(depth if deep else 1, tokens, dim)
    prompts = model.prompt
    blocks = model.encoder.blocks

    def make_pre(i: int) -> Any:
        def pre(block: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x_BND = args[0]
            p_PD = prompts.tokens[i if deep else 0].to(x_BND.dtype)
            p_BPD = p_PD.unsqueeze(0).expand(x_BND.shape[0], -1, -1)
            if i == 0:
                return (torch.cat([p_BPD, x_BND], dim=1), *args[1:])
            return (torch.cat([p_BPD, x_BND[:, tokens:]], dim=1), *args[1:])

        return pre

    blocks[0].register_forward_pre_hook(make_pre(0))
    if deep:
        for i in range(1, depth):
            blocks[i].register_forward_pre_hook(make_pre(i))

    def strip(block: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        return out[:, tokens:]

    blocks[depth - 1].register_forward_hook(strip)


# ------------------------------------------------------------------------------------------- dispatch


def _partial_keep(model: nn.Module, spec: FinetuneSection, head: Any) -> Any:
    """The name filter of `partial`: the last `partial_blocks` blocks (ViT) or stages (CNN) + the head."""
    if is_cnn(model):
        stages = model.stage_prefixes()
        if not 1 <= spec.partial_blocks <= len(stages):
            raise ValueError(
                f"finetune.partial_blocks={spec.partial_blocks} must be in [1, {len(stages)}] (stages)"
            )
        trainable = tuple(p for stage in stages[-spec.partial_blocks :] for p in stage)
        return lambda n: head(n) or n.startswith(trainable)
    depth = model.cfg.encoder.depth
    if not 1 <= spec.partial_blocks <= depth:
        raise ValueError(f"finetune.partial_blocks={spec.partial_blocks} must be in [1, {depth}]")
    first = depth - spec.partial_blocks
    pat = re.compile(r"^encoder\.blocks\.(\d+)\.")

    def keep(n: str) -> bool:
        mt = pat.match(n)
        return head(n) or bool(mt and int(mt.group(1)) >= first) or n.startswith("encoder.norm.")

    return keep


Keep = Callable[[str], bool]  # parameter name → whether it trains


@dataclass(frozen=True)
class Method:
    """A fine-tuning method: what it trains, whether it folds into plain weights at export, whether it needs the
    ViT's token sequence, and `apply(model, spec, head)`: adds its modules and hooks to the model, returns which
    parameters train (`head` says whether a name is the classification head, fc_norm as configured)."""

    name: str
    trains: str
    mergeable: bool
    needs_tokens: bool
    apply: Callable[[nn.Module, FinetuneSection, Keep], Keep]


METHODS: dict[str, Method] = {}  # the registry: `@method` below adds each one


def method(name: str, trains: str, *, mergeable: bool = True, needs_tokens: bool = False) -> Any:
    """Register the decorated `apply` function as method `name` (a new method is one decorated function)."""

    def register(apply: Callable[[nn.Module, FinetuneSection, Keep], Keep]) -> Any:
        METHODS[name] = Method(name, trains, mergeable, needs_tokens, apply)
        return apply

    return register


@method("full", "every parameter")
def _full(model: nn.Module, spec: FinetuneSection, head: Keep) -> Keep:
    return lambda n: True


@method("linear", "the head on a frozen encoder (linear probe)")
def _linear(model: nn.Module, spec: FinetuneSection, head: Keep) -> Keep:
    return lambda n: n.startswith(NEW_PARTS)


@method("partial", "the last `partial_blocks` blocks (CNNs: stages) + fc_norm + head")
def _partial(model: nn.Module, spec: FinetuneSection, head: Keep) -> Keep:
    return _partial_keep(model, spec, head)


@method("bitfit", "every bias + head")
def _bitfit(model: nn.Module, spec: FinetuneSection, head: Keep) -> Keep:
    return lambda n: head(n) or n.endswith(("bias", ".q_bias", ".v_bias"))


@method("lora", "peft LoRA on the chosen layers + head")
@method("peft", "another peft tuner (`peft_type`) + head")
def _peft_tuner(model: nn.Module, spec: FinetuneSection, head: Keep) -> Keep:
    _apply_peft(model, spec)
    return lambda n: head(n) or _is_peft_param(n)


@method("adapter", "AdaptFormer bottlenecks beside each MLP + head", mergeable=False, needs_tokens=True)
def _adapter(model: nn.Module, spec: FinetuneSection, head: Keep) -> Keep:
    apply_adapters(model, spec.adapter_width, spec.adapter_scale)
    return lambda n: head(n) or ".adapter." in n


@method("prompt", "visual prompt tokens + head", mergeable=False, needs_tokens=True)
def _prompt(model: nn.Module, spec: FinetuneSection, head: Keep) -> Keep:
    apply_prompts(model, spec.prompt_tokens, spec.prompt_deep)
    return lambda n: head(n) or n.startswith("prompt.")


METHOD_NAMES = tuple(METHODS)
MERGEABLE = tuple(name for name, m in METHODS.items() if m.mergeable)
CNN_METHODS = tuple(name for name, m in METHODS.items() if not m.needs_tokens)


def apply_method(model: nn.Module, spec: FinetuneSection) -> dict[str, Any]:
    """Apply `spec.method` to a classifier (ViT or CNN) in place; returns `trainable_summary(model)`."""
    m = METHODS.get(spec.method)
    if m is None:
        raise ValueError(f"finetune.method={spec.method!r}: choose one of {list(METHOD_NAMES)}")
    if is_cnn(model) and m.needs_tokens:
        raise ValueError(
            f"finetune.method={m.name} needs the ViT's token sequence; CNN backbones take {list(CNN_METHODS)}"
        )
    _set_trainable(model, m.apply(model, spec, lambda n: _head(n, spec.train_fc_norm)))
    freeze_norm_statistics(model)
    return trainable_summary(model)


_PEFT_PARAM = re.compile(r"\.(lora_|ia3_|hada_|lokr_|oft_|boft_|vera_)")


def _is_peft_param(name: str) -> bool:
    return bool(_PEFT_PARAM.search(name))


def is_method_param(name: str) -> bool:
    """Whether a state-dict key belongs to what a method added (peft layers, adapters, prompts)."""
    return _is_peft_param(name) or ".adapter." in name or name.startswith("prompt.")


def _peft_config(spec: FinetuneSection, model: nn.Module) -> Any:
    import peft

    targets = lora_targets(spec, model)
    regex = _target_regex(model, targets)
    if spec.method == "lora":
        return peft.LoraConfig(
            r=spec.lora_rank,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=regex,
            bias="none",
        )
    name = spec.peft_type
    configs = {
        "IA3": "IA3Config",
        "LOHA": "LoHaConfig",
        "LOKR": "LoKrConfig",
        "LORA": "LoraConfig",
        "VERA": "VeraConfig",
    }
    cls_name = configs.get(name.upper().replace("-", ""))
    if cls_name is None:
        raise ValueError(f"finetune.peft_type={name!r}: supported here: {sorted(configs)}")
    kw: dict[str, Any] = {"target_modules": regex, **spec.peft_options}
    if cls_name == "IA3Config" and "feedforward_modules" not in kw:
        # IA3 scales the *input* of feed-forward layers and the output of the others (peft's convention)
        kw["feedforward_modules"] = r"encoder\.blocks\.\d+\.mlp\.fc2" if "fc2" in targets else []
    if cls_name in ("LoHaConfig", "LoKrConfig", "VeraConfig"):
        kw.setdefault("r", spec.lora_rank)
    return getattr(peft, cls_name)(**kw)


def _apply_peft(model: nn.Module, spec: FinetuneSection) -> None:
    from peft import inject_adapter_in_model

    if "qkv" in lora_targets(spec, model):
        for block in model.encoder.blocks:
            _lora_aware_qkv(block.attn)
    # inject (not get_peft_model): the model stays our classifier, its engine hooks and names intact
    inject_adapter_in_model(_peft_config(spec, model), model)


def merge_peft(model: nn.Module) -> nn.Module:
    """Fold every peft layer into its base layer and put the plain layer back (peft's merge + unload)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


# --------------------------------------------------------------------------------------------- export


def split_state_dict(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(plain VideoClassifier keys, keys a method added: adapters, prompts)."""
    extra = {k: v for k, v in state.items() if ".adapter." in k or k.startswith("prompt.")}  # not peft's
    return {k: v for k, v in state.items() if k not in extra}, extra


def plain_state_dict(
    model: nn.Module, spec: FinetuneSection
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights for a plain `VideoClassifier` (peft merged) and the sidecar tensors of unmergeable methods."""
    if spec.method in ("lora", "peft"):
        model = merge_peft(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    plain, extra = split_state_dict(state)
    return plain, extra
