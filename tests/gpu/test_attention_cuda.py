"""CUDA attention kernels (flash_attn package, SDPA flash kernel) vs the math reference, bf16 fwd+bwd."""

import pytest
import torch

from pretrain.models.attention import attend, flash_attn_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return [
        torch.randn(2, 8, 1568 // 8, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
        for _ in range(3)
    ]


def _check(fn) -> None:
    q, k, v = _inputs()
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attend(q32, k32, v32, "math")
    out = fn(q, k, v)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad.bfloat16())
    for got, want in ((q.grad, q32.grad), (k.grad, k32.grad), (v.grad, v32.grad)):
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


@pytest.mark.skipif(not flash_attn_available(), reason="flash_attn not installed")
def test_flash_attn_package_matches_math() -> None:
    _check(lambda q, k, v: attend(q, k, v, "flash_attn"))


def test_auto_picks_flash_attn_on_cuda_half() -> None:
    from pretrain.models.attention import resolve_attn_impl

    want = "flash_attn" if flash_attn_available() else "sdpa"
    assert resolve_attn_impl("auto", "cuda", torch.bfloat16) == want


def test_sdpa_flash_kernel_matches_math() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return attend(q, k, v, "sdpa")

    _check(run)
