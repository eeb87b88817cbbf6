"""Every attention backend agrees with the explicit math reference, forward and backward."""

import pytest
import torch

from pretrain.models.attention import Attention, attend, flash_attn_available, resolve_attn_impl

CPU_BACKENDS = ["sdpa", "math", "auto"]


def _qkv(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 37, 16, generator=g).to(dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("impl", CPU_BACKENDS)
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_backend_matches_math_fwd_bwd(impl: str, dtype: torch.dtype, atol: float) -> None:
    q, k, v = _qkv(dtype)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attend(q64, k64, v64, "math")
    out = attend(q, k, v, impl)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad.to(dtype))
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, atol=atol * 2, rtol=atol * 2)


def test_math_is_softmax_reference() -> None:
    q, k, v = (t.detach().double() for t in _qkv(torch.float32))
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) / 4.0
    want = torch.einsum("bhnm,bhmd->bhnd", scores.softmax(-1), v)
    torch.testing.assert_close(attend(q, k, v, "math"), want)


def test_resolve() -> None:
    assert resolve_attn_impl("auto", "cpu", torch.bfloat16) == "sdpa"
    assert resolve_attn_impl("math", "cpu", torch.float32) == "math"
    with pytest.raises(ValueError, match="not one of"):
        resolve_attn_impl("xformers", "cpu", torch.float32)


@pytest.mark.skipif(flash_attn_available(), reason="flash_attn installed")
def test_flash_attn_missing_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="flash_attn package is not installed"):
        resolve_attn_impl("flash_attn", "cuda", torch.bfloat16)


def test_module_layout_and_impls_agree() -> None:
    torch.manual_seed(0)
    a = Attention(32, 4, qkv_bias=True, attn_impl="math")
    names = {n for n, _ in a.named_parameters()}
    assert names == {"qkv.weight", "q_bias", "v_bias", "proj.weight", "proj.bias"}
    with torch.no_grad():
        a.q_bias.normal_()
        a.v_bias.normal_()
    x = torch.randn(2, 10, 32)
    ref = a(x)
    a.attn_impl = "sdpa"
    torch.testing.assert_close(a(x), ref, atol=1e-5, rtol=1e-5)
    assert Attention(32, 4, qkv_bias=False).q_bias is None
