"""Convert checkpoints to other KV-head counts: one entry point, :func:`convert`.

- :func:`convert`: a transformers folder or GGUF file in, a model folder out; routes to the streaming
  path (tensor by tensor) or the calibrated path (model loaded, calibration text run through hooks).
- :class:`ConvertOptions`: its options as one frozen object, validated when built (``gqa convert``'s
  flags are generated from its fields).
- :mod:`gqa.convert.groups`: which old KV heads form each new one (the one group type).
- :mod:`gqa.convert.merge`: how a group's heads are pooled (one registry, :data:`MERGES`).
- :mod:`gqa.convert.exports`: output layouts (one registry, :data:`EXPORTS`: hf, decilm, gguf).
- :mod:`gqa.families`: one record per model family (its conversion weight map among them).
- :mod:`gqa.convert.calibrated`: calibration, alignment, similarity grouping, fitted merges, budgets,
  local distillation.

Head mapping: query head h uses KV head h // (Hq // Hkv), before and after conversion.
"""

from gqa.convert.api import GROUPINGS, OUTPUT_DTYPES, convert
from gqa.convert.exports import EXPORTS
from gqa.convert.groups import Groups, contiguous_groups, expansion_groups, query_order, validate_groups
from gqa.convert.merge import MERGES, merge_heads
from gqa.convert.options import ConvertOptions
from gqa.convert.report import REPORT_NAME, ConversionReport
from gqa.convert.streaming import layout_for
from gqa.families import names as _family_names

#: The families gqa convert takes (a query on :mod:`gqa.families`).
SUPPORTED_MODEL_TYPES: tuple[str, ...] = _family_names(convert=True)

__all__ = [
    "convert",
    "ConvertOptions",
    "ConversionReport",
    "REPORT_NAME",
    "OUTPUT_DTYPES",
    "GROUPINGS",
    "MERGES",
    "EXPORTS",
    "SUPPORTED_MODEL_TYPES",
    "merge_heads",
    "Groups",
    "contiguous_groups",
    "expansion_groups",
    "validate_groups",
    "query_order",
    "layout_for",
]
