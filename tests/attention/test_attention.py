"""gqa.attention against the fp64 reference: every head config, mask, Tq with cache offsets, dtype, backend."""

from __future__ import annotations

import pytest
import torch

import gqa
from gqa import masks
from gqa.errors import GQAUserError
from gqa.functional import SDPA_MIN_CPU_QUERIES, select_backend
from gqa.reference import reference_attention
from helpers import HEAD_CONFIGS, HEAD_IDS, assert_matches_reference

B, TK, D = 2, 13, 16


def _mask_cases(b: int, tk: int):
    lengths = torch.tensor([tk, tk - 5][:b])
    rand = torch.rand(b, 1, 1, tk) > 0.3
    return {
        "none": None,
        "causal": masks.causal(),
        "window3": masks.sliding_window(3),
        "chunked4-causal": masks.chunked(4) & masks.causal(),
        "chunked4": masks.chunked(4),
        "padding": masks.key_padding(lengths),
        "causal-window-padding": masks.causal() & masks.sliding_window(4) & masks.key_padding(lengths),
        "bool-tensor": rand,
        "custom-fn": masks.custom(lambda qp, kp: (qp - kp) % 2 == 0),
    }


MASK_NAMES = list(_mask_cases(B, TK))


def _qkv(hq, hkv, tq, tk=TK, d=D, dtype=torch.float32, b=B):
    q = torch.randn(b, hq, tq, d, dtype=dtype)
    k = torch.randn(b, hkv, tk, d, dtype=dtype)
    v = torch.randn(b, hkv, tk, d, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tq", [1, 5, TK], ids=["decode", "cached-prefill", "prefill"])
@pytest.mark.parametrize("mask_name", MASK_NAMES)
@pytest.mark.parametrize("heads", HEAD_CONFIGS, ids=HEAD_IDS)
def test_auto_backend_matches_reference(heads, mask_name, tq, dtype):
    hq, hkv = heads
    q, k, v = _qkv(hq, hkv, tq, dtype=dtype)
    mask = _mask_cases(B, TK)[mask_name]
    assert_matches_reference(gqa.attention(q, k, v, mask=mask), q, k, v, mask)


@pytest.mark.parametrize("backend", ["grouped", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask_name", MASK_NAMES)
@pytest.mark.parametrize("heads", HEAD_CONFIGS, ids=HEAD_IDS)
def test_each_backend_matches_reference(heads, mask_name, dtype, backend):
    hq, hkv = heads
    q, k, v = _qkv(hq, hkv, 4, dtype=dtype)
    mask = _mask_cases(B, TK)[mask_name]
    assert_matches_reference(gqa.attention(q, k, v, mask=mask, backend=backend), q, k, v, mask)


def test_head_mapping_is_h_div_g_not_tiled():
    # KV head j holds the constant value j: query head h must read KV head h // g.
    hq, hkv, d = 8, 2, 4
    q = torch.zeros(1, hq, 1, d)
    k = torch.zeros(1, hkv, 3, d)
    v = torch.arange(hkv, dtype=torch.float32).view(1, hkv, 1, 1).expand(1, hkv, 3, d).contiguous()
    for backend in ("grouped", "sdpa"):
        out = gqa.attention(q, k, v, backend=backend)
        got = out[0, :, 0, 0].tolist()
        assert got == [h // (hq // hkv) for h in range(hq)], backend


def test_scale_argument():
    q, k, v = _qkv(8, 2, 3)
    for backend in ("grouped", "sdpa"):
        out = gqa.attention(q, k, v, scale=0.37, mask=masks.causal(), backend=backend)
        assert_matches_reference(out, q, k, v, masks.causal(), scale=0.37)


@pytest.mark.parametrize("heads", HEAD_CONFIGS, ids=HEAD_IDS)
def test_return_weights_are_reference_probabilities(heads):
    hq, hkv = heads
    q, k, v = _qkv(hq, hkv, 4)
    mask = masks.causal() & masks.sliding_window(5)
    out, w = gqa.attention(q, k, v, mask=mask, return_weights=True)
    ref_out, ref_w = reference_attention(q, k, v, mask=mask, return_weights=True)
    assert w.shape == (B, hq, 4, TK)
    torch.testing.assert_close(w.double(), ref_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, hq, 4))
    assert_matches_reference(out, q, k, v, mask)


@pytest.mark.parametrize("backend", ["auto", "grouped", "sdpa"])
def test_fully_masked_rows_give_zeros(backend):
    q, k, v = _qkv(8, 2, 4)
    m = torch.ones(B, 1, 4, TK, dtype=torch.bool)
    m[0, 0, 2] = False  # one query row with no visible key
    m[1] = False  # a whole sequence masked out
    out = gqa.attention(q, k, v, mask=m, backend=backend)
    assert torch.isfinite(out).all()
    assert (out[0, :, 2] == 0).all() and (out[1] == 0).all()
    assert_matches_reference(out, q, k, v, m)
    if backend != "sdpa":
        _, w = gqa.attention(q, k, v, mask=m, return_weights=True)
        assert (w[1] == 0).all() and torch.isfinite(w).all()


def test_bottom_right_causal_differs_from_sdpa_top_left():
    # Tq < Tk: the last query must see every key (bottom-right), not only the first Tq keys.
    q, k, v = _qkv(8, 2, 3)
    out = gqa.attention(q, k, v, mask=masks.causal())
    full = gqa.attention(q[:, :, -1:], k, v)  # last query, unmasked = sees all keys
    torch.testing.assert_close(out[:, :, -1:], full)


def test_kv_never_repeated(monkeypatch):
    # The grouped and SDPA paths must not materialise Hq copies of K/V.
    def forbid(*a, **k):
        raise AssertionError("K/V were repeated")

    monkeypatch.setattr(torch, "repeat_interleave", forbid)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", forbid)
    monkeypatch.setattr(torch.Tensor, "repeat", forbid)
    q, k, v = _qkv(8, 2, 5)
    for backend in ("grouped", "sdpa", "auto"):
        for mask in (None, masks.causal(), masks.sliding_window(3)):
            gqa.attention(q, k, v, mask=mask, backend=backend)


def test_grouped_path_multiplies_the_stored_kv_heads(monkeypatch):
    """The grouped path's two matmuls take K and V as stored (Hkv heads, same memory: no copy, no
    repeat) and fold the g query heads of each group into the rows of q."""
    q, k, v = _qkv(8, 2, 5)
    seen = []
    real = torch.matmul

    def spy(a, b, *args, **kw):
        seen.append((tuple(a.shape), tuple(b.shape), b.data_ptr()))
        return real(a, b, *args, **kw)

    monkeypatch.setattr(torch, "matmul", spy)
    out = gqa.attention(q, k, v, mask=masks.causal(), backend="grouped")
    assert len(seen) == 2
    (qk_a, qk_b, qk_ptr), (pv_a, pv_b, pv_ptr) = seen
    assert qk_a == (B, 2, 4 * 5, D) and qk_b == (B, 2, D, TK) and qk_ptr == k.data_ptr()
    assert pv_a == (B, 2, 4 * 5, TK) and pv_b == (B, 2, TK, D) and pv_ptr == v.data_ptr()
    assert_matches_reference(out, q, k, v, masks.causal())


class TestBackendSelection:
    def test_return_weights_forces_grouped(self):
        q, k, v = _qkv(8, 2, 32, tk=32)
        assert select_backend(q, k, v, None, return_weights=True) == "grouped"

    def test_cpu_prefill_without_mask_uses_sdpa(self):
        q, k, v = _qkv(8, 2, SDPA_MIN_CPU_QUERIES, tk=SDPA_MIN_CPU_QUERIES)
        assert select_backend(q, k, v, None) == "sdpa"
        assert select_backend(q, k, v, masks.causal()) == "sdpa"  # Tq == Tk: top-left == bottom-right

    def test_short_cpu_decode_uses_grouped(self):
        # Below the kernels' thresholds the grouped matmul is as fast (see gqa.kernels.FUSED_MIN_KEYS).
        from gqa import kernels

        q, k, v = _qkv(8, 2, 1, tk=kernels.FUSED_MIN_KEYS - 1)
        assert select_backend(q, k, v, masks.causal()) == "grouped"
        q, k, v = _qkv(8, 2, 1, tk=kernels.CPU_MIN_KEYS)  # every CPU path (fused or torch) takes this one
        assert select_backend(q, k, v, masks.causal()) == "kernel"
        assert select_backend(q.double(), k.double(), v.double(), masks.causal()) == "grouped"

    def test_masks_never_go_to_sdpa(self):
        # SDPA with an explicit mask falls back to a math path that copies K/V.
        q, k, v = _qkv(8, 2, 32, tk=32)
        for mask in (masks.sliding_window(4), masks.key_padding(torch.tensor([32, 20])), torch.ones(1, 1, 32, 32) > 0):
            assert select_backend(q, k, v, mask) != "sdpa"
        q, k, v = _qkv(8, 2, 16, tk=32)  # causal with Tq < Tk: SDPA's is_causal would be top-left
        assert select_backend(q, k, v, masks.causal()) != "sdpa"

    def test_head_dim_over_256_never_sdpa(self):
        q, k, v = _qkv(4, 2, 32, tk=32, d=288, b=1)
        assert select_backend(q, k, v, None) == "grouped"
        assert_matches_reference(gqa.attention(q, k, v), q, k, v)


def test_long_query_blocks_are_sliced(monkeypatch):
    # Force tiny score budgets so the grouped path slices the queries; results must not change.
    import gqa.functional as fn

    q, k, v = _qkv(8, 2, 11)
    mask = masks.causal() & masks.key_padding(torch.tensor([13, 9]))
    whole = gqa.attention(q, k, v, mask=mask, backend="grouped")
    monkeypatch.setattr(fn, "GROUPED_SCORES_BYTES", 4 * B * 8 * TK * 3)  # 3 query rows per block
    sliced = gqa.attention(q, k, v, mask=mask, backend="grouped")
    torch.testing.assert_close(sliced, whole, atol=0, rtol=0)
    assert_matches_reference(sliced, q, k, v, mask)


@pytest.mark.parametrize("backend", ["auto", "grouped", "sdpa", "kernel"])
@pytest.mark.parametrize("dv", [3, 24])
def test_values_may_have_their_own_head_dim(backend, dv):
    """v [B, Hkv, Tk, Dv] with Dv != D (DeepSeek-V2's heads; the absorbed latent attention): out [B, Hq, Tq, Dv]
    from every backend, against the fp64 reference; q and k must still agree."""
    q, k, _ = _qkv(8, 2, 3)
    v = torch.randn(*k.shape[:3], dv)
    mask = masks.causal() & masks.key_padding(torch.tensor([13, 9]))
    out = gqa.attention(q, k, v, mask=mask, backend=backend)
    assert out.shape == (*q.shape[:3], dv)
    assert_matches_reference(out, q, k, v, mask)
    with pytest.raises(GQAUserError, match="queries and keys need the same head_dim"):
        gqa.attention(q, k[..., :-1], v)


@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan"), float("inf"), "0.1", True])
def test_bad_scale_is_a_user_error(scale):
    q, k, v = _qkv(8, 2, 3)
    for backend in ("auto", "grouped", "sdpa"):
        with pytest.raises(GQAUserError, match="scale"):
            gqa.attention(q, k, v, scale=scale, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "grouped", "sdpa"])
def test_empty_batch_or_queries_give_an_empty_result(backend):
    for b, tq in ((0, 3), (2, 0)):
        q, k, v = _qkv(8, 2, tq, b=b)
        out = gqa.attention(q, k, v, mask=masks.causal(), backend=backend)
        assert out.shape == (b, 8, tq, D) and out.dtype == q.dtype
    out, w = gqa.attention(*_qkv(8, 2, 3, b=0), return_weights=True)
    assert out.shape == (0, 8, 3, D) and w.shape == (0, 8, 3, TK)


def test_zero_head_dim_is_a_user_error():
    q, k, v = _qkv(8, 2, 3, d=0)
    with pytest.raises(GQAUserError, match="head_dim is 0"):
        gqa.attention(q, k, v)
    with pytest.raises(GQAUserError, match="head_dim is 0"):
        reference_attention(q, k, v)


@pytest.mark.parametrize(
    "mask",
    [None, masks.causal(), masks.sliding_window(4), masks.key_padding(torch.zeros(B, dtype=torch.long)),
     torch.ones(B, 8, 3, 0, dtype=torch.bool)],
    ids=["none", "causal", "window", "padding", "bool"],
)  # fmt: skip
@pytest.mark.parametrize("backend", ["auto", "grouped", "sdpa"])
def test_no_keys_gives_zero_rows(backend, mask):
    """Zero keys with any mask: zeros, as the docstring promises (was an IndexError with a mask)."""
    q, k, v = _qkv(8, 2, 3, tk=0)
    out = gqa.attention(q, k, v, mask=mask, backend=backend)
    assert out.shape == (B, 8, 3, D) and torch.equal(out, torch.zeros_like(out))
    if backend == "grouped":
        out, w = gqa.attention(q, k, v, mask=mask, backend=backend, return_weights=True)
        assert w.shape == (B, 8, 3, 0) and torch.equal(out, torch.zeros_like(out))
