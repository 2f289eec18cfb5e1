"""The calibrated path: activation-aware grouping of KV heads, exact head alignment, fitted merges,
variable GQA under a KV budget and local distillation (used by :func:`gqa.convert.convert` whenever
calibration text is given or an option needs it).

- :func:`collect_statistics`: run a model's own forward on calibration text with hooks; per-layer input
  moments, samples and attention statistics (:mod:`~gqa.convert.calibrated.stats`).
- :mod:`~gqa.convert.calibrated.align`: K heads rotated per RoPE frequency pair, V heads by orthogonal
  Procrustes, transforms folded exactly into Q/K/V/O.
- :func:`balanced_groups`: equal-size groups minimising within-group aligned distance.
- :mod:`~gqa.convert.calibrated.fitting`: weighted and least-squares shared heads.
- :func:`reduce_kv_heads` / :func:`error_curves`: the per-layer pipeline with measured errors.
- :func:`choose_kv_heads`: the dynamic-programming KV budget over per-layer error curves.
- :mod:`~gqa.convert.calibrated.distill`: per-layer distillation after merging.

Head mapping everywhere: query head h reads KV head h // (Hq // Hkv), before and after.
"""

from gqa.convert.calibrated.align import align_groups, aligned_distance, apply_transforms, pair_rotation, procrustes
from gqa.convert.calibrated.assign import balanced_groups, grouping_cost
from gqa.convert.calibrated.budget import budget_heads, choose_kv_heads
from gqa.convert.calibrated.fitting import merge_group
from gqa.convert.calibrated.heads import HeadWeights, build_attention, split_heads
from gqa.convert.calibrated.reduce import (
    GROUPINGS,
    MERGES,
    LayerResult,
    distilled_error_curves,
    error_curves,
    layer_error,
    reduce_kv_heads,
    reduce_layer,
)
from gqa.convert.calibrated.stats import LayerStats, calibration_ids, collect_statistics

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
    "distilled_error_curves",
    "layer_error",
    "LayerResult",
    "GROUPINGS",
    "MERGES",
    "choose_kv_heads",
    "budget_heads",
]
