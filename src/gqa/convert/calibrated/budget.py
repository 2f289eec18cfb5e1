"""Variable GQA under a KV-cache budget: how many KV heads each layer keeps.

Given each layer's measured error for every allowed head count (its error curve), choose one
count per layer minimising the total error with the total KV heads (hence KV-cache bytes, which
are proportional when every layer has the same head_dim) within the budget: a knapsack solved
exactly by dynamic programming over layers and heads used.
"""

from __future__ import annotations

import math

__all__ = ["choose_kv_heads", "budget_heads", "parse_kv_heads_per_layer", "kv_head_options"]


def kv_head_options(n_kv_heads: int) -> list[int]:
    """Head counts a layer with ``n_kv_heads`` can be reduced to (equal groups): its divisors."""
    return [n for n in range(1, n_kv_heads + 1) if n_kv_heads % n == 0]


def budget_heads(fraction: float, kv_heads_per_layer: list[int]) -> int:
    """Total KV heads allowed by ``fraction`` of the original cache; refuses a budget below one head
    per layer (one-line ValueError)."""
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"--kv-budget must be a fraction in (0, 1], got {fraction!r}")
    total = sum(kv_heads_per_layer)
    allowed = math.floor(fraction * total + 1e-9)
    n_layers = len(kv_heads_per_layer)
    if allowed < n_layers:
        raise ValueError(
            f"--kv-budget {fraction:g} allows {allowed} KV heads for {n_layers} layers; every layer needs one, "
            f"so the budget must be at least {n_layers / total:.4g}"
        )
    return allowed


def choose_kv_heads(curves: list[dict[int, float]], max_heads: int) -> list[int]:
    """Per-layer head counts minimising ``sum(curves[l][n_l])`` subject to ``sum(n_l) <= max_heads``.

    curves: one ``{heads: error}`` dict per layer. Ties prefer fewer heads.
    """
    if max_heads < sum(min(c) for c in curves):
        raise ValueError(
            f"a budget of {max_heads} KV heads is below the minimum {sum(min(c) for c in curves)} "
            "(one per layer); raise the budget"
        )
    # best[c] = (error, choices) using exactly c heads so far; exact DP over the heads used.
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for curve in curves:
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for used, (err, picks) in best.items():
            for n, e in sorted(curve.items()):
                c = used + n
                if c > max_heads:
                    continue
                cand = (err + e, (*picks, n))
                if c not in nxt or cand[0] < nxt[c][0] - 1e-15:
                    nxt[c] = cand
        best = nxt
    err, picks = min(best.values(), key=lambda v: (v[0], sum(v[1])))
    return list(picks)


def parse_kv_heads_per_layer(spec: str | list[int], kv_heads_per_layer: list[int], n_heads: int) -> list[int]:
    """``"4,4,2,..."`` (or a list) -> per-layer counts, checked: one per layer, each dividing the
    layer's current KV heads (so heads merge in equal groups) and hence the query heads."""
    if isinstance(spec, str):
        try:
            heads = [int(x) for x in spec.replace(" ", "").split(",") if x]
        except ValueError:
            raise ValueError(f"--kv-heads-per-layer must be comma-separated integers, got {spec!r}") from None
    else:
        heads = [int(x) for x in spec]
    if len(heads) != len(kv_heads_per_layer):
        raise ValueError(f"--kv-heads-per-layer lists {len(heads)} layers; the model has {len(kv_heads_per_layer)}")
    for i, (n, old) in enumerate(zip(heads, kv_heads_per_layer, strict=True)):
        if n < 1 or old % n:
            raise ValueError(
                f"--kv-heads-per-layer: layer {i} asks for {n} KV heads; it has {old} "
                f"({n_heads} query heads), so choose one of {kv_head_options(old)}"
            )
    return heads
