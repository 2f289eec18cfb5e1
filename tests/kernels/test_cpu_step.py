"""The decode GEMV (``gqa.kernels.cpu_step``) against an fp64 reference, with tolerances relative to torch's own
``F.linear`` error at the same dtype; where it runs and where it must not; the model's greedy tokens with and
without it."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

import gqa
from gqa.kernels import cpu_fused, cpu_step
from helpers import tiny_gqa

HAVE_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None
needs_kernel = pytest.mark.skipif(not HAVE_COMPILER, reason="the GEMV is part of the C++ kernel library")


def _check(x, w, b):
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    torch_err = (F.linear(x, w, b).double() - ref).abs().max().item()
    assert cpu_step.uses_kernel(x, w)
    out = cpu_step.linear(x, w, b)
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
    out = cpu_step.linear(x, w)
    assert out.shape == (2, 1, 3, 10)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_nan_and_inf_propagate_as_in_torch():
    x, w = torch.randn(1, 32), torch.randn(8, 32)
    x[0, 3] = float("nan")
    assert torch.isnan(cpu_step.linear(x, w)).all()
    x[0, 3], w[2, 5] = 1.0, float("inf")
    assert torch.equal(torch.isinf(cpu_step.linear(x, w)), torch.isinf(F.linear(x, w)))


@needs_kernel
def test_when_the_kernel_runs():
    assert cpu_fused.available(), cpu_fused.status()  # a compiler is here: the library must build
    w = torch.randn(8, 32)
    assert cpu_step.uses_kernel(torch.randn(16, 32), w)
    assert not cpu_step.uses_kernel(torch.randn(17, 32), w)  # many rows: torch's matmul
    assert cpu_step.uses_kernel(torch.randn(16, 32).bfloat16(), w.bfloat16())
    assert not cpu_step.uses_kernel(torch.randn(1, 32).double(), w.double())  # fp64 stays in torch
    assert not cpu_step.uses_kernel(torch.randn(1, 32), w.t().contiguous().t())  # strided weight
    wg = w.clone().requires_grad_()
    assert not cpu_step.uses_kernel(torch.randn(1, 32), wg)  # training needs the autograd graph
    with torch.no_grad():
        assert cpu_step.uses_kernel(torch.randn(1, 32), wg)


def test_gradients_flow_through_the_torch_path():
    from gqa.layer import Linear

    lin = Linear(32, 8)
    x = torch.randn(1, 32, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


def test_without_the_library_it_is_torch(monkeypatch):
    monkeypatch.setattr(cpu_fused, "_state", {"op": None, "reason": "forced by the test", "tried": True})
    x, w = torch.randn(1, 32), torch.randn(8, 32)
    assert not cpu_step.uses_kernel(x, w)
    assert torch.equal(cpu_step.linear(x, w), F.linear(x, w))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_greedy_tokens_equal_the_torch_path(dtype, monkeypatch):
    """gqa.generate's tokens with the step kernels (GEMV, RMSNorm, RoPE) equal the eager torch path's, at batch 1
    and for a padded batch."""
    model = tiny_gqa(n_kv=2).to(dtype)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    ran = {"linears": 0, "rms_norm": 0, "rope": 0}

    def counted(name, fn):
        def call(*a):
            out = fn(*a)
            ran[name] += out is not None  # None: the kernel declined and torch ran
            return out

        return call

    for name in ("rms_norm", "rope"):
        monkeypatch.setattr(cpu_step, name, counted(name, getattr(cpu_step, name)))
    real_op = cpu_fused.linears_op()
    monkeypatch.setattr(
        cpu_fused, "linears_op", lambda: lambda *a: ran.update(linears=ran["linears"] + 1) or real_op(*a)
    )
    fast = [gqa.generate(model, p, max_new_tokens=12, eos_token_id=None).tokens for p in (prompts[:1], prompts)]
    assert all(ran.values()), f"a step kernel never ran: {ran}"
    monkeypatch.setattr(cpu_fused, "_state", {"op": None, "reason": "forced by the test", "tried": True})
    eager = [gqa.generate(model, p, max_new_tokens=12, eos_token_id=None).tokens for p in (prompts[:1], prompts)]
    assert fast == eager


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_several_weights_in_one_call_equal_one_call_each(dtype):
    torch.manual_seed(3)
    x = torch.randn(2, 1, 48).to(dtype)
    ws = [torch.randn(n, 48).to(dtype) for n in (36, 12, 13)]
    bs = [torch.randn(36).to(dtype), None, torch.randn(13).to(dtype)]
    fused = cpu_step.linears(x, ws, bs)
    assert [o.shape for o in fused] == [(2, 1, 36), (2, 1, 12), (2, 1, 13)]
    for out, w, b in zip(fused, ws, bs, strict=True):
        assert torch.equal(out, cpu_step.linear(x, w, b))  # the same tiles, the same sums


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


def _eager_rms_norm(x, w, eps, scale_fp32):
    """gqa.layer.RMSNorm's torch code (the kernel bypassed)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * w.float()).to(x.dtype) if scale_fp32 else w * xf.to(x.dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale_fp32", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("shape", [(1, 1, 576), (4, 1, 40), (2, 3, 17)])
