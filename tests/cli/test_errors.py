"""Every bad input of the core API raises a one-line error that names the fix."""

from __future__ import annotations

import pytest
import torch

import gqa
from gqa import GQAConfig, GroupedQueryAttention, KVCache


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, f"error should be one line: {msg!r}"
    return msg


def qkv(b=2, hq=8, hkv=2, tq=3, tk=5, d=8, **over):
    return torch.randn(b, hq, tq, d), torch.randn(b, hkv, tk, d), torch.randn(b, hkv, tk, d)


CASES = {
    "heads-not-divisible": (lambda: gqa.attention(*qkv(hq=8, hkv=3)), ValueError, "divisible"),
    "q-rank": (lambda: gqa.attention(torch.randn(8, 3, 8), *qkv()[1:]), ValueError, "4 dims"),
    "k-rank": (lambda: gqa.attention(qkv()[0], torch.randn(2, 5, 8), qkv()[2]), ValueError, "4 dims"),
    "batch": (lambda: gqa.attention(torch.randn(3, 8, 3, 8), *qkv()[1:]), ValueError, "batch"),
    "head-dim": (lambda: gqa.attention(torch.randn(2, 8, 3, 16), *qkv()[1:]), ValueError, "head_dim"),
    "dtype": (lambda: gqa.attention(qkv()[0].double(), *qkv()[1:]), TypeError, "dtype"),
    "int-dtype": (lambda: gqa.attention(*(t.long() for t in qkv())), TypeError, "floating"),
    "device": (lambda: gqa.attention(qkv()[0].to("meta"), *qkv()[1:]), ValueError, "device"),
    "kv-length": (lambda: gqa.attention(qkv()[0], qkv()[1], torch.randn(2, 2, 6, 8)), ValueError, "lengths"),
    "kv-heads": (lambda: gqa.attention(qkv()[0], qkv()[1], torch.randn(2, 4, 5, 8)), ValueError, "share"),
    "backend": (lambda: gqa.attention(*qkv(), backend="flash9"), ValueError, "backend"),
    "window": (lambda: gqa.masks.sliding_window(0), ValueError, ">= 1"),
    "chunk": (lambda: gqa.masks.chunked(0), ValueError, ">= 1"),
    "mask-shape": (
        lambda: gqa.attention(*qkv(), mask=torch.ones(2, 8, 3, 9, dtype=torch.bool)),
        ValueError,
        "broadcast",
    ),
    "mask-dtype": (lambda: gqa.attention(*qkv(), mask=torch.ones(2, 8, 3, 5)), TypeError, "bool"),
    "layer-heads": (lambda: GroupedQueryAttention(64, 8, 3), ValueError, "divisible"),
    "config-heads": (lambda: GQAConfig(d_model=64, n_heads=8, n_kv_heads=3, n_layers=2), ValueError, "divide"),
    "config-list-length": (
        lambda: GQAConfig(d_model=64, n_heads=8, n_kv_heads=[4, 2], n_layers=3),
        ValueError,
        "one entry per layer",
    ),
    "config-list-value": (
        lambda: GQAConfig(d_model=64, n_heads=8, n_kv_heads=[4, 3], n_layers=2),
        ValueError,
        "divide",
    ),
    "cache-overflow": (
        lambda: KVCache(1, 2, 4, 8).update(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)),
        ValueError,
        "beyond the cache",
    ),
    "cache-heads": (
        lambda: KVCache(1, 2, 4, 8).update(torch.randn(1, 8, 1, 8), torch.randn(1, 8, 1, 8)),
        ValueError,
        "n_kv_heads",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_clear_error(name):
    fn, exc, needle = CASES[name]
    with pytest.raises(exc) as info:
        fn()
    assert needle in _one_line(info)


def test_layer_positions_beyond_cache():
    layer = GroupedQueryAttention(32, 4, 2)
    cache = KVCache(1, 2, 4, 8)
    layer(torch.randn(1, 3, 32), cache=cache)
    with pytest.raises(ValueError, match="beyond the cache"):
        layer(torch.randn(1, 2, 32), cache=cache)
