"""The CPU decode path of gqa.kernels and its dispatch, against the fp64 reference.

Tolerances are relative to PyTorch's own error at the same dtype: SDPA on repeated K/V (what
transformers runs) measured against the same fp64 reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gqa
from gqa import kernels, masks
from gqa.kernels import decode_attention, gather_pages, paged_decode_attention
from gqa.reference import repeat_kv

HEAD_CONFIGS = [(8, 8), (8, 4), (8, 2), (8, 1), (9, 3), (12, 3)]


def torch_error(q, k, v, bool_mask, ref):
    """Max error of SDPA (repeat_kv, q's dtype) vs the fp64 reference, over rows with a visible key."""
    g = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=bool_mask)
    rows = bool_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).any(-1)
    return (out.double() - ref).abs()[rows].max().item()


def decode_mask(lengths, tq, t_max, causal=True, window=None, chunk=None):
    """Bool [B, 1, Tq, T_max]: token t of sequence b at lengths[b] - Tq + t, keys < lengths[b]."""
    q_pos = lengths.long()[:, None] - tq + torch.arange(tq)[None, :]  # (B, Tq)
    parts = [masks.key_padding(lengths.long())]
    if causal:
        parts.append(masks.causal())
    if window is not None:
        parts.append(masks.sliding_window(window))
    if chunk is not None:
        parts.append(masks.chunked(chunk))
    m = parts[0]
    for p in parts[1:]:
        m = m & p
    return m.materialize(tq, t_max, q_positions=q_pos).expand(len(lengths), 1, tq, t_max)


def poison_invisible(x, bool_mask):
    """NaN in every key slot no query of that sequence may see: reading one would show in the output."""
    never = ~bool_mask.any(dim=2)[:, :, :, None]  # (B, 1, T, 1)
    return x.masked_fill(never, float("nan"))


def check(out, ref, q, k, v, bool_mask, factor=3.0):
    err = (out.double() - ref).abs().max().item()
    tol = factor * torch_error(q, k, v, bool_mask, ref) + 4 * torch.finfo(q.dtype).eps
    assert err <= tol, f"error {err:.3g} > tolerance {tol:.3g}"


@pytest.mark.parametrize("hq,hkv", HEAD_CONFIGS)
@pytest.mark.parametrize("tq", [1, 5, 16])
def test_decode_attention_lengths_heads(hq, hkv, tq):
    torch.manual_seed(hq * 100 + hkv * 10 + tq)
    b, t_max, d = 3, 700, 64
    q = torch.randn(b, hq, tq, d)
    k, v = torch.randn(b, hkv, t_max, d), torch.randn(b, hkv, t_max, d)
    lengths = torch.tensor([700, 301, tq], dtype=torch.int32)
    m = decode_mask(lengths, tq, t_max)
    ref = gqa.reference_attention(q, k, v, mask=m)
    out = decode_attention(q, poison_invisible(k, m), poison_invisible(v, m), lengths)
    check(out, ref, q, k, v, m)


@pytest.mark.parametrize(
    "causal,window,chunk",
    [(True, 100, None), (True, None, 128), (True, 200, 256), (False, None, 128), (False, 50, None)],
)
@pytest.mark.parametrize("tq", [1, 7])
def test_decode_attention_masks_skip_invisible_keys(causal, window, chunk, tq):
    torch.manual_seed(tq)
    b, hq, hkv, t_max, d = 2, 8, 2, 900, 64
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


@pytest.mark.parametrize("hq,hkv", [(8, 2), (12, 3), (8, 1)])
@pytest.mark.parametrize("page_size,window", [(16, None), (32, 40), (64, None)])
def test_paged_decode_attention(hq, hkv, page_size, window):
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
    # Pages no sequence owns hold NaN.
    unused = torch.ones(n_pages, dtype=torch.bool)
    unused[block_table.long().flatten()] = False
    k_pages[unused] = float("nan")
    v_pages[unused] = float("nan")
    out = paged_decode_attention(q, k_pages, v_pages, block_table, lengths, window=window)
    check(out, ref, q, k, v, m)


