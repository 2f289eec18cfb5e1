"""Activation-aware grouping of KV heads, exact head alignment, and variable GQA under a KV budget.

- :func:`collect_statistics`: run a model on calibration text; per-layer input moments, samples
  and attention statistics (:mod:`gqa.grouping.stats`).
- :mod:`gqa.grouping.align`: K heads rotated per RoPE frequency pair, V heads by orthogonal
  Procrustes, transforms folded exactly into Q/K/V/O.
- :func:`balanced_groups`: equal-size groups minimising within-group aligned distance.
- :mod:`gqa.grouping.merge`: mean, weighted and least-squares shared heads.
- :func:`reduce_kv_heads` / :func:`error_curves`: the per-layer pipeline with measured errors.
- :func:`choose_kv_heads`: the dynamic-programming KV budget over per-layer error curves.
- :func:`convert_grouped`: checkpoint in, checkpoint out (used by ``gqa convert --calib ...``).

Head mapping everywhere: query head h reads KV head h // (Hq // Hkv), before and after.
"""

from gqa.grouping.align import align_groups, aligned_distance, apply_transforms, pair_rotation, procrustes
from gqa.grouping.assign import balanced_groups, grouping_cost
from gqa.grouping.budget import budget_heads, choose_kv_heads, kv_head_options, parse_kv_heads_per_layer
from gqa.grouping.convert import EXPORTS, GROUPING_REPORT_NAME, convert_grouped
from gqa.grouping.heads import HeadWeights, build_attention, split_heads
from gqa.grouping.merge import merge_group
from gqa.grouping.pipeline import (
    GROUPINGS,
    MERGES,
    LayerResult,
    error_curves,
    layer_error,
    reduce_kv_heads,
    reduce_layer,
)
from gqa.grouping.stats import LayerStats, calibration_ids, collect_statistics

__all__ = [
    "collect_statistics",
    "calibration_ids",
    "LayerStats",
    "HeadWeights",
    "split_heads",
    "build_attention",
    "pair_rotation",
    "procrustes",
    "apply_transforms",
    "align_groups",
    "aligned_distance",
    "balanced_groups",
    "grouping_cost",
    "merge_group",
    "reduce_layer",
    "reduce_kv_heads",
    "error_curves",
    "layer_error",
    "LayerResult",
    "GROUPINGS",
    "MERGES",
    "choose_kv_heads",
    "budget_heads",
    "kv_head_options",
    "parse_kv_heads_per_layer",
    "convert_grouped",
    "GROUPING_REPORT_NAME",
    "EXPORTS",
]
