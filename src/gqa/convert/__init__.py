"""Convert checkpoints to fewer KV heads (the GQA paper's uptraining starting point).

- :func:`convert_checkpoint`: a transformers folder or GGUF file in, a transformers folder out.
- :mod:`gqa.convert.grouping`: which old KV heads form each new one (an explicit list of groups).
- :mod:`gqa.convert.merge`: how a group's heads are pooled (``mean``, ``first``, ``random``).
- :mod:`gqa.convert.layouts`: one module per checkpoint layout, each an explicit weight map.

Head mapping: query head h uses KV head h // (Hq // Hkv), before and after conversion.
"""

from gqa.convert.checkpoint import OUTPUT_DTYPES, REPORT_NAME, ConversionReport, convert_checkpoint
from gqa.convert.grouping import contiguous_groups, query_order, validate_groups
from gqa.convert.layouts import SUPPORTED_MODEL_TYPES, layout_for
from gqa.convert.merge import MERGE_METHODS, merge_heads

__all__ = [
    "convert_checkpoint",
    "ConversionReport",
    "OUTPUT_DTYPES",
    "REPORT_NAME",
    "SUPPORTED_MODEL_TYPES",
    "MERGE_METHODS",
    "merge_heads",
    "contiguous_groups",
    "validate_groups",
    "query_order",
    "layout_for",
]
