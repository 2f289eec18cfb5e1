"""The shared rotated-key head (DeepSeek-V2's latent layout): one rotated key head for every query head at
evenly spaced frequency pairs, converted from a GQA model by merging its groups' keys per pair."""

from __future__ import annotations

import pytest
import torch

from gqa.convert.calibrated.latent import (
    latent_from_attention,
    latent_model,
    max_latent_rank,
    rope_pair_scores,
    shared_rope_pairs,
)
from gqa.convert.calibrated.stats import collect_statistics
from helpers import tiny_gqa


def _calibrated(model, n=6, t=24):
    ids = torch.randint(0, 97, (n, t))
    return ids, collect_statistics(model, ids, progress=False, attention_sequences=0)


def _keys_as_complex_multiples(model, seed=0):
    """Make every group's key pair a complex multiple of group 0's (c_gp * kappa_0p): one shared head then
    holds all of them exactly."""
    g = torch.Generator().manual_seed(seed)
    for block in model.layers:
        attn = block.attn
        d, half = attn.head_dim, attn.head_dim // 2
        w = attn.k_proj.weight.data.view(attn.n_kv_heads, d, -1)
        for j in range(1, attn.n_kv_heads):
            for p in range(half):
                a, b = torch.randn(2, generator=g, dtype=torch.float64)
                re, im = w[0, p].clone(), w[0, p + half].clone()
                w[j, p], w[j, p + half] = a * re - b * im, a * im + b * re


def test_merged_keys_are_exact_when_groups_differ_by_a_complex_scale():
    model = tiny_gqa(n_kv=2).double()
    with torch.no_grad():
        _keys_as_complex_multiples(model)
    ids, stats = _calibrated(model)
    d = model.config.resolved_head_dim
    top = max_latent_rank(d, 2, d)  # every pair rotated: the latent holds V only
    new, fits = latent_model(model, stats, [top] * 2, d, shared_rope=True)
    new = new.double()
    assert new.config.n_kv_heads == 1 and new.config.kv_values_per_token() == [top + d] * 2
    assert all(f.rope_merge_kept == pytest.approx(1.0) and f.rope_pairs == [list(range(d // 2))] for f in fits)
    torch.testing.assert_close(new(ids), model(ids), atol=1e-9, rtol=1e-9)
    cache = new.make_cache(ids.shape[0], ids.shape[1], dtype=torch.float64)
    step = torch.cat([new(ids[:, :20], cache=cache), new(ids[:, 20:21], cache=cache)], 1)
    torch.testing.assert_close(step, model(ids[:, :21]), atol=1e-9, rtol=1e-9)


def test_one_kv_group_converts_exactly_at_full_rank():
    model = tiny_gqa(n_kv=1).double()
    ids, stats = _calibrated(model)
    d = model.config.resolved_head_dim
    new, fits = latent_model(model, stats, [max_latent_rank(d, 1, d)] * 2, d, shared_rope=True)
    torch.testing.assert_close(new.double()(ids), model(ids), atol=1e-9, rtol=1e-9)


def test_independent_groups_lose_part_of_their_keys_and_report_it():
    model = tiny_gqa(n_kv=2).double()
    ids, stats = _calibrated(model)
    d = model.config.resolved_head_dim
    top = max_latent_rank(d, 2, d)
    exact, _ = latent_model(model, stats, [top] * 2, d)
    shared, fits = latent_model(model, stats, [top] * 2, d, shared_rope=True)
    assert all(0.5 <= f.rope_merge_kept < 0.99 for f in fits)  # the top of two independent groups' energy
    want = model(ids).log_softmax(-1)
    err_exact = (exact.double()(ids).log_softmax(-1) - want).abs().max()
    err_shared = (shared.double()(ids).log_softmax(-1) - want).abs().max()
    assert err_exact < 1e-9 < err_shared


def test_shared_pairs_are_evenly_spaced_from_the_highest_frequency_at_the_best_stride():
    scores = torch.zeros(2, 16)
    scores[:, [0, 3, 6, 9]] = 1.0  # stride 3 carries everything
    scores[:, [1, 2]] = 0.4
    assert shared_rope_pairs(scores, 8) == ([0, 3, 6, 9], 3)
    assert shared_rope_pairs(scores, 2) == ([0], 1)
    assert shared_rope_pairs(scores, 32) == (list(range(16)), 1)
    model = tiny_gqa(n_kv=2)
    _, stats = _calibrated(model)
    attn = model.layers[0].attn
    layer, fit = latent_from_attention(attn, stats[0].input_moment, 10, 4, shared_rope=True)
    pairs, _ = shared_rope_pairs(rope_pair_scores(attn, stats[0].input_moment.double()), 4)
    assert fit.rope_pairs == [pairs] and layer.rope_pairs.tolist() == [pairs] and layer.n_kv_heads == 1
    assert layer.kv_values_per_token() == 10 + 4
