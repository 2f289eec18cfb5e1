"""The CPU decode paths of gqa.kernels (the fused C++ kernel and the torch fallback) and their dispatch,
against the fp64 reference.

Every numeric test runs on both paths (``cpu_path`` fixture). Tolerances are relative to PyTorch's
own error at the same dtype: SDPA on repeated K/V (what transformers runs) against the same fp64
reference. Keys no query may see hold NaN, so a path that reads (or multiplies by 0) one fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import gqa
from gqa import kernels, masks
from gqa.errors import GQAUserError
from gqa.kernels import cpu_fused, decode_attention, gather_pages, paged_decode_attention
from gqa.reference import repeat_kv
from helpers import decode_mask, poison_invisible

HEAD_CONFIGS = [(8, 8), (8, 4), (8, 2), (8, 1), (9, 3), (12, 3)]
HAVE_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None


@pytest.fixture(params=["fused", "torch"])
def cpu_path(request, monkeypatch):
    """Run the test on the fused C++ kernel, then on the torch fallback."""
    if request.param == "fused":
        if not HAVE_COMPILER:
            pytest.skip("no C++ compiler on this machine: only the torch fallback can run")
        assert cpu_fused.available(), cpu_fused.status()  # a compiler is here: the kernel must build
    else:
        monkeypatch.setattr(cpu_fused, "_state", {"op": None, "reason": "forced by the test", "tried": True})
    return request.param


def torch_error(q, k, v, bool_mask, ref):
    """Max error of SDPA (repeat_kv, q's dtype) vs the fp64 reference, over rows with a visible key."""
    g = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=bool_mask)
    rows = bool_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).any(-1)
    return (out.double() - ref).abs()[rows].max().item()


def check(out, ref, q, k, v, bool_mask, factor=3.0):
    assert torch.isfinite(out).all(), "NaN/inf in the output"
    err = (out.double() - ref).abs().max().item()
    tol = factor * torch_error(q, k, v, bool_mask, ref) + 4 * torch.finfo(q.dtype).eps
    assert err <= tol, f"error {err:.3g} > tolerance {tol:.3g}"


@pytest.mark.parametrize("hq,hkv", HEAD_CONFIGS)
@pytest.mark.parametrize("tq", [1, 5, 16])
def test_decode_attention_lengths_heads(hq, hkv, tq, cpu_path):
    torch.manual_seed(hq * 100 + hkv * 10 + tq)
    b, t_max, d = 3, 700, 64
    q = torch.randn(b, hq, tq, d)
    k, v = torch.randn(b, hkv, t_max, d), torch.randn(b, hkv, t_max, d)
    lengths = torch.tensor([700, 301, tq], dtype=torch.int32)
    m = decode_mask(lengths, tq, t_max)
    ref = gqa.reference_attention(q, k, v, mask=m)
    out = decode_attention(q, poison_invisible(k, m), poison_invisible(v, m), lengths, causal=True)
    check(out, ref, q, k, v, m)


@pytest.mark.parametrize(
    "causal,window,chunk",
    [
        (True, 100, None),
        (True, None, 128),
        (True, 200, 256),
        (False, None, 128),
        (False, 50, None),
        (False, None, None),
    ],
)
@pytest.mark.parametrize("tq", [1, 7])
def test_decode_attention_masks_skip_invisible_keys(causal, window, chunk, tq, cpu_path):
    torch.manual_seed(tq)
    b, hq, hkv, t_max, d = 2, 8, 2, 900, 48  # head_dim 48: not a multiple of the kernel's 64-wide tiles
    q = torch.randn(b, hq, tq, d)
    k, v = torch.randn(b, hkv, t_max, d), torch.randn(b, hkv, t_max, d)
    lengths = torch.tensor([900, 517], dtype=torch.int32)
    m = decode_mask(lengths, tq, t_max, causal or window is not None, window, chunk)
    ref = gqa.reference_attention(q, k, v, mask=m)
    # Keys outside every window/chunk are NaN: the path must never read them.
    out = decode_attention(
        q, poison_invisible(k, m), poison_invisible(v, m), lengths, causal=causal, window=window, chunk=chunk
    )
    check(out, ref, q, k, v, m)


