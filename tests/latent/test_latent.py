"""The latent (MLA-style) layer, its cache and its conversion: absorbed = expanded = an independent float64
reference; cached decoding = uncached; a full-rank conversion is exact; a low-rank one keeps what it says."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gqa import masks
from gqa.convert.calibrated.latent import latent_from_attention, latent_model, max_latent_rank, rope_pair_scores
from gqa.convert.calibrated.stats import collect_statistics
from gqa.errors import GQAUserError
from gqa.latent import LatentAttention
from gqa.model import GQAConfig, GQAForCausalLM
from gqa.reference import reference_attention
from helpers import tiny_gqa, torch_baseline

SHAPES = [(8, 2, 16, 12, 6), (9, 3, 8, 20, 4), (4, 4, 8, 5, 0), (6, 1, 8, 9, 8)]  # Hq, Hkv, D, R, rope dims
SHAPE_IDS = [f"Hq{a}-Hkv{b}-D{c}-R{d}-r{e}" for a, b, c, d, e in SHAPES]


def _layer(hq, hkv, d, rank, rope, *, bias=False, seed=0, qk_norm=False) -> LatentAttention:
    torch.manual_seed(seed)
    layer = LatentAttention(24, hq, hkv, d, rank, rope, rope_theta=50.0, qkv_bias=bias, o_bias=bias, qk_norm=qk_norm)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.4)
        g = torch.Generator().manual_seed(seed)  # each group its own frequency pairs
        layer.rope_pairs.copy_(
            torch.stack([torch.randperm(d // 2, generator=g)[: rope // 2].sort().values for _ in range(hkv)])
        )
    return layer.eval()


def _rotate(x: torch.Tensor, positions: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """x [..., T, r] rotated pair by pair (dims j and j + r/2 at angle pos * freq[j]); float64, independent of gqa.rope."""
    half = x.shape[-1] // 2
    ang = positions.double()[:, None] * freq.double()[None, :]  # (T, r/2)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], dim=-1)


def _reference(layer: LatentAttention, x: torch.Tensor, positions: torch.Tensor, mask):
    """The layer in float64 the long way: every head's K and V rebuilt (with QK-norm: each head's query and
    whole key normed, then scaled per dim), RoPE pair by pair, fp64 attention; also returns the fp64 q, k, v
    so a torch baseline can be run at x's dtype."""
    hq, hkv, d, r = layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.rope_dim
    lin = {
        n: (m.weight.double(), None if m.bias is None else m.bias.double())
        for n, m in layer.named_children()
        if isinstance(m, torch.nn.Linear)
    }

    def apply(name, inp):
        w, b = lin[name]
        return inp @ w.T + (0 if b is None else b)

    x64 = x.double()
    b, t, _ = x.shape
    q = apply("q_proj", x64).view(b, t, hq, d).transpose(1, 2)
    c = apply("kv_down", x64)
    kr = apply("k_rope_proj", x64).view(b, t, hkv, r).transpose(1, 2)
    k_nope = apply("k_up", c).view(b, t, hq, d - r).transpose(1, 2)
    v = apply("v_up", c).view(b, t, hq, d).transpose(1, 2)
    base = 1.0 / (layer.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    g = hq // hkv
    if layer.qk_norm:
        eps = layer.norm_eps
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + eps) * layer.q_norm_weight.double()[None, :, None]
        k_whole = torch.cat([k_nope, kr.repeat_interleave(g, dim=1)], -1)  # (B, Hq, T, D) before the norm
        k_whole = k_whole * torch.rsqrt(k_whole.pow(2).mean(-1, keepdim=True) + eps)
        k_whole = k_whole * layer.k_norm_weight.double().repeat_interleave(g, dim=0)[None, :, None]
        k_nope, kr_heads = k_whole[..., : d - r], k_whole[..., d - r :]
    else:
        kr_heads = kr.repeat_interleave(g, dim=1)
    q_rot = torch.stack([_rotate(q[:, h, :, d - r :], positions, base[layer.rope_pairs[h // g]]) for h in range(hq)], 1)
    k_rot = torch.stack([_rotate(kr_heads[:, h], positions, base[layer.rope_pairs[h // g]]) for h in range(hq)], 1)
    qf = torch.cat([q[..., : d - r], q_rot], -1)
    kf = torch.cat([k_nope, k_rot], -1)
    heads = reference_attention(qf, kf, v, mask=mask, scale=layer.scale)  # (B, Hq, T, D)
    out = apply("o_proj", heads.transpose(1, 2).reshape(b, t, hq * d))
    return out, (qf, kf, v)


def _baseline_error(layer, ref, qkv, mask, dtype):
    """PyTorch's own error at ``dtype``: its attention over the fp64 q/k/v rounded to dtype, then o_proj."""
    q, k, v = (a.to(dtype) for a in qkv)
    heads = torch_baseline(q, k, v, mask, layer.scale)
    b, hq, t, d = heads.shape
    out = heads.transpose(1, 2).reshape(b, t, hq * d) @ layer.o_proj.weight.to(dtype).T
    if layer.o_proj.bias is not None:
        out = out + layer.o_proj.bias.to(dtype)
    return (out.double() - ref).abs().max().item()


MASKS = {
    "causal": lambda t: masks.causal(),
    "window": lambda t: masks.sliding_window(3),
    "padding": lambda t: (
        masks.causal() & masks.key_padding(valid=torch.tensor([[False, False] + [True] * (t - 2), [True] * t]))
    ),
}


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("form", ["absorbed", "expanded"])
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk-norm"])
def test_forms_match_float64_reference(shape, form, mask_name, qk_norm):
    layer = _layer(*shape, bias=shape[1] == 3, qk_norm=qk_norm)
    t = 7
    x = torch.randn(2, t, 24)
    positions = torch.arange(3, 3 + t)
    mask = MASKS[mask_name](t)
    ref, qkv = _reference(layer, x, positions, mask)
    out = layer(x, positions, mask=mask, form=form)
    err = (out.double() - ref).abs().max().item()
    tol = 8 * _baseline_error(layer, ref, qkv, mask, torch.float32) + 1e-5 * ref.abs().max().item()
    assert err <= tol, f"{form}: max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("form", ["absorbed", "expanded"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk-norm"])
def test_bfloat16_within_torch_error(form, qk_norm):
    layer = _layer(8, 2, 16, 12, 6, qk_norm=qk_norm)
    x = torch.randn(2, 9, 24)
    positions = torch.arange(9)
    ref, qkv = _reference(layer, x, positions, masks.causal())
    out = layer.to(torch.bfloat16)(x.bfloat16(), positions, form=form)
    assert out.dtype == torch.bfloat16
    err = (out.double() - ref).abs().max().item()
    base = _baseline_error(layer, ref, qkv, masks.causal(), torch.bfloat16)
    assert err <= 6 * base, f"bf16 {form}: {err:.3g} vs torch's {base:.3g}"


def test_latent_cache_holds_only_the_latent_and_rotated_keys():
    cfg = GQAConfig(
        vocab_size=50, d_model=32, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=48, latent_rank=10, latent_rope_dim=4
    )
    model = GQAForCausalLM(cfg)
    cache = model.make_cache(3, 20)
    assert cache.bytes_per_token() == 2 * (10 + 2 * 4) * 4  # two layers, fp32
    assert cfg.kv_bytes_per_token(torch.float32) == cache.bytes_per_token()
    assert cfg.kv_bytes(20, torch.float32) == 20 * cache.bytes_per_token()
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


def _tiny_latent(seed=0, **over) -> GQAForCausalLM:
    torch.manual_seed(seed)
    cfg = GQAConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
                    latent_rank=over.pop("rank", 24), latent_rope_dim=4, **over)  # fmt: skip
    model = GQAForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15)
    return model


@pytest.mark.parametrize("latent_norm", [False, True])
def test_cached_decoding_equals_uncached(latent_norm):
    model = _tiny_latent(latent_norm=latent_norm)
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids)
    cache = model.make_cache(2, 16)
    parts = [model(ids[:, :5], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-4)
    greedy = model.generate_greedy(ids[:, :6], 5)
    for step in range(5):  # each generated token is the argmax of the uncached forward over what came before
        logits = model(greedy[:, : 6 + step])[:, -1]
        assert torch.equal(logits.argmax(-1), greedy[:, 6 + step])


def test_a_kv_head_cache_is_refused_in_one_line():
    model = _tiny_latent()
    from gqa.cache import KVCache

    with pytest.raises(GQAUserError, match="LatentKVCache"):
        model.layers[0].attn(torch.randn(1, 2, 64), cache=KVCache(1, 2, 8, 8))


@pytest.mark.parametrize("rank", [24, [24, 12]], ids=["uniform", "per-layer"])
def test_paged_serving_generates_what_the_static_cache_does(rank):
    """The continuous-batching scheduler over a paged pool of latent rows (one row per token, key = value):
    prompts of different lengths arriving at once give each prompt's static-cache greedy tokens."""
    from gqa.cache.paged import PagedKVCache
    from gqa.generation import ContinuousBatcher, generate

    model = _tiny_latent(rank=rank)
    pool = PagedKVCache.for_model(model, num_pages=24, page_size=4)
    widths = model.config.kv_values_per_token()
    assert [k.shape[-1] for k in pool.k_pages] == widths and all(
        v is k for k, v in zip(pool.k_pages, pool.v_pages, strict=True)
    )
    assert pool.nbytes == 24 * 4 * sum(widths) * 4  # pages x slots x values x fp32: the rows once
    prompts = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 3)]
    batcher = ContinuousBatcher(model, cache=pool, eos_token_id=None)
    ids = [batcher.submit(p, 6) for p in prompts]
    done = batcher.run()
    for seq, prompt in zip(ids, prompts, strict=True):
        want = generate(model, [prompt], max_new_tokens=6, eos_token_id=None).tokens[0]
        assert done[seq] == list(want)


def test_config_refusals():
    base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=48)
    for over, needle in [
        (dict(latent_rank=8), "latent_rope_dim"),
        (dict(latent_rank=8, latent_rope_dim=3), "even"),
        (dict(latent_rank=8, latent_rope_dim=6), "head_dim=4"),
        (dict(latent_rank=[8], latent_rope_dim=2), "one entry per layer"),
        (dict(latent_rope_dim=2), "latent_rank is not"),
    ]:
        with pytest.raises(GQAUserError, match=needle):
            GQAConfig(**base, **over)


def _calibrated(model, n=6, t=24, attention_sequences=0):
    ids = torch.randint(0, 97, (n, t))
    return ids, collect_statistics(model, ids, progress=False, attention_sequences=attention_sequences)


GEMMA_LIKE = dict(qk_norm=True, norm_scale_fp32=True, sliding_window=5, layer_types=["sliding", "global"], rope_local_theta=500.0)
SOURCES = {"llama": {}, "qk-norm": dict(qk_norm=True), "gemma-like": GEMMA_LIKE}


def _source(kind: str) -> GQAForCausalLM:
    """A tiny float64 source model; QK-norm scales drawn away from 1 so a misplaced one shows."""
    model = tiny_gqa(n_kv=2, **SOURCES[kind]).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("kind", list(SOURCES))
def test_full_rank_conversion_is_exact(kind):
    model = _source(kind)
    ids, stats = _calibrated(model)
    d = model.config.resolved_head_dim
    top = max_latent_rank(d, 2, d)  # every rotated dim kept: the latent holds V only
    new, fits = latent_model(model, stats, [top] * 2, d)
    new = new.double()
    torch.testing.assert_close(new(ids), model(ids), atol=1e-9, rtol=1e-9)
    assert all(f.kv_energy_kept == pytest.approx(1.0) and f.rope_score_kept == pytest.approx(1.0) for f in fits)
    cache = new.make_cache(ids.shape[0], ids.shape[1], dtype=torch.float64)
    step = torch.cat([new(ids[:, :20], cache=cache), new(ids[:, 20:21], cache=cache)], 1)
    torch.testing.assert_close(step, model(ids[:, :21]), atol=1e-9, rtol=1e-9)


def test_qk_norm_latent_caches_a_key_scale_per_head_and_decodes_as_it_runs_uncached():
    """A Gemma-like source (QK-norm, sliding and global layers with their own RoPE bases) at low rank: each
    row holds R + Hkv*r + Hq values, cached decoding equals the uncached forward, paged pools are refused."""
    from gqa.cache.paged import PagedKVCache

    model = _source("gemma-like")
    ids, stats = _calibrated(model, attention_sequences=2)
    new, _ = latent_model(model, stats, [10, 14], 4)
    new = new.double()
    assert new.config.kv_values_per_token() == [10 + 2 * 4 + 8, 14 + 2 * 4 + 8]
    cache = new.make_cache(ids.shape[0], ids.shape[1], dtype=torch.float64)
    assert cache.bytes_per_token() == 8 * sum(new.config.kv_values_per_token())
    from gqa.cache import RingLatentKVCache

    assert isinstance(cache[0], RingLatentKVCache) and not isinstance(cache[1], RingLatentKVCache)
    assert cache[0].rows.shape[1] == 5 and cache[1].rows.shape[1] == ids.shape[1]  # the sliding layer holds its window
    assert sum(c.nbytes for c in cache.layers) == 6 * new.config.kv_bytes(ids.shape[1], torch.float64)
    parts = [new(ids[:, :9], cache=cache), new(ids[:, 9:12], cache=cache)]  # a chunk after the ring is full
    parts += [new(ids[:, i : i + 1], cache=cache) for i in range(12, 16)]
    torch.testing.assert_close(torch.cat(parts, 1), new(ids[:, :16]), atol=1e-10, rtol=1e-10)
    with pytest.raises(GQAUserError, match="paged caches do not take QK-norm"):
        PagedKVCache.for_model(new, num_pages=8, page_size=4)
    with pytest.raises(GQAUserError, match="QK-norm"):
        latent_model(model, stats, [10, 14], 4, shared_rope=True)


def test_full_rank_latent_with_partial_rope_reconstructs_k_and_v():
    """Rank at the maximum, one pair per group rotated: every head's unrotated K dims and V come back from
    the latent exactly, and the rotated K dims are the original's."""
    model = tiny_gqa(n_kv=2).double()
    ids, stats = _calibrated(model)
    attn, d = model.layers[0].attn, model.config.resolved_head_dim
    new, fit = latent_from_attention(attn, stats[0].input_moment, max_latent_rank(d, 2, 2), 2)
    x = torch.randn(3, 5, model.config.d_model, dtype=torch.float64)
    k = attn.k_proj(x).view(3, 5, 2, d)  # before RoPE
    v = attn.v_proj(x).view(3, 5, 2, d)
    c = new.kv_down(x)
    k_up, v_up = new.k_up(c).view(3, 5, 8, d - 2), new.v_up(c).view(3, 5, 8, d)
    for h in range(8):
        pair = fit.rope_pairs[h // 4][0]
        nope = [i for i in range(d) if i not in (pair, pair + d // 2)]
        torch.testing.assert_close(k_up[:, :, h], k[:, :, h // 4, nope], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(v_up[:, :, h], v[:, :, h // 4], atol=1e-10, rtol=1e-10)
    kr = new.k_rope_proj(x).view(3, 5, 2, 2)
    for j in range(2):
        pair = fit.rope_pairs[j][0]
        torch.testing.assert_close(kr[:, :, j], k[:, :, j, [pair, pair + d // 2]])


def test_low_rank_keeps_the_top_pairs_and_energy():
    model = tiny_gqa(n_kv=2)
    _, stats = _calibrated(model)
    attn = model.layers[0].attn
    scores = rope_pair_scores(attn, stats[0].input_moment)
    new, fit = latent_from_attention(attn, stats[0].input_moment, 6, 4)
    for j in range(2):  # each group kept its two best-scoring pairs
        assert set(fit.rope_pairs[j]) == set(scores[j].topk(2).indices.tolist())
    assert 0 < fit.kv_energy_kept < 1 and 0 < fit.rope_score_kept < 1
    assert new.kv_values_per_token() == 6 + 2 * 4
    with pytest.raises(GQAUserError, match="out of range"):
        latent_from_attention(attn, stats[0].input_moment, max_latent_rank(attn.head_dim, 2, 4) + 1, 4)


def test_low_rank_error_falls_with_rank():
    model = tiny_gqa(n_kv=2).double()
    ids, stats = _calibrated(model, n=8)
    ref = model(ids)
    errs = []
    for rank in (4, 12, 24):
        new, _ = latent_model(model, stats, [rank] * 2, 4)
        errs.append((new.double()(ids) - ref).pow(2).mean().item())
    assert errs[0] > errs[1] > errs[2]


def test_saved_latent_model_loads_back(tmp_path):
    from gqa.model.checkpoint import save_checkpoint
    from gqa.model.loading import load_model

    model = _tiny_latent()
    save_checkpoint(
        tmp_path / "checkpoint.pt", {"model_config": dataclasses.asdict(model.config), "model": model.state_dict()}
    )
    back = load_model(tmp_path)
    ids = torch.randint(0, 97, (1, 9))
    assert torch.equal(back(ids), model(ids))
    assert torch.equal(back.layers[1].attn.rope_pairs, model.layers[1].attn.rope_pairs)
    assert not math.isnan(back(ids).sum().item())


def test_memory_counts_the_latent_layout(tmp_path):
    from gqa.memory import memory_report

    cfg = GQAConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=8, n_kv_heads=2, ffn_dim=48, max_seq_len=100,
                    latent_rank=[10, 6, 10], latent_rope_dim=4)  # fmt: skip
    path = tmp_path / "gqa_config.json"
    cfg.save(path)
    report = memory_report(path, context=100)
    assert report["kv_bytes_per_token"] == cfg.kv_bytes_per_token(torch.bfloat16) == (18 + 14 + 18) * 2
    assert report["kv_bytes_per_sequence"] == cfg.kv_bytes(100, torch.bfloat16)
    gqa_row = next(r for r in report["variants"] if r["variant"] == "MHA")
    assert gqa_row["kv_bytes_per_token"] == 3 * 2 * 8 * 4 * 2  # the variants are plain GQA shapes


def test_unrotated_pairs_take_the_expected_rotation():
    """All attention at one offset: the expected rotation is that offset's, so the unrotated dims score a
    query and a key that far apart exactly as the original's rotated dims did."""
    from gqa.rope import apply_rope, rope_cos_sin

    model = tiny_gqa(n_kv=2).double()
    attn, d, delta, t = model.layers[0].attn, model.config.resolved_head_dim, 3, 10
    _, stats = _calibrated(model)
    offsets = torch.zeros(8, 24, dtype=torch.float64)
    offsets[:, delta] = 1.0
    new, fit = latent_from_attention(attn, stats[0].input_moment, max_latent_rank(d, 2, 2), 2, offset_weights=offsets)
    x = torch.randn(1, t, model.config.d_model, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(t), attn.inv_freq)
    q = apply_rope(attn.q_proj(x).view(1, t, 8, d).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k_proj(x).view(1, t, 2, d).transpose(1, 2), cos, sin)
    q_nope = new.q_proj(x).view(1, t, 8, d)[..., : d - 2]
    k_nope = new.k_up(new.kv_down(x)).view(1, t, 8, d - 2)
    for h in range(8):
        pair = fit.rope_pairs[h // 4][0]
        nope = [i for i in range(d) if i not in (pair, pair + d // 2)]
        for m in range(delta, t):
            want = (q[0, h, m, nope] * k[0, h // 4, m - delta, nope]).sum()
            got = (q_nope[0, m, h] * k_nope[0, m - delta, h]).sum()
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # gqa's RoPE angles are fp32


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk-norm"])
def test_decode_step_over_the_cache_matches_float64_reference(shape, dtype, qk_norm):
    """One new token over a filled cache: the path decoding takes (absorbed, unmasked, so the fused CPU kernel
    where it is built) against the float64 reference of the whole sequence's last row."""
    from gqa.cache import LatentKVCache

    layer = _layer(*shape, bias=shape[1] == 3, qk_norm=qk_norm).to(dtype)
    hq, hkv, d, rank, rope = shape
    t = 40
    x = torch.randn(3, t, 24).to(dtype)
    cache = LatentKVCache(3, hkv, t, rank, rope, key_scales=hq if qk_norm else 0, dtype=dtype)
    layer(x[:, :-1], cache=cache)
    out = layer(x[:, -1:], cache=cache)  # (3, 1, 24)
    ref, qkv = _reference(layer, x, torch.arange(t), masks.causal())
    last = ref[:, -1:]
    err = (out.double() - last).abs().max().item()
    base = _baseline_error(layer, ref, qkv, masks.causal(), dtype)
    assert err <= 8 * base + 1e-5 * last.abs().max().item(), f"{err:.3g} vs torch's {base:.3g}"


def test_ragged_batch_generates_what_each_prompt_does_alone():
    from gqa.generation import generate

    model = _tiny_latent()
    prompts = [[5, 9, 31, 2, 77, 40, 8], [12, 3, 60]]
    both = generate(model, prompts, max_new_tokens=6, eos_token_id=None).tokens
    alone = [generate(model, [p], max_new_tokens=6, eos_token_id=None).tokens[0] for p in prompts]
    assert both == alone
