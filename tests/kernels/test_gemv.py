"""The decode GEMV (``gqa.kernels.gemv``) against an fp64 reference, with tolerances relative to torch's own
``F.linear`` error at the same dtype; where it runs and where it must not; the model's greedy tokens with and
without it."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

import gqa
from gqa.kernels import cpu_fused, gemv
from helpers import tiny_gqa

HAVE_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None
needs_kernel = pytest.mark.skipif(not HAVE_COMPILER, reason="the GEMV is part of the C++ kernel library")


def _check(x, w, b):
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    torch_err = (F.linear(x, w, b).double() - ref).abs().max().item()
    assert gemv.uses_kernel(x, w)
    out = gemv.linear(x, w, b)
    assert out.dtype == x.dtype and out.shape == ref.shape
    err = (out.double() - ref).abs().max().item()
    # bf16 rounds the output once: one ulp of the largest value on top of torch's error at the dtype.
    ulp = ref.abs().max().item() * torch.finfo(x.dtype).eps
    assert err <= 3 * torch_err + 2 * ulp, f"error {err:.3g} > 3 x torch's {torch_err:.3g} + 2 ulp"


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 16])
@pytest.mark.parametrize("n,k", [(1, 16), (7, 33), (96, 64), (130, 200), (577, 576)])
def test_fp32_matches_the_reference(rows, n, k):
    torch.manual_seed(rows * 1000 + n + k)
    x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
    _check(x, w, None)
    _check(x, w, b)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16])
@pytest.mark.parametrize("n,k", [(5, 40), (9, 64), (192, 576)])
def test_bf16_sums_in_fp32(rows, n, k):
    torch.manual_seed(rows + n)
    x, w, b = (torch.randn(s).bfloat16() for s in ((rows, k), (n, k), (n,)))
    _check(x, w, b)


@needs_kernel
def test_leading_dims_are_kept():
    x, w = torch.randn(2, 1, 3, 24), torch.randn(10, 24)
    out = gemv.linear(x, w)
    assert out.shape == (2, 1, 3, 10)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_nan_and_inf_propagate_as_in_torch():
    x, w = torch.randn(1, 32), torch.randn(8, 32)
    x[0, 3] = float("nan")
    assert torch.isnan(gemv.linear(x, w)).all()
    x[0, 3], w[2, 5] = 1.0, float("inf")
    assert torch.equal(torch.isinf(gemv.linear(x, w)), torch.isinf(F.linear(x, w)))


@needs_kernel
def test_when_the_kernel_runs():
    assert cpu_fused.available(), cpu_fused.status()  # a compiler is here: the library must build
    w = torch.randn(8, 32)
    assert gemv.uses_kernel(torch.randn(16, 32), w)
    assert not gemv.uses_kernel(torch.randn(17, 32), w)  # many rows: torch's matmul
    assert gemv.uses_kernel(torch.randn(16, 32).bfloat16(), w.bfloat16())
    assert not gemv.uses_kernel(torch.randn(1, 32).double(), w.double())  # fp64 stays in torch
    assert not gemv.uses_kernel(torch.randn(1, 32), w.t().contiguous().t())  # strided weight
    wg = w.clone().requires_grad_()
    assert not gemv.uses_kernel(torch.randn(1, 32), wg)  # training needs the autograd graph
    with torch.no_grad():
        assert gemv.uses_kernel(torch.randn(1, 32), wg)


def test_gradients_flow_through_the_torch_path():
    from gqa.layer import Linear

    lin = Linear(32, 8)
    x = torch.randn(1, 32, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


def test_without_the_library_it_is_torch(monkeypatch):
    monkeypatch.setattr(cpu_fused, "_state", {"op": None, "reason": "forced by the test", "tried": True})
    x, w = torch.randn(1, 32), torch.randn(8, 32)
    assert not gemv.uses_kernel(x, w)
    assert torch.equal(gemv.linear(x, w), F.linear(x, w))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_greedy_tokens_equal_the_torch_path(dtype, monkeypatch):
    """gqa.generate's tokens with the GEMV equal the eager F.linear path's (batch 1 and a padded batch)."""
    model = tiny_gqa(n_kv=2).to(dtype)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    calls = []
    real = cpu_fused.linears_op()
    monkeypatch.setattr(cpu_fused, "linears_op", lambda: lambda *a: calls.append(1) or real(*a))
    fast = [gqa.generate(model, p, max_new_tokens=12, eos_token_id=None).tokens for p in (prompts[:1], prompts)]
    assert calls, "the GEMV never ran"
    monkeypatch.setattr(gemv, "MAX_ROWS", {})
    eager = [gqa.generate(model, p, max_new_tokens=12, eos_token_id=None).tokens for p in (prompts[:1], prompts)]
    assert fast == eager


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_several_weights_in_one_call_equal_one_call_each(dtype):
    torch.manual_seed(3)
    x = torch.randn(2, 1, 48).to(dtype)
    ws = [torch.randn(n, 48).to(dtype) for n in (36, 12, 13)]
    bs = [torch.randn(36).to(dtype), None, torch.randn(13).to(dtype)]
    fused = gemv.linears(x, ws, bs)
    assert [o.shape for o in fused] == [(2, 1, 36), (2, 1, 12), (2, 1, 13)]
    for out, w, b in zip(fused, ws, bs, strict=True):
        assert torch.equal(out, gemv.linear(x, w, b))  # the same tiles, the same sums


@needs_kernel
def test_project_keeps_hooks_firing():
    """A hook on one projection (calibration, profiling) makes project call the modules one by one."""
    from gqa.layer import Linear, project

    mods = (Linear(32, 8), Linear(32, 4))
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        fused = project(x, mods)
        seen = []
        handle = mods[1].register_forward_hook(lambda m, a, out: seen.append(out.shape))
        one_by_one = project(x, mods)
        handle.remove()
    assert seen == [(1, 1, 4)]
    for a, b in zip(fused, one_by_one, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