def test_causal_defaults_to_false_like_gqa_attention(cpu_path):
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 8, 4, 32), torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32)
    plain = decode_attention(q, k, v)
    torch.testing.assert_close(plain, gqa.attention(q, k, v, backend="grouped"), atol=1e-5, rtol=1e-5)
    causal = decode_attention(q, k, v, causal=True)
    torch.testing.assert_close(causal, gqa.attention(q, k, v, mask=masks.causal(), backend="grouped"))
    assert not torch.allclose(plain, causal)  # Tq = 4: the first three tokens see fewer keys


@pytest.mark.parametrize("num_splits", [1, 3, 8, 64])
def test_split_count_does_not_change_the_result(num_splits, cpu_path):
    torch.manual_seed(num_splits)
    q = torch.randn(3, 12, 2, 64)
    k, v = torch.randn(3, 3, 1000, 64), torch.randn(3, 3, 1000, 64)
    lengths = torch.tensor([1000, 2, 513], dtype=torch.int32)
    m = decode_mask(lengths, 2, 1000)
    out = decode_attention(q, k, v, lengths, causal=True, num_splits=num_splits)
    check(out, gqa.reference_attention(q, k, v, mask=m), q, k, v, m)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (12, 3), (8, 1)])
@pytest.mark.parametrize("page_size,window", [(16, None), (32, 40), (64, None)])
def test_paged_decode_attention(hq, hkv, page_size, window, cpu_path):
    torch.manual_seed(page_size + hkv)
    b, tq, d, max_pages = 3, 3, 64, 20
    n_pages = b * max_pages + 5
    k_pages = torch.randn(n_pages, hkv, page_size, d)
    v_pages = torch.randn(n_pages, hkv, page_size, d)
    block_table = torch.randperm(n_pages)[: b * max_pages].view(b, max_pages).to(torch.int32)
    lengths = torch.tensor([max_pages * page_size, 37, page_size + 1], dtype=torch.int32)
    q = torch.randn(b, hq, tq, d)
    k, v = gather_pages(k_pages, block_table), gather_pages(v_pages, block_table)  # (B, Hkv, T, D)
    m = decode_mask(lengths, tq, k.shape[2], window=window)
    ref = gqa.reference_attention(q, k, v, mask=m)
    # Pages no sequence owns hold NaN, and so do the slots past each length in its last page.
    unused = torch.ones(n_pages, dtype=torch.bool)
    unused[block_table.long().flatten()] = False
    k_pages[unused] = float("nan")
    v_pages[unused] = float("nan")
    for i, n in enumerate(lengths.tolist()):
        last = block_table[i, (n - 1) // page_size]
        k_pages[last, :, (n - 1) % page_size + 1 :] = float("nan")
        v_pages[last, :, (n - 1) % page_size + 1 :] = float("nan")
    out = paged_decode_attention(q, k_pages, v_pages, block_table, lengths, causal=True, window=window)
    check(out, ref, q, k, v, m)


@pytest.mark.parametrize("d", [16, 48, 128])  # below, across and at multiples of the 32-wide bf16 dot product
@pytest.mark.parametrize("tq", [1, 4])
def test_bf16_computes_in_fp32(d, tq, cpu_path):
    """bf16 in, bf16 out, fp32 sums: a bf16 query on a bf16 cache takes the CPU's bf16 dot products where it
    has them (unscaled query, exact products), as close to the fp64 reference as the fp32 path, contiguous
    and paged."""
    torch.manual_seed(d + tq)
    b, hq, hkv, page, max_pages = 2, 9, 3, 64, 12
    k_pages = torch.randn(b * max_pages, hkv, page, d, dtype=torch.bfloat16)
    v_pages = torch.randn(b * max_pages, hkv, page, d, dtype=torch.bfloat16)
    table = torch.randperm(b * max_pages).view(b, max_pages).to(torch.int32)
    k, v = gather_pages(k_pages, table), gather_pages(v_pages, table)  # (B, Hkv, T, D)
    q = torch.randn(b, hq, tq, d, dtype=torch.bfloat16) * 3  # large scores: the scale is applied in fp32
    lengths = torch.tensor([max_pages * page, 333], dtype=torch.int32)
    m = decode_mask(lengths, tq, k.shape[2])
    ref = gqa.reference_attention(q, k, v, mask=m)
    out = decode_attention(q, k, v, lengths, causal=True)
    assert out.dtype == torch.bfloat16
    check(out, ref, q, k, v, m, factor=2.0)
    # The same values in fp32 (bf16 widens exactly): the fp32 path's arithmetic, rounded to bf16.
    widened = decode_attention(q.float(), k.float(), v.float(), lengths, causal=True).to(torch.bfloat16)
    err = (out.double() - ref).abs().max().item()
    assert err <= 1.5 * (widened.double() - ref).abs().max().item() + 4 * torch.finfo(torch.bfloat16).eps
    paged = paged_decode_attention(q, k_pages, v_pages, table, lengths, causal=True)
    check(paged, ref, q, k, v, m, factor=2.0)


@pytest.mark.parametrize(
    "d,dv,prefix",
    [(128, 80, True), (96, 64, False), (64, 96, False), (96, 96, False)],
    ids=["values-a-key-prefix", "narrower-values", "wider-values", "head-dim-96"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tq", [1, 3])
def test_value_width_other_than_the_key_width(d, dv, prefix, dtype, tq, cpu_path):
    """Values of width Dv != D (the output's width): separate V tensors, and a view of the keys' first Dv
    columns (the absorbed latent attention's values), contiguous and paged, against the fp64 reference. Widths
    80 and 96 are not multiples of the kernel's 64-wide value tiles: their last 16-float chunks take the
    single-chunk path. Invisible slots hold NaN, so a path that reads one fails."""
    torch.manual_seed(d + dv + tq)
    b, hq, hkv, page, max_pages = 2, 9, 3, 32, 10
    k_pages = torch.randn(b * max_pages, hkv, page, d).to(dtype)
    v_pages = k_pages[..., :dv] if prefix else torch.randn(b * max_pages, hkv, page, dv).to(dtype)
    table = torch.randperm(b * max_pages).view(b, max_pages).to(torch.int32)
    k, v = gather_pages(k_pages, table), gather_pages(v_pages, table)  # (B, Hkv, T, D), (B, Hkv, T, Dv)
    q = torch.randn(b, hq, tq, d).to(dtype)
    lengths = torch.tensor([max_pages * page, 201], dtype=torch.int32)
    m = decode_mask(lengths, tq, k.shape[2])
    ref = gqa.reference_attention(q, k, v, mask=m)
    assert ref.shape == (b, hq, tq, dv)
    k_seen = poison_invisible(k, m)
    v_seen = k_seen[..., :dv] if prefix else poison_invisible(v, m)
    out = decode_attention(q, k_seen, v_seen, lengths, causal=True)
    assert out.shape == (b, hq, tq, dv) and out.dtype == dtype
    check(out, ref, q, k, v, m)
    paged = paged_decode_attention(q, k_pages, v_pages, table, lengths, causal=True)
    check(paged, ref, q, k, v, m)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_other_dtypes(dtype, cpu_path):
    """fp16 runs in fp32; fp64 in fp64 (the torch path), so its error is at fp64's level."""
    torch.manual_seed(1)
    q = torch.randn(2, 8, 2, 32, dtype=dtype)
    k, v = torch.randn(2, 2, 400, 32, dtype=dtype), torch.randn(2, 2, 400, 32, dtype=dtype)
    lengths = torch.tensor([400, 150], dtype=torch.int32)
    m = decode_mask(lengths, 2, 400)
    out = decode_attention(q, k, v, lengths, causal=True)
    assert out.dtype == dtype
    ref = gqa.reference_attention(q, k, v, mask=m)
    if dtype == torch.float64:
        assert (out - ref).abs().max().item() < 1e-12
    else:
        check(out, ref, q, k, v, m, factor=2.0)


@pytest.mark.parametrize(
    "mask",
    [
        None,
        masks.causal(),
        masks.sliding_window(300),
        masks.causal() & masks.chunked(256),
        masks.causal() & masks.key_padding(torch.tensor([600, 1000])),
        masks.causal() & masks.custom(lambda qp, kp: (kp % 3) != 0),
        "tensor",
    ],
    ids=["none", "causal", "window", "chunked", "padding", "custom", "tensor"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_attention_routes_cpu_decode_to_kernel(mask, dtype, cpu_path):
    torch.manual_seed(1)
    n = kernels.CPU_MIN_KEYS + 100
    q = torch.randn(2, 12, 3, 64, dtype=dtype)
    k, v = torch.randn(2, 3, n, 64, dtype=dtype), torch.randn(2, 3, n, 64, dtype=dtype)
    if mask == "tensor":
        mask = torch.rand(2, 12, 3, n) > 0.3
    assert gqa.select_backend(q, k, v, mask) == "kernel"
    structural = not isinstance(mask, torch.Tensor) and "custom" not in repr(getattr(mask, "masks", ""))
    if isinstance(mask, masks.Mask) and any(isinstance(p, masks.Custom) for p in mask.parts()):
        structural = False
    assert kernels.cpu_path(dtype, mask) == ("fused" if cpu_path == "fused" and structural else "torch")
    ref = gqa.reference_attention(q, k, v, mask=mask)
    out = gqa.attention(q, k, v, mask=mask)
    bool_mask = masks.as_bool_mask(mask, batch=2, n_heads=12, q_len=3, k_len=n, device="cpu")
    bool_mask = torch.ones(1, 1, 1, n, dtype=torch.bool) if bool_mask is None else bool_mask
    check(out, ref, q, k, v, bool_mask)


def test_dispatch_thresholds(cpu_path):
    q, k = torch.randn(1, 8, 1, 64), torch.randn(1, 2, kernels.CPU_MIN_KEYS, 64)
    assert kernels.supports(q, k, k)
    assert not kernels.supports(torch.randn(1, 8, 17, 64), k, k)  # a prefill block
    assert not kernels.supports(q.half(), k.half(), k.half())
    assert not kernels.supports(q.requires_grad_(), k, k)
    assert gqa.select_backend(q.detach(), k, k, return_weights=True) == "grouped"
    q = q.detach()
    below_fused = k[:, :, : kernels.FUSED_MIN_KEYS - 1]
    at_fused = k[:, :, : kernels.FUSED_MIN_KEYS]
    assert not kernels.supports(q, below_fused, below_fused)
    # From FUSED_MIN_KEYS keys the fused kernel pays off; the torch fallback only from CPU_MIN_KEYS.
    assert kernels.supports(q, at_fused, at_fused) == (cpu_path == "fused")
    below_torch = k[:, :, : kernels.CPU_MIN_KEYS - 1]
    assert kernels.supports(q, below_torch, below_torch) == (cpu_path == "fused")


def test_fully_masked_rows_give_zeros(cpu_path):
    q, k, v = torch.randn(1, 8, 2, 32), torch.randn(1, 2, 600, 32), torch.randn(1, 2, 600, 32)
    mask = torch.zeros(1, 1, 2, 600, dtype=torch.bool)
    mask[:, :, 1, :10] = True
    out = gqa.attention(q, k, v, mask=mask, backend="kernel")
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    # Row 1 sees 10 keys: within torch's own fp32 error of the fp64 reference (not fp64's default tolerance).
    ref = gqa.reference_attention(q, k, v, mask=mask)
    check(out[:, :, 1:], ref[:, :, 1:], q[:, :, 1:], k, v, mask[:, :, 1:])
    # A sequence whose padding length is 0 sees no key at all: zeros, on the structural (fused) path too.
    out = gqa.attention(q, k, v, mask=masks.key_padding(torch.tensor([0])), backend="kernel")
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_in_padded_keys_does_not_leak(dtype, cpu_path):
    """Keys masked out by padding may hold anything (uninitialised cache slots): NaN there must not
    reach the output through 0 * NaN, on every backend."""
    torch.manual_seed(2)
    n = kernels.CPU_MIN_KEYS + 10
    q = torch.randn(2, 8, 1, 32, dtype=dtype)
    k, v = torch.randn(2, 2, n, 32, dtype=dtype), torch.randn(2, 2, n, 32, dtype=dtype)
    lengths = torch.tensor([n, 700])
    k[1, :, 700:] = float("nan")
    v[1, :, 700:] = float("nan")
    mask = masks.key_padding(lengths)
    ref = gqa.reference_attention(q, k.nan_to_num(), v.nan_to_num(), mask=mask)
    for backend in ("kernel", "grouped", "sdpa"):
        out = gqa.attention(q, k, v, mask=mask, backend=backend)
        assert torch.isfinite(out).all(), backend
        torch.testing.assert_close(out.double(), ref, atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)
    out = decode_attention(q, k, v, lengths.to(torch.int32))
    assert torch.isfinite(out).all()


def test_batch_of_zero_gives_an_empty_result(cpu_path):
    q, k = torch.randn(0, 8, 1, 32), torch.randn(0, 2, 100, 32)
    assert decode_attention(q, k, k).shape == (0, 8, 1, 32)
    assert gqa.attention(q, k, k).shape == (0, 8, 1, 32)
    table = torch.zeros(0, 4, dtype=torch.int32)
    pages = torch.randn(4, 2, 16, 32)
    out = paged_decode_attention(q, pages, pages, table, torch.zeros(0, dtype=torch.int32))
    assert out.shape == (0, 8, 1, 32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda q, k, L: decode_attention(q, k, k, L.float()), "integer tensor"),
        (lambda q, k, L: decode_attention(q, k, k, L[:1]), r"1-D int tensor \[B=2\]"),
        (lambda q, k, L: decode_attention(q, k, k, torch.tensor([1, 500])), "every length must be >= Tq"),
        (lambda q, k, L: decode_attention(q, k, k, torch.tensor([-3, 500])), "every length must be >= Tq"),
        (lambda q, k, L: decode_attention(q, k, k, torch.tensor([2000, 500])), "exceeds the cache"),
        (lambda q, k, L: decode_attention(q[:, :7], k, k, L), "not a positive multiple"),
        (lambda q, k, L: decode_attention(q.repeat(1, 1, 9, 1), k, k, torch.tensor([600, 600])), "1..16 query tokens"),
        (lambda q, k, L: decode_attention(q, k, k, L, window=0), "window must be an integer >= 1"),
        (lambda q, k, L: decode_attention(q, k, k.double(), L), "dtypes differ"),
        (lambda q, k, L: decode_attention(q[..., :0], k[..., :0], k[..., :0], L), "head_dim is 0"),
        (lambda q, k, L: decode_attention(q, k, k, L, scale=0.0), "scale must be a finite number > 0"),
        (lambda q, k, L: decode_attention(q, k, k, L, scale=-1.0), "scale must be a finite number > 0"),
        (lambda q, k, L: decode_attention(q, k, k, L, scale=float("nan")), "scale must be a finite number > 0"),
        (lambda q, k, L: paged_decode_attention(q, k, k, torch.tensor([[0], [5]]), L), "page ids outside"),
        (lambda q, k, L: paged_decode_attention(q, k, k, torch.zeros(2, 1).float(), L), "int32 page ids"),
    ],
)
def test_bad_input_one_line_errors(call, match):
    q, k = torch.randn(2, 8, 2, 32), torch.randn(2, 2, 1000, 32)
    lengths = torch.tensor([1000, 500], dtype=torch.int32)
    with pytest.raises(GQAUserError, match=match) as info:
        call(q, k, lengths)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad_id", [-1, 99])
def test_invalid_page_ids_are_refused_on_cpu_even_unchecked(bad_id, cpu_path):
    """check_pages=False skips a device sync on CUDA; on CPU the check is free and always runs, so a
    page id of -1 can never read the last page (Python's negative indexing)."""
    pages = torch.randn(4, 2, 16, 32)
    q = torch.randn(1, 8, 1, 32)
    table = torch.tensor([[0, bad_id]], dtype=torch.int32)
    with pytest.raises(GQAUserError, match="page ids outside"):
        paged_decode_attention(q, pages, pages, table, torch.tensor([20], dtype=torch.int32), check_pages=False)
    # An invalid id past the sequence's last page is never read, so it is fine.
    out = paged_decode_attention(q, pages, pages, table, torch.tensor([16], dtype=torch.int32), check_pages=False)
    torch.testing.assert_close(out, decode_attention(q, pages[:1], pages[:1]), atol=1e-5, rtol=1e-5)


def test_page_ids_past_int32_are_refused_not_wrapped(cpu_path):
    """An int64 id of 2^32 + 3 narrowed to int32 is 3: with check_pages=False it read page 3."""
    pages = torch.randn(4, 2, 16, 32)
    q = torch.randn(1, 8, 1, 32)
    table = torch.tensor([[0, 2**32 + 3]], dtype=torch.int64)
    with pytest.raises(GQAUserError, match="page ids outside"):
        paged_decode_attention(q, pages, pages, table, torch.tensor([20], dtype=torch.int32), check_pages=False)


@pytest.mark.parametrize("length", [2**31, 2**40])
def test_key_padding_lengths_past_int32_mean_every_key(length, cpu_path):
    """A padding length >= Tk keeps every key, on the kernel path as on the others (narrowed to int32
    it used to mask every key)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 1, 32), torch.randn(2, 2, 300, 32), torch.randn(2, 2, 300, 32)
    mask = masks.key_padding(torch.tensor([length, 100], dtype=torch.int64))
    out = gqa.attention(q, k, v, mask=mask, backend="kernel")
    torch.testing.assert_close(out, gqa.attention(q, k, v, mask=mask, backend="grouped"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:1], gqa.attention(q[:1], k[:1], v[:1]), atol=1e-5, rtol=1e-5)


# --- the build: fallback, lock, cache ---------------------------------------------------------------


@pytest.mark.skipif(not HAVE_COMPILER, reason="needs a compiler to show the fused path runs")
def test_fused_kernel_really_runs(monkeypatch):
    assert cpu_fused.available(), cpu_fused.status()
    calls = []
    real = cpu_fused.fused_decode
    monkeypatch.setattr(cpu_fused, "fused_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k = torch.randn(1, 8, 1, 32), torch.randn(1, 2, 300, 32)
    decode_attention(q, k, k)
    assert calls and cpu_fused.status().startswith("fused C++ kernel loaded")


def test_failed_build_falls_back_to_torch_with_a_warning(monkeypatch, tmp_path):
    """A machine without a working compiler: the build fails for real (CXX points nowhere, a fresh
    cache), a RuntimeWarning says so once, and decode runs the torch path with the same results."""
    monkeypatch.setattr(cpu_fused, "_state", {"op": None, "reason": None, "tried": False})
    monkeypatch.setenv("GQA_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv("GQA_CPU_KERNEL", raising=False)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 1, 32), torch.randn(2, 2, 500, 32), torch.randn(2, 2, 500, 32)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        out = decode_attention(q, k, v)
    assert not cpu_fused.available()
    assert cpu_fused.status().startswith("torch fallback:")
    assert kernels.cpu_path(torch.float32) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not per call
        decode_attention(q, k, v)
    m = torch.ones(1, 1, 1, 500, dtype=torch.bool)
    check(out, gqa.reference_attention(q, k, v), q, k, v, m, factor=2.0)


def test_env_turns_the_fused_kernel_off_without_a_warning(monkeypatch):
    monkeypatch.setattr(cpu_fused, "_state", {"op": None, "reason": None, "tried": False})
    monkeypatch.setenv("GQA_CPU_KERNEL", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu_fused.available()
    assert "GQA_CPU_KERNEL=torch" in cpu_fused.status()


def test_build_lock_excludes_a_second_builder(tmp_path):
    """Parallel test workers and processes build one at a time: while one holds the lock, another
    process cannot take it (flock, released by the OS if the holder dies)."""
    lock = tmp_path / "k.lock"
    probe = (
        "import fcntl, sys\n"
        f"f = open({str(lock)!r}, 'a+')\n"
        "try:\n    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n"
    )
    with cpu_fused._exclusive(lock):
        assert subprocess.run([sys.executable, "-c", probe]).returncode == 3
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0


def test_stale_torch_baton_is_cleared_before_building(monkeypatch, tmp_path):
    """torch's build baton is a plain file a killed build leaves behind (the next build would wait on it
    forever); under our lock it is removed first."""
    monkeypatch.setenv("GQA_KERNEL_CACHE", str(tmp_path))
    build_dir = cpu_fused.cache_dir()
    build_dir.mkdir(parents=True)
    (build_dir / "lock").write_text("")
    seen = {}

    def fake_load(**kw):
        seen["baton"] = (build_dir / "lock").exists()
        seen["dir"] = kw["build_directory"]
        raise RuntimeError("stop here")

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    with pytest.raises(RuntimeError, match="stop here"):
        cpu_fused._build()
    assert seen == {"baton": False, "dir": str(build_dir)}


def test_cache_dir_depends_on_the_source(monkeypatch, tmp_path):
    monkeypatch.setenv("GQA_KERNEL_CACHE", str(tmp_path))
    first = cpu_fused.cache_dir()
    assert first.parent == tmp_path and first.name.startswith("cpu_decode-")
    src = tmp_path / "other.cpp"
    src.write_text("// another kernel\n")
    monkeypatch.setattr(cpu_fused, "SOURCE", src)
    assert cpu_fused.cache_dir() != first


def test_ninja_from_the_pip_package_is_found_without_an_activated_venv(monkeypatch):
    """torch's builder runs `ninja` from PATH; a venv's python run without activation lacks the venv's bin
    on PATH, so the build puts the pip package's ninja there for its duration only."""
    import ninja  # a dependency of gqa (pyproject)

    monkeypatch.setattr(shutil, "which", lambda name, *a, **kw: None)
    monkeypatch.setenv("PATH", "/nonexistent-bin")
    import os

    with cpu_fused._ninja_on_path():
        assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
    assert os.environ["PATH"] == "/nonexistent-bin"


def test_kernel_mask_args_takes_position_masks_and_refuses_the_rest():
    from gqa import masks
    from gqa.kernels import kernel_mask_args

    assert kernel_mask_args(None) == {"causal": False, "window": None, "chunk": None}
    assert kernel_mask_args(masks.causal()) == {"causal": True, "window": None, "chunk": None}
    both = masks.causal() & masks.sliding_window(8) & masks.sliding_window(4) & masks.chunked(16)
    assert kernel_mask_args(both) == {"causal": True, "window": 4, "chunk": 16}
    for other in (
        masks.causal() & masks.key_padding(torch.tensor([3, 5])),
        masks.chunked(4) & masks.chunked(8),
        masks.custom(lambda q, k: q >= k),
        torch.ones(1, 1, 2, 2, dtype=torch.bool),
    ):
        assert kernel_mask_args(other) is None, other


# --- the kernel cache: verified before loading ---------------------------------------------------------


def test_empty_or_relative_cache_variable_never_means_the_current_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("GQA_KERNEL_CACHE", "")
    assert cpu_fused.cache_dir().parent == tmp_path / "xdg" / "gqa" / "kernels"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GQA_KERNEL_CACHE", "rel")
    assert cpu_fused.cache_dir().parent == tmp_path / "rel"  # absolute: status() names a real folder


def test_only_a_library_matching_its_manifest_is_verified(tmp_path):
    so = cpu_fused._library(tmp_path)
    so.write_bytes(b"\x7fELF" + b"x" * 1000)
    assert not cpu_fused._verified(tmp_path)  # no manifest: a build that never finished
    (tmp_path / cpu_fused.MANIFEST).write_text(cpu_fused._digest(so) + "\n")
    assert cpu_fused._verified(tmp_path)
    so.write_bytes(so.read_bytes()[:500])  # truncated
    assert not cpu_fused._verified(tmp_path)
    (tmp_path / "obj.o").write_text("")
    cpu_fused._discard_damaged(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not HAVE_COMPILER, reason="needs a built kernel to damage")
@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_damaged_cached_kernel_is_never_loaded(damage, tmp_path):
    """A truncated .so used to crash every CPU decode with SIGBUS (and ninja, seeing it newer than the
    source, never rebuilt it). A copy of the real build is damaged; with no compiler to rebuild, decode
    must say so, warn once, fall back to the torch path and give the right numbers."""
    assert cpu_fused.available(), cpu_fused.status()
    build = cpu_fused._state["dir"]  # where this process's kernel was built
    copy = tmp_path / "cache" / build.name
    shutil.copytree(build, copy, ignore=shutil.ignore_patterns("*.lock", "lock"))
    so = cpu_fused._library(copy)
    data = so.read_bytes()
    so.write_bytes(data[: len(data) // 3] if damage == "truncate" else data[:4096] + b"\0" * (len(data) - 4096))
    probe = (
        "import torch, gqa\n"
        "from gqa.kernels import decode_attention, cpu_fused\n"
        "torch.manual_seed(0)\n"
        "q, k, v = torch.randn(1, 8, 1, 32), torch.randn(1, 2, 600, 32), torch.randn(1, 2, 600, 32)\n"
        "err = (decode_attention(q, k, v).double() - gqa.reference_attention(q, k, v)).abs().max().item()\n"
        "print(cpu_fused.status()); assert err < 1e-4, err\n"
    )
    import os

    env = dict(os.environ, GQA_KERNEL_CACHE=str(tmp_path / "cache"), CXX=str(tmp_path / "no-such-compiler"))
    env.pop("GQA_CPU_KERNEL", None)
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "damaged or unverified; rebuilding it" in run.stderr and "could not be built" in run.stderr
    assert run.stdout.startswith("torch fallback:")
    assert not cpu_fused._library(copy).exists()  # never left to crash the next run


@pytest.mark.parametrize("tq", [1, 4])
def test_left_padding_starts_equal_the_valid_mask(tq, cpu_path):
    """key_padding(start=...) (left padding as [B] starts, what gqa.generate's decode steps pass) gives the
    same attention as the [B, Tk] valid mask, on the kernel path (the starts are a kernel argument) and
    on the grouped one; padded keys hold NaN, so reading one fails."""
    torch.manual_seed(0)
    b, tk = 3, 300
    q, k, v = torch.randn(b, 9, tq, 32), torch.randn(b, 3, tk, 32), torch.randn(b, 3, tk, 32)
    start = torch.tensor([0, 7, 130])
    valid = torch.arange(tk)[None, :] >= start[:, None]  # (B, Tk)
    hidden = ~valid[:, None, :, None]  # (B, 1, Tk, 1)
    k, v = k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("nan"))
    by_start = masks.causal() & masks.key_padding(start=start)
    by_valid = masks.causal() & masks.key_padding(valid=valid)
    assert kernels.kernel_mask_args(by_start) is None  # the paged kernels take no starts
    got = gqa.attention(q, k, v, mask=by_start, backend="kernel")
    assert torch.isfinite(got).all()
    k0, v0 = k.nan_to_num(0.0), v.nan_to_num(0.0)
    want = gqa.attention(q, k0, v0, mask=by_valid, backend="grouped")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gqa.attention(q, k0, v0, mask=by_start, backend="grouped"), want)
    for i in range(b):  # each sequence alone over its own keys
        s = int(start[i])
        alone = gqa.attention(q[i : i + 1], k0[i : i + 1, :, s:], v0[i : i + 1, :, s:], mask=masks.causal())
        torch.testing.assert_close(got[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_key_padding_takes_exactly_one_form():
    with pytest.raises(GQAUserError, match="exactly one of"):
        masks.key_padding(torch.tensor([3]), start=torch.tensor([1]))
    with pytest.raises(GQAUserError, match="start must be a 1-D integer"):
        masks.key_padding(start=torch.tensor([[1]]))
    with pytest.raises(GQAUserError, match="start must be >= 0"):
        masks.key_padding(start=torch.tensor([-1]))
