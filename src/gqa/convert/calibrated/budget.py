"""Variable GQA under a KV-cache budget: how many KV heads each layer keeps.

Given each layer's measured error for every allowed head count (its error curve), choose one
count per layer minimising the total error with the total KV heads (hence KV-cache bytes, which
are proportional when every layer has the same head_dim) within the budget: a knapsack solved
exactly by dynamic programming over layers and heads used.
"""

from __future__ import annotations

import math

from gqa.errors import GQAUserError

__all__ = ["choose_kv_heads", "budget_heads"]


def budget_heads(fraction: float, kv_heads_per_layer: list[int]) -> int:
    """Total KV heads allowed by ``fraction`` of the original cache; refuses a budget below one head
    per layer (one-line GQAUserError)."""
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise GQAUserError(f"--kv-budget must be a fraction in (0, 1], got {fraction!r}")
    total = sum(kv_heads_per_layer)
    allowed = math.floor(fraction * total + 1e-9)
    n_layers = len(kv_heads_per_layer)
    if allowed < n_layers:
        raise GQAUserError(
            f"--kv-budget {fraction:g} allows {allowed} KV heads for {n_layers} layers; every layer needs one, "
            f"so the budget must be at least {n_layers / total:.4g}"
        )
    return allowed


def choose_kv_heads(curves: list[dict[int, float]], max_heads: int) -> list[int]:
    """Per-layer head counts minimising ``sum(curves[l][n_l])`` subject to ``sum(n_l) <= max_heads``.

    curves: one ``{heads: error}`` dict per layer. Ties prefer fewer heads.
    """
    if max_heads < sum(min(c) for c in curves):
        raise GQAUserError(
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
