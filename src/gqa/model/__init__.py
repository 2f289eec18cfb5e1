"""The Llama-style GQA decoder and its config; loading every format (:mod:`gqa.model.loading`).

The transformers-folder names (``load_hf``, ``save_hf``, ``config_from_hf``, ...) live in
:mod:`gqa.formats.transformers` and are re-exported here on first use (the formats build on this package).
"""

from __future__ import annotations

import importlib

from gqa.model.assets import shipped_model_path, smollm2_gguf_path
from gqa.model.config import GQAConfig
from gqa.model.decoder import DecoderBlock, GQAForCausalLM, SwiGLU
from gqa.model.loading import load_model, load_model_tokenizer

_FROM_FORMATS = ("load_hf", "save_hf", "from_transformers", "config_from_hf", "config_to_hf", "weight_map")

__all__ = [
    "GQAConfig",
    "GQAForCausalLM",
    "DecoderBlock",
    "SwiGLU",
    *_FROM_FORMATS,
    "load_model",
    "load_model_tokenizer",
    "shipped_model_path",
    "smollm2_gguf_path",
]


def __getattr__(name: str):
    if name in _FROM_FORMATS:
        value = getattr(importlib.import_module("gqa.formats.transformers"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gqa.model' has no attribute {name!r}")
