"""Every bad input of the core API raises a one-line GQAUserError that names the fix."""

from __future__ import annotations

import pytest
import torch

import gqa
from gqa import GQAConfig, GroupedQueryAttention, KVCache
from gqa.errors import GQAUserError


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, f"error should be one line: {msg!r}"
    return msg


def qkv(b=2, hq=8, hkv=2, tq=3, tk=5, d=8, **over):
    return torch.randn(b, hq, tq, d), torch.randn(b, hkv, tk, d), torch.randn(b, hkv, tk, d)


CASES = {
    "heads-not-divisible": (lambda: gqa.attention(*qkv(hq=8, hkv=3)), GQAUserError, "divisors"),
    "q-rank": (lambda: gqa.attention(torch.randn(8, 3, 8), *qkv()[1:]), GQAUserError, "4 dims"),
    "k-rank": (lambda: gqa.attention(qkv()[0], torch.randn(2, 5, 8), qkv()[2]), GQAUserError, "4 dims"),
    "batch": (lambda: gqa.attention(torch.randn(3, 8, 3, 8), *qkv()[1:]), GQAUserError, "batch"),
    "head-dim": (lambda: gqa.attention(torch.randn(2, 8, 3, 16), *qkv()[1:]), GQAUserError, "head_dim"),
    "dtype": (lambda: gqa.attention(qkv()[0].double(), *qkv()[1:]), GQAUserError, "dtype"),
    "int-dtype": (lambda: gqa.attention(*(t.long() for t in qkv())), GQAUserError, "floating"),
    "device": (lambda: gqa.attention(qkv()[0].to("meta"), *qkv()[1:]), GQAUserError, "device"),
    "kv-length": (lambda: gqa.attention(qkv()[0], qkv()[1], torch.randn(2, 2, 6, 8)), GQAUserError, "lengths"),
    "kv-heads": (lambda: gqa.attention(qkv()[0], qkv()[1], torch.randn(2, 4, 5, 8)), GQAUserError, "share"),
    "backend": (lambda: gqa.attention(*qkv(), backend="flash9"), GQAUserError, "backend"),
    "window": (lambda: gqa.masks.sliding_window(0), GQAUserError, ">= 1"),
    "chunk": (lambda: gqa.masks.chunked(0), GQAUserError, ">= 1"),
    "mask-shape": (
        lambda: gqa.attention(*qkv(), mask=torch.ones(2, 8, 3, 9, dtype=torch.bool)),
        GQAUserError,
        "broadcast",
    ),
    "mask-dtype": (lambda: gqa.attention(*qkv(), mask=torch.ones(2, 8, 3, 5)), GQAUserError, "bool"),
    "layer-heads": (lambda: GroupedQueryAttention(64, 8, 3), GQAUserError, "divisible"),
    "config-heads": (lambda: GQAConfig(d_model=64, n_heads=8, n_kv_heads=3, n_layers=2), GQAUserError, "divide"),
    "config-list-length": (
        lambda: GQAConfig(d_model=64, n_heads=8, n_kv_heads=[4, 2], n_layers=3),
        GQAUserError,
        "one entry per layer",
    ),
    "config-list-value": (
        lambda: GQAConfig(d_model=64, n_heads=8, n_kv_heads=[4, 3], n_layers=2),
        GQAUserError,
        "divide",
    ),
    "cache-overflow": (
        lambda: KVCache(1, 2, 4, 8).update(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)),
        GQAUserError,
        "beyond the cache",
    ),
    "cache-heads": (
        lambda: KVCache(1, 2, 4, 8).update(torch.randn(1, 8, 1, 8), torch.randn(1, 8, 1, 8)),
        GQAUserError,
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
    with pytest.raises(GQAUserError, match="beyond the cache"):
        layer(torch.randn(1, 2, 32), cache=cache)
