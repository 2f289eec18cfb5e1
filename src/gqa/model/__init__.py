"""The Llama-style GQA decoder, its config, and transformers-folder interop."""

from gqa.model.config import GQAConfig
from gqa.model.decoder import DecoderBlock, GQAForCausalLM, SwiGLU
from gqa.model.hf import config_from_hf, config_to_hf, from_transformers, load_hf, save_hf, weight_map

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
]