def test_bf16_computes_in_fp32():
    torch.manual_seed(0)
    b, hq, hkv, tq, t_max, d = 2, 8, 2, 4, 1024, 128
    q = torch.randn(b, hq, tq, d, dtype=torch.bfloat16)
    k = torch.randn(b, hkv, t_max, d, dtype=torch.bfloat16)
    v = torch.randn(b, hkv, t_max, d, dtype=torch.bfloat16)
    lengths = torch.tensor([1024, 800], dtype=torch.int32)
    m = decode_mask(lengths, tq, t_max)
    ref = gqa.reference_attention(q, k, v, mask=m)
    out = decode_attention(q, k, v, lengths)
    assert out.dtype == torch.bfloat16
    check(out, ref, q, k, v, m)


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
def test_gqa_attention_routes_cpu_decode_to_kernel(mask, dtype):
    torch.manual_seed(1)
    n = kernels.CPU_MIN_KEYS + 100
    q = torch.randn(2, 12, 3, 64, dtype=dtype)
    k, v = torch.randn(2, 3, n, 64, dtype=dtype), torch.randn(2, 3, n, 64, dtype=dtype)
    if mask == "tensor":
        mask = torch.rand(2, 12, 3, n) > 0.3
    assert gqa.select_backend(q, k, v, mask) == "kernel"
    ref = gqa.reference_attention(q, k, v, mask=mask)
    out = gqa.attention(q, k, v, mask=mask)
    bool_mask = masks.as_bool_mask(mask, batch=2, n_heads=12, q_len=3, k_len=n, device="cpu")
    bool_mask = torch.ones(1, 1, 1, n, dtype=torch.bool) if bool_mask is None else bool_mask
    check(out, ref, q, k, v, bool_mask)


def test_dispatch_keeps_other_inputs_off_the_kernel():
    q, k = torch.randn(1, 8, 1, 64), torch.randn(1, 2, kernels.CPU_MIN_KEYS, 64)
    assert kernels.supports(q, k, k)
    assert not kernels.supports(torch.randn(1, 8, 17, 64), k, k)  # a prefill block
    assert not kernels.supports(q, k[:, :, : kernels.CPU_MIN_KEYS - 1], k[:, :, : kernels.CPU_MIN_KEYS - 1])
    assert not kernels.supports(q.half(), k.half(), k.half())
    assert not kernels.supports(q.requires_grad_(), k, k)
    assert gqa.select_backend(q.detach(), k, k, return_weights=True) == "grouped"


def test_fully_masked_rows_give_zeros():
    q, k, v = torch.randn(1, 8, 2, 32), torch.randn(1, 2, 600, 32), torch.randn(1, 2, 600, 32)
    mask = torch.zeros(1, 1, 2, 600, dtype=torch.bool)
    mask[:, :, 1, :10] = True
    out = gqa.attention(q, k, v, mask=mask, backend="kernel")
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    torch.testing.assert_close(out[:, :, 1:].double(), gqa.reference_attention(q, k, v, mask=mask)[:, :, 1:])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda q, k, L: decode_attention(q, k, k, L.float()), "integer tensor"),
        (lambda q, k, L: decode_attention(q, k, k, L[:1]), r"1-D int tensor \[B=2\]"),
        (lambda q, k, L: decode_attention(q, k, k, torch.tensor([1, 500])), "every length must be >= Tq"),
        (lambda q, k, L: decode_attention(q, k, k, torch.tensor([2000, 500])), "exceeds the cache"),
        (lambda q, k, L: decode_attention(q[:, :7], k, k, L), "not divisible"),
        (lambda q, k, L: decode_attention(q.repeat(1, 1, 9, 1), k, k, torch.tensor([600, 600])), "1..16 query tokens"),
        (lambda q, k, L: decode_attention(q, k, k, L, window=0), "window must be an integer >= 1"),
        (lambda q, k, L: decode_attention(q, k, k.double(), L), "share one floating dtype"),
        (lambda q, k, L: paged_decode_attention(q, k, k, torch.tensor([[0], [5]]), L), "page ids outside"),
        (lambda q, k, L: paged_decode_attention(q, k, k, torch.zeros(2, 1).float(), L), "int32 page ids"),
    ],
)
def test_bad_input_one_line_errors(call, match):
    q, k = torch.randn(2, 8, 2, 32), torch.randn(2, 2, 1000, 32)
    lengths = torch.tensor([1000, 500], dtype=torch.int32)
    with pytest.raises((ValueError, TypeError), match=match) as info:
        call(q, k, lengths)
    assert "\n" not in str(info.value)
