"""Regularisation strategies: EWC / MAS importance and their quadratic penalty, LwF distillation.

Importance is estimated after an experience on the exported (consolidated fp32) model, every rank on its
share of the experience's videos, summed over ranks: EWC = the empirical Fisher diagonal, E[(∂ log p(y|x)/∂θ)²]
with per-sample gradients; MAS = E[|∂ ‖f(x)‖²/∂θ|] (unsupervised). Online: importance = decay × previous +
new; the anchor θ* is the model after the latest experience.

The penalty λ/2 Σ Ω (θ − θ*)² must reach parameters that ZeRO-3 partitions across ranks: outside a module's
forward a rank holds only a shard of it. So its gradient λ·Ω·(θ − θ*) is computed in a forward hook on each
module, while ZeRO-3 has the module's parameters gathered, and handed to autograd by an identity function on
the module's output, which returns it as the parameters' gradient in backward — when ZeRO-3 gathers them again
for that module's own backward and reduces every gradient of them in its usual hooks. The same path runs at
ZeRO 0–2. The hooks are registered before DeepSpeed wraps the model, so ZeRO's own hooks wrap ours.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from data_shards import storage

IMPORTANCE_FILE = "importance.safetensors"


# ------------------------------------------------------------------------------------------ importance


def _per_sample_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str
) -> Iterable[dict[str, torch.Tensor]]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for i in range(x.shape[0]):
        logits = model(x[i : i + 1]).float()
        objective = F.cross_entropy(logits, y[i : i + 1]) if kind == "ewc" else logits.pow(2).sum()
        grads = torch.autograd.grad(objective, list(params.values()), allow_unused=True)
        yield {n: g for n, g in zip(params, grads) if g is not None}


def estimate_importance(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    kind: Literal["ewc", "mas"],
    label_map: torch.Tensor,
    limit: int,
) -> tuple[dict[str, torch.Tensor], int]:
    """(sum over this rank's videos of the per-sample importance, number of videos) — the caller sums over
    ranks and divides. `label_map`: global label → head index. Padding duplicates are skipped."""
    device = next(model.parameters()).device
    total: dict[str, torch.Tensor] = {
        n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad
    }
    count = 0
    for batch in batches:
        keep = ~batch["pad"] if "pad" in batch else torch.ones(len(batch["label"]), dtype=torch.bool)
        x = batch["video"][keep].to(device)
        y = label_map[batch["label"][keep]].to(device)
        for grads in _per_sample_grads(model, x[: max(0, limit - count)], y, kind):
            for n, g in grads.items():
                total[n] += g.pow(2) if kind == "ewc" else g.abs()
            count += 1
        if count >= limit:
            break
    return total, count


def save_importance(path: Path, importance: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> Path:
    tensors = {f"importance.{k}": v.contiguous().cpu() for k, v in importance.items()}
    tensors |= {f"anchor.{k}": v.detach().contiguous().cpu() for k, v in anchor.items() if k in importance}
    save_file(tensors, str(path))
    storage.plain_mode(path)
    return path


def load_importance(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    raw = load_file(str(path))
    imp = {k.removeprefix("importance."): v for k, v in raw.items() if k.startswith("importance.")}
    anchor = {k.removeprefix("anchor."): v for k, v in raw.items() if k.startswith("anchor.")}
    return imp, anchor


def fit_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`t` zero-padded (or cut) along dim 0 to `shape`: a grown head keeps its old rows' importance, the
    new classes' rows get none."""
    if t.shape == shape:
        return t
    out = torch.zeros(shape, dtype=t.dtype)
    n = min(t.shape[0], shape[0])
    out[:n] = t[:n]
    return out


# --------------------------------------------------------------------------------------------- penalty


class _InjectGrad(torch.autograd.Function):
    """Identity on `output`; in backward, returns the precomputed `grads` as the parameters' gradients."""

    @staticmethod
    def forward(
        ctx: Any, output: torch.Tensor, grads: list[torch.Tensor], *params: torch.Tensor
    ) -> torch.Tensor:
        ctx.grads = grads
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        return (grad_output, None, *ctx.grads)


class QuadraticPenalty:
    """λ/2 Σ Ω (θ − θ*)² over the parameters with an importance, applied through forward hooks (see module
    docstring). `grad_scale` = 1 / gradient-accumulation steps (DeepSpeed scales the loss the same way).
    `value` accumulates the penalty of the forwards since the last `take()` (for the logged loss)."""

    def __init__(
        self,
        importance: dict[str, torch.Tensor],
        anchor: dict[str, torch.Tensor],
        lam: float,
        grad_scale: float,
    ) -> None:
        self.importance, self.anchor, self.lam, self.grad_scale = importance, anchor, lam, grad_scale
        self.value: torch.Tensor | float = 0.0  # a device tensor once a forward ran: no host sync here
        self.enabled = True

    def attach(self, model: nn.Module) -> int:
        """Hook every module owning (directly) a parameter with an importance; returns how many."""
        hooked = 0
        for prefix, module in model.named_modules():
            own = [(f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False)]
            own = [(n, p) for n, p in own if n in self.importance and p.requires_grad]
            if not own:
                continue
            for n, p in own:
                self.importance[n] = fit_to(self.importance[n], p.shape).to(p.device)
                self.anchor[n] = fit_to(self.anchor[n], p.shape).to(p.device)
            module.register_forward_hook(self._hook([n for n, _ in own], [p for _, p in own]))
            hooked += 1
        return hooked

    def _hook(self, names: list[str], params: list[nn.Parameter]) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not (self.enabled and module.training and torch.is_tensor(output) and torch.is_grad_enabled()):
                return output
            grads = []
            for n, p in zip(names, params):
                diff = p.detach().float() - self.anchor[n]
                self.value = self.value + 0.5 * self.lam * (self.importance[n] * diff * diff).sum()
                grads.append((self.lam * self.grad_scale * self.importance[n] * diff).to(p.dtype))
            return _InjectGrad.apply(output, grads, *params)

        return hook

    def take(self) -> torch.Tensor | float:
        v, self.value = self.value, 0.0
        return v


# --------------------------------------------------------------------------------------------- LwF


def distillation_loss(student_BK: torch.Tensor, teacher_BK: torch.Tensor, temperature: float) -> torch.Tensor:
    """LwF: KL(teacher ‖ student) on the old classes' logits at temperature T, times T² (Hinton's scaling)."""
    t = temperature
    old = teacher_BK.shape[1]
    log_p = F.log_softmax(student_BK[:, :old].float() / t, dim=-1)
    q = F.softmax(teacher_BK.float() / t, dim=-1)
    return F.kl_div(log_p, q, reduction="batchmean") * t * t
