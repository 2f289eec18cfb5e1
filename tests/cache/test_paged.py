"""Paged KV cache: allocator, page writes, paged attention vs the fp64 reference, the model's forward over
a paged batch vs the static cache. The scheduler's tests are in tests/generation/test_scheduler.py."""

from __future__ import annotations

import pytest
import torch

from gqa import masks
from gqa.cache import OutOfPages, PageAllocator, PagedKV, PagedKVCache
from gqa.errors import GQAUserError
from gqa.kernels import gather_pages
from gqa.layer import paged_attention
from helpers import assert_matches_reference, tiny_gqa


def test_allocator_is_all_or_nothing_and_reuses_freed_pages():
    alloc = PageAllocator(5)
    a = alloc.allocate(3)
    assert a == [0, 1, 2] and alloc.num_free == 2
    with pytest.raises(OutOfPages):
        alloc.allocate(3)
    assert alloc.num_free == 2  # the failed request took nothing
    alloc.free(a)
    assert sorted(alloc.allocate(5)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(0)


def test_mixed_lengths_waste_less_than_one_page_each_and_writes_land_in_place():
    cache = PagedKVCache([2, 1], head_dim=4, num_pages=16, page_size=4)
    lengths = {"a": 1, "b": 4, "c": 9, "d": 14}
    written = {}
    for s, n in lengths.items():
        cache.add_sequence(s)
        cache.reserve(s, n)
        k = torch.randn(1, 2, n, 4)  # (1, Hkv, T, D)
        cache.write(0, [s], k, -k)
        cache.write(1, [s], k[:, :1], k[:, :1])
        cache.advance([s], n)
        written[s] = k
    assert cache.wasted_slots() == sum(-n % 4 for n in lengths.values())
    for s, n in lengths.items():
        assert len(cache.pages_of(s)) * 4 - n < 4
        table = cache.block_table([s])
        k, v = gather_pages(cache.k_pages[0], table), gather_pages(cache.v_pages[0], table)
        torch.testing.assert_close(k[:, :, :n], written[s], rtol=0, atol=0)
        torch.testing.assert_close(v[:, :, :n], -written[s], rtol=0, atol=0)
    used = sum(len(cache.pages_of(s)) for s in lengths)
    assert cache.num_free_pages == 16 - used
    cache.release("c")
    assert cache.num_free_pages == 16 - used + 3
    with pytest.raises(ValueError, match="reserve"):
        cache.advance(["a"], 10)


#: An always-true custom part: the mask means causal, but the decode kernel does not take it, so the
#: per-sequence path (gather the pages, gqa.attention) runs.
_CAUSAL_VIA_GATHER = masks.causal() & masks.custom(lambda q_pos, k_pos: k_pos >= 0)


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2), (8, 1), (9, 3)])
@pytest.mark.parametrize("tq", [1, 3, 20], ids=["decode", "verify", "prefill"])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("path", ["kernel", "gather"], ids=["kernel-mask", "custom-mask-gather"])
def test_paged_attention_matches_fp64_reference(hq, hkv, tq, window, path):
    page, d = 4, 16
    lengths = torch.tensor([tq + 2, tq + 13, tq + 6], dtype=torch.int32)
    b = len(lengths)
    n_pages = [(int(n) + page - 1) // page for n in lengths]
    # scatter each sequence over shuffled pages
    order = torch.randperm(sum(n_pages) + 3)
    k_pages = torch.randn(len(order), hkv, page, d)
    v_pages = torch.randn(len(order), hkv, page, d)
    table = torch.zeros(b, max(n_pages), dtype=torch.int32)
    at = 0
    for i, n in enumerate(n_pages):
        table[i, :n] = order[at : at + n].to(torch.int32)
        at += n
    q = torch.randn(b, hq, tq, d)
    want_mask = masks.sliding_window(window) if window else masks.causal()
    mask = want_mask if path == "kernel" else want_mask & _CAUSAL_VIA_GATHER
    out = paged_attention(q, PagedKV(k_pages, v_pages, table, lengths), mask=mask)
    # Reference per sequence on its own contiguous keys, bottom-right causal (and window).
    for i in range(b):
        n = int(lengths[i])
        k = k_pages[table[i].long()].permute(1, 0, 2, 3).reshape(1, hkv, -1, d)[:, :, :n]  # (1, Hkv, n, D)
        v = v_pages[table[i].long()].permute(1, 0, 2, 3).reshape(1, hkv, -1, d)[:, :, :n]
        assert_matches_reference(out[i : i + 1], q[i : i + 1], k.contiguous(), v.contiguous(), mask=want_mask)


def test_paged_attention_refuses_padding_masks():
    kv = PagedKV(
        torch.randn(2, 1, 4, 8),
        torch.randn(2, 1, 4, 8),
        torch.tensor([[0, 1]], dtype=torch.int32),
        torch.tensor([6], dtype=torch.int32),
    )
    q = torch.randn(1, 2, 1, 8)
    for bad in (masks.causal() & masks.key_padding(torch.tensor([6])), torch.ones(1, 1, 1, 6, dtype=torch.bool)):
        with pytest.raises(GQAUserError, match="padding"):
            paged_attention(q, kv, mask=bad)


@pytest.mark.parametrize("n_kv", [8, 2, 1, [1, 4]], ids=["MHA", "GQA", "MQA", "per-layer"])
def test_paged_batch_forward_equals_static_cache_forward(n_kv):
    model = tiny_gqa(n_kv, sliding_window=None)
    prompts = [torch.randint(0, 97, (1, n)) for n in (11, 3, 6)]
    cache = PagedKVCache.for_model(model, num_pages=32, page_size=4)
    statics = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            cache.add_sequence(i)
            cache.reserve(i, p.shape[1])
            got = model(p, cache=cache.batch([i]))
            static = model.make_cache(1, 40)
            torch.testing.assert_close(got, model(p, cache=static), rtol=1e-4, atol=1e-5)
            statics.append(static)
        assert [cache.length(i) for i in range(3)] == [11, 3, 6]
        # three decode steps for the whole ragged batch in one [3, 1] forward
        for _ in range(3):
            nxt = torch.randint(0, 97, (3, 1))
            for i in range(3):
                cache.reserve(i, 1)
            got = model(nxt, cache=cache.batch([0, 1, 2]))
            want = torch.cat([model(nxt[i : i + 1], cache=statics[i]) for i in range(3)])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_paged_forward_with_sliding_window_equals_static():
    model = tiny_gqa(2, sliding_window=4)
    p = torch.randint(0, 97, (1, 9))
    cache = PagedKVCache.for_model(model, num_pages=8, page_size=4)
    cache.add_sequence(0)
    cache.reserve(0, 10)
    static = model.make_cache(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(p, cache=cache.batch([0])), model(p, cache=static), rtol=1e-4, atol=1e-5)
        nxt = torch.tensor([[7]])
        torch.testing.assert_close(model(nxt, cache=cache.batch([0])), model(nxt, cache=static), rtol=1e-4, atol=1e-5)


def test_paged_batch_is_single_use_and_needs_reserved_pages():
    model = tiny_gqa(2)
    cache = PagedKVCache.for_model(model, num_pages=4, page_size=4)
    cache.add_sequence("a")
    cache.reserve("a", 3)
    batch = cache.batch(["a"])
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=batch)
        with pytest.raises(GQAUserError, match="already wrote"):
            model(torch.tensor([[4]]), cache=batch)
        with pytest.raises(GQAUserError, match="reserve"):
            model(torch.tensor([[4, 5]]), cache=cache.batch(["a"]))  # 5 tokens in 1 reserved page
        cache.reserve("a", 1)
        with pytest.raises(GQAUserError, match="Hkv=2"):  # a refused write leaves the length alone
            cache.batch(["a"])[0].update(torch.randn(1, 5, 1, 8), torch.randn(1, 5, 1, 8))
    assert cache.length("a") == 3
