"""GroupedQueryAttention, KVCache and the model's one forward: reference math, cached == uncached (static
and paged caches, ragged batches, sliding window, per-layer KV heads), RoPE once per call, cache sizing."""

from __future__ import annotations

import pytest
import torch

from gqa import GQAConfig, GQAForCausalLM, GroupedQueryAttention, KVCache, masks
from gqa.cache import PagedKVCache
from gqa.errors import GQAUserError
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


# --- the model's one forward: cached == uncached over both caches, RoPE once, last-position logits ----


def _tiny_model(n_kv=2, window=None, seed=0) -> GQAForCausalLM:
    torch.manual_seed(seed)
    cfg = GQAConfig(
        vocab_size=61,
        d_model=64,
        n_layers=3,
        n_heads=8,
        n_kv_heads=n_kv,
        ffn_dim=96,
        max_seq_len=64,
        sliding_window=window,
    )
    model = GQAForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init: attention that depends on the keys
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15)
    return model


MODEL_CASES = [(2, None), ([1, 4, 2], None), (2, 3), ([4, 1, 8], 4)]
MODEL_IDS = ["GQA", "per-layer", "GQA-window", "per-layer-window"]


@pytest.mark.parametrize("n_kv,window", MODEL_CASES, ids=MODEL_IDS)
def test_static_cache_prefill_and_decode_equal_the_full_forward(n_kv, window):
    model = _tiny_model(n_kv, window)
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        full = model(ids)  # (2, 12, vocab), no cache
        cache = model.make_cache(2, 16)
        steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 12 and [c.n_kv_heads for c in cache.layers] == model.config.kv_heads_per_layer


@pytest.mark.parametrize("n_kv,window", MODEL_CASES, ids=MODEL_IDS)
def test_left_padded_static_batch_equals_each_prompt_alone(n_kv, window):
    model = _tiny_model(n_kv, window)
    prompts = [torch.randint(0, 61, (n,)) for n in (9, 4, 6)]
    extra = torch.randint(0, 61, (3, 3))  # three decode tokens per sequence
    t = max(len(p) for p in prompts)
    ids = torch.zeros(3, t, dtype=torch.long)
    valid = torch.zeros(3, t, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :], valid[i, t - len(p) :] = p, True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # (3, T): 0 at each prompt's first real token
    with torch.no_grad():
        cache = model.make_cache(3, t + 3)
        got = [model(ids, positions=positions, cache=cache, key_valid=valid, logits_to_keep=1)]
        for s in range(3):
            valid = torch.cat([valid, torch.ones(3, 1, dtype=torch.bool)], 1)
            pos = torch.tensor([[len(p) + s] for p in prompts])  # (3, 1)
            got.append(model(extra[:, s : s + 1], positions=pos, cache=cache, key_valid=valid))
        got = torch.cat(got, 1)  # (3, 4, vocab): last prompt position, then the three decode steps
        for i, p in enumerate(prompts):
            alone = model(torch.cat([p, extra[i]])[None])[0, len(p) - 1 :]  # (4, vocab)
            torch.testing.assert_close(got[i], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv,window", MODEL_CASES, ids=MODEL_IDS)
def test_paged_cache_ragged_batch_equals_the_full_forward(n_kv, window):
    """Prefill each prompt (two of them in one [2, T] call), then decode the ragged batch in [3, 1] steps."""
    model = _tiny_model(n_kv, window)
    lengths = (7, 7, 3)
    seqs = [torch.randint(0, 61, (n + 4,)) for n in lengths]  # prompt + four decode tokens
    cache = PagedKVCache.for_model(model, num_pages=16, page_size=4)
    with torch.no_grad():
        for i, n in enumerate(lengths):
            cache.add_sequence(i)
            cache.reserve(i, n)
        got = [[] for _ in seqs]
        two = model(torch.stack([seqs[0][:7], seqs[1][:7]]), cache=cache.batch([0, 1]), logits_to_keep=1)
        got[0].append(two[0])
        got[1].append(two[1])
        got[2].append(model(seqs[2][:3][None], cache=cache.batch([2]), logits_to_keep=1)[0])
        for s in range(4):
            for i in range(3):
                cache.reserve(i, 1)
            step = torch.stack([q[n + s] for q, n in zip(seqs, lengths, strict=True)])[:, None]  # (3, 1)
            out = model(step, cache=cache.batch([0, 1, 2]))  # (3, 1, vocab)
            for i in range(3):
                got[i].append(out[i])
        for i, (q, n) in enumerate(zip(seqs, lengths, strict=True)):
            want = model(q[None])[0, n - 1 :]  # (5, vocab)
            torch.testing.assert_close(torch.cat(got[i]), want, atol=1e-5, rtol=1e-5)
    assert [cache.length(i) for i in range(3)] == [n + 4 for n in lengths]


def test_rope_tables_are_computed_once_per_call(monkeypatch):
    import gqa.layer
    import gqa.model.decoder

    model = _tiny_model(2)
    calls = []
    real = gqa.model.decoder.rope_cos_sin
    monkeypatch.setattr(gqa.model.decoder, "rope_cos_sin", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(gqa.layer, "rope_cos_sin", lambda *a: pytest.fail("a layer recomputed the RoPE table"))
    ids = torch.randint(0, 61, (2, 6))
    with torch.no_grad():
        model(ids)
        cache = model.make_cache(2, 8)
        model(ids, cache=cache)
        model(ids[:, :1], cache=cache)
    assert len(calls) == 3  # one table per forward for the three layers


def test_logits_to_keep_equals_slicing_the_full_logits():
    model = _tiny_model(2)
    ids = torch.randint(0, 61, (2, 6))
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(model(ids, logits_to_keep=1), full[:, -1:], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(ids, logits_to_keep=3), full[:, -3:], atol=1e-6, rtol=1e-6)
    with pytest.raises(GQAUserError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)
    with pytest.raises(GQAUserError, match="key_valid or mask"):
        model(ids, key_valid=torch.ones(2, 6, dtype=torch.bool), mask=masks.causal())


def test_decode_slices_a_sliding_window_instead_of_masking(monkeypatch):
    """One query under a window reads only the last `window` keys, unmasked (and gets the masked result)."""
    import gqa.layer

    seen = []
    real = gqa.layer.attention
    monkeypatch.setattr(
        gqa.layer, "attention", lambda q, k, v, **kw: seen.append((k.shape[2], kw["mask"])) or real(q, k, v, **kw)
    )
    q, k, v = torch.randn(1, 8, 1, 8), torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8)
    out = gqa.layer.attend(q, (k, v), masks.sliding_window(4))
    assert seen == [(4, None)]
    torch.testing.assert_close(
        out, reference_attention(q, k, v, mask=masks.sliding_window(4)).float(), atol=1e-5, rtol=1e-5
    )
