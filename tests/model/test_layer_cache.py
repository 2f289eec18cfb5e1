"""GroupedQueryAttention and KVCache: reference math, cached == uncached, cache sizing."""

from __future__ import annotations

import pytest
import torch

from gqa import GroupedQueryAttention, KVCache, masks
from gqa.reference import reference_attention
from gqa.rope import apply_rope, rope_cos_sin
from helpers import HEAD_CONFIGS, HEAD_IDS


def _layer(hq, hkv, **kw):
    d = 8
    return GroupedQueryAttention(hq * d, hq, hkv, d, **kw).eval()


def _manual_forward(layer, x, mask):
    """The layer's math written out with the fp64 reference (which repeats K/V)."""
    b, t, _ = x.shape
    d = layer.head_dim
    q = layer.q_proj(x).view(b, t, layer.n_heads, d).transpose(1, 2)
    k = layer.k_proj(x).view(b, t, layer.n_kv_heads, d).transpose(1, 2)
    v = layer.v_proj(x).view(b, t, layer.n_kv_heads, d).transpose(1, 2)
    if layer.q_norm is not None:
        q, k = layer.q_norm(q), layer.k_norm(k)
    cos, sin = rope_cos_sin(torch.arange(t), layer.inv_freq)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = reference_attention(q, k, v, mask=mask).float()
    return layer.o_proj(out.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("heads", HEAD_CONFIGS, ids=HEAD_IDS)
@pytest.mark.parametrize(
    "options", [{}, {"qkv_bias": True, "o_bias": True}, {"qk_norm": True}], ids=["plain", "bias", "qknorm"]
)
def test_layer_matches_reference(heads, options):
    layer = _layer(*heads, **options)
    if options.get("qkv_bias"):
        for p in (layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias, layer.o_proj.bias):
            torch.nn.init.normal_(p)
    x = torch.randn(2, 7, layer.d_model)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _manual_forward(layer, x, masks.causal()), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("heads", HEAD_CONFIGS, ids=HEAD_IDS)
@pytest.mark.parametrize(
    "mask",
    [masks.causal(), masks.sliding_window(3), masks.chunked(4) & masks.causal()],
    ids=["causal", "window", "chunked"],
)
def test_cached_decoding_equals_uncached(heads, mask):
    layer = _layer(*heads)
    x = torch.randn(2, 11, layer.d_model)
    with torch.no_grad():
        full = layer(x, mask=mask)
        cache = KVCache(2, layer.n_kv_heads, 16, layer.head_dim)
        steps = [layer(x[:, :4], cache=cache, mask=mask)]  # prefill 4, then one token at a time
        steps += [layer(x[:, t : t + 1], cache=cache, mask=mask) for t in range(4, 11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 11


def test_cache_holds_kv_heads_not_query_heads():
    cache = KVCache(3, 2, 100, 64, dtype=torch.bfloat16)
    assert cache.k.shape == (3, 2, 100, 64) and cache.v.shape == (3, 2, 100, 64)
    assert cache.nbytes == 2 * 3 * 2 * 100 * 64 * 2
    assert cache.bytes_per_token() == 2 * 2 * 64 * 2


def test_cache_update_is_in_place_and_returns_views():
    cache = KVCache(1, 2, 8, 4)
    ptr = cache.k.data_ptr()
    k, v = cache.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    assert k.shape == (1, 2, 3, 4) and k.data_ptr() == ptr
    k, _ = cache.update(torch.full((1, 2, 1, 4), 2.0), torch.full((1, 2, 1, 4), 2.0))
    assert k.shape[2] == 4 and (cache.k[:, :, 3] == 2).all() and cache.k.data_ptr() == ptr
    cache.reset()
    assert cache.length == 0


def test_explicit_positions_shift_rope_only():
    # Left padding: RoPE positions per sequence, mask over cache slots.
    layer = _layer(8, 2)
    x = torch.randn(1, 5, layer.d_model)
    with torch.no_grad():
        plain = layer(x)
        shifted = layer(
            torch.cat([torch.zeros(1, 2, layer.d_model), x], 1),
            positions=torch.tensor([[0, 0, 0, 1, 2, 3, 4]]),
            mask=masks.causal() & masks.key_padding(valid=torch.tensor([[False, False] + [True] * 5])),
        )
    torch.testing.assert_close(shifted[:, 2:], plain, atol=1e-5, rtol=1e-5)
