"""Old import path, kept only until every caller imports from :mod:`gqa.model.loading` and
:mod:`gqa.model.assets` (model loading lives in ``gqa.model``; shipped models are located there)."""

from gqa.model.assets import SMOLLM2_GGUF_NAME, smollm2_gguf_path
from gqa.model.loading import load_model, load_model_tokenizer

__all__ = ["load_model", "load_model_tokenizer", "smollm2_gguf_path", "SMOLLM2_GGUF_NAME"]