def test_rms_norm_matches_the_reference(dtype, scale_fp32, shape):
    torch.manual_seed(sum(shape))
    x, w = (torch.randn(shape) * 3).to(dtype), (1 + torch.randn(shape[-1]) / 4).to(dtype)
    ref = _eager_rms_norm(x.double(), w.double(), 1e-6, scale_fp32)
    torch_err = (_eager_rms_norm(x, w, 1e-6, scale_fp32).double() - ref).abs().max().item()
    out = cpu_step.rms_norm(x, w, 1e-6, scale_fp32)
    assert out is not None and out.dtype == dtype and out.shape == x.shape
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * torch_err + 4 * torch.finfo(dtype).eps * ref.abs().max().item()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_batch", [False, True])
def test_rope_matches_the_reference_on_strided_heads(dtype, per_batch):
    from gqa.rope import rope_cos_sin, rope_frequencies

    torch.manual_seed(1)
    b, t, h, d = 2, 3, 5, 64
    x = torch.randn(b, t, h * d + 7).to(dtype)[..., 7:].view(b, t, h, d).transpose(1, 2)  # (B, H, T, D) strided
    pos = torch.tensor([[4, 5, 6], [0, 1, 2]]) if per_batch else torch.arange(10, 13)
    cos, sin = rope_cos_sin(pos, rope_frequencies(d, 10000.0))
    c, s = (cos[:, None], sin[:, None]) if per_batch else (cos, sin)
    half = d // 2

    def eager(x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
        return (xf * c.to(xf.dtype) + rotated * s.to(xf.dtype)).to(x.dtype)

    ref = eager(x.double())
    torch_err = (eager(x).double() - ref).abs().max().item()
    out = cpu_step.rope(x, cos, sin)
    assert out is not None and out.dtype == dtype and out.is_contiguous()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * torch_err + 4 * torch.finfo(torch.float32).eps * ref.abs().max().item()


@needs_kernel
def test_norm_and_rope_kernels_only_take_decode_sized_inputs_without_gradients():
    w = torch.ones(32)
    assert cpu_step.rms_norm(torch.randn(16, 32), w, 1e-6, False) is not None
    assert cpu_step.rms_norm(torch.randn(17, 32), w, 1e-6, False) is None  # prefill: threaded torch ops
    assert cpu_step.rms_norm(torch.randn(1, 32).double(), w.double(), 1e-6, False) is None
    assert cpu_step.rms_norm(torch.randn(1, 32).bfloat16(), w, 1e-6, False) is None  # mixed dtypes promote in torch
    assert cpu_step.rms_norm(torch.randn(1, 32), w.clone().requires_grad_(), 1e-6, False) is None
    cos = sin = torch.ones(1, 8)
    assert cpu_step.rope(torch.randn(1, 4, 1, 8), cos, sin) is not None
    assert cpu_step.rope(torch.randn(1, 4, 17, 8), torch.ones(17, 8), torch.ones(17, 8)) is None
    assert cpu_step.rope(torch.randn(1, 4, 1, 8, requires_grad=True), cos, sin) is None
