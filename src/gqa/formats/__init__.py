"""Checkpoint formats: one module per format, each with its reader and its writer.

- :mod:`gqa.formats.transformers`: a transformers folder (``config.json``, safetensors shards, side files).
- :mod:`gqa.formats.gguf`: a GGUF file (llama.cpp, Ollama, LM Studio).
- :mod:`gqa.formats.decilm`: the DeciLM / Nemotron-NAS ``block_configs`` layout (per-layer KV heads).
- :mod:`gqa.formats.spec`: :class:`~gqa.formats.spec.CheckpointSpec`, what every reader returns from a
  config; the model config, the conversion shape and the KV shape all derive from it.
- :mod:`gqa.formats.dtypes`: the one dtype table.

Limits on config integers are :data:`gqa.model.config.LIMITS` (checked by :func:`gqa.model.config.check_int`).
Which tensors a family has is :mod:`gqa.families`'s business. Importing this package imports nothing.
"""
