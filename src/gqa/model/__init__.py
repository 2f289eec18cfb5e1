"""The Llama-style GQA decoder, its config, transformers-folder interop, and loading every format."""

from gqa.model.assets import shipped_model_path, smollm2_gguf_path
from gqa.model.config import GQAConfig
from gqa.model.decoder import DecoderBlock, GQAForCausalLM, SwiGLU
from gqa.model.hf import config_from_hf, config_to_hf, from_transformers, load_hf, save_hf, weight_map
from gqa.model.loading import load_model, load_model_tokenizer

__all__ = [
    "GQAConfig",
    "GQAForCausalLM",
    "DecoderBlock",
    "SwiGLU",
    "load_hf",
    "save_hf",
    "from_transformers",
    "config_from_hf",
    "config_to_hf",
    "weight_map",
    "load_model",
    "load_model_tokenizer",
    "shipped_model_path",
    "smollm2_gguf_path",
]
