"""KV-head budget: the dynamic program is optimal vs brute force and respects the budget; bad input."""

from __future__ import annotations

import itertools
import random

import pytest

from gqa.convert.calibrated import budget_heads, choose_kv_heads
from gqa.convert.groups import kv_head_options
from gqa.convert.options import _per_layer_spec
from gqa.convert.streaming import resolve_targets
from gqa.formats.spec import AttentionShape


def brute_force(curves, max_heads):
    best = None
    for picks in itertools.product(*[sorted(c) for c in curves]):
        if sum(picks) > max_heads:
            continue
        err = sum(c[n] for c, n in zip(curves, picks, strict=True))
        if best is None or err < best - 1e-12:
            best = err
    return best


@pytest.mark.parametrize("seed", range(8))
def test_dp_is_optimal_and_within_budget(seed):
    rng = random.Random(seed)
    n_layers = rng.randint(2, 5)
    kv = rng.choice([4, 6, 8])
    curves = []
    for _ in range(n_layers):
        opts = kv_head_options(kv)
        errs = sorted((rng.random() for _ in opts), reverse=True)  # more heads, less error
        curve = dict(zip(opts, errs, strict=True))
        curve[kv] = 0.0
        curves.append(curve)
    for fraction in (1 / kv, 0.3, 0.5, 0.75, 1.0):
        if fraction * kv * n_layers < n_layers:
            continue
        max_heads = budget_heads(fraction, [kv] * n_layers)
        picks = choose_kv_heads(curves, max_heads)
        assert sum(picks) <= max_heads
        assert all(kv % n == 0 for n in picks)
        total = sum(c[n] for c, n in zip(curves, picks, strict=True))
        assert total == pytest.approx(brute_force(curves, max_heads), abs=1e-12)


def test_budget_keeps_more_heads_where_error_is_largest():
    curves = [{1: 0.01, 2: 0.005, 4: 0.0}, {1: 5.0, 2: 1.0, 4: 0.0}, {1: 0.02, 2: 0.01, 4: 0.0}]
    assert choose_kv_heads(curves, 6) == [1, 4, 1]


def test_full_budget_keeps_everything():
    curves = [{1: 1.0, 2: 0.5, 4: 0.0}] * 3
    assert choose_kv_heads(curves, budget_heads(1.0, [4, 4, 4])) == [4, 4, 4]


def test_budget_below_one_head_per_layer_is_refused():
    with pytest.raises(ValueError, match="every layer needs one"):
        budget_heads(0.2, [3] * 30)
    with pytest.raises(ValueError, match="fraction in"):
        budget_heads(0, [3] * 30)
    with pytest.raises(ValueError, match="fraction in"):
        budget_heads(1.5, [3] * 30)
    assert budget_heads(1 / 3, [3] * 30) == 30
    with pytest.raises(ValueError, match="one per layer"):
        choose_kv_heads([{1: 0.0, 2: 0.0}] * 3, 2)


def test_per_layer_list_is_checked():
    shape = AttentionShape(n_layers=4, n_heads=8, n_kv_heads=4, head_dim=8)
    assert resolve_targets(shape, None, _per_layer_spec("4,2, 1,4")) == [4, 2, 1, 4]
    assert resolve_targets(shape, None, [8, 2, 1, 4]) == [8, 2, 1, 4]  # 8: replicate layer 0's heads
    with pytest.raises(ValueError, match="lists 3 layers; the model has 4"):
        resolve_targets(shape, None, _per_layer_spec("4,2,1"))
    with pytest.raises(ValueError, match=r"\(layer 1\) 3 does not divide"):
        resolve_targets(shape, None, [4, 3, 1, 4])
    with pytest.raises(ValueError, match="comma-separated integers"):
        _per_layer_spec("4,x")
    with pytest.raises(ValueError, match=">= 1, got 0"):
        resolve_targets(shape, None, [0, 4, 4, 4])
    with pytest.raises(ValueError, match="not a multiple"):
        resolve_targets(shape, None, [4, 4, 4, 6])
