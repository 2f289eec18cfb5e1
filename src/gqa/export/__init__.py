"""Export gqa models to layouts other tools read: DeciLM / Nemotron-NAS ``block_configs``
(variable KV heads per layer) — see :mod:`gqa.export.decilm` for the field mapping."""

from gqa.export.decilm import decilm_config, export_decilm, ffn_mult_for, intermediate_size_for, load_decilm

__all__ = ["export_decilm", "load_decilm", "decilm_config", "ffn_mult_for", "intermediate_size_for"]
