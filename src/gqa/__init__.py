"""gqa: grouped-query attention — a fast, correct GQA layer and KV cache, and tools to convert,
uptrain, evaluate and serve checkpoints with fewer KV heads.

Head mapping everywhere: with Hq query heads and Hkv KV heads (g = Hq // Hkv), query head h uses
KV head h // g. Causal masks are aligned bottom-right.

``import gqa`` is light: the names below are imported on first use (module ``__getattr__``), and
transformers is never imported by it. To let ``transformers.AutoModelForCausalLM`` load folders with
per-layer KV heads, call :func:`register_transformers` once.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it; imported on first attribute access.
_LAZY = {
    "attention": "gqa.functional",
    "select_backend": "gqa.functional",
    "reference_attention": "gqa.reference",
    "GroupedQueryAttention": "gqa.layer",
    "RMSNorm": "gqa.layer",
    "KVCache": "gqa.cache",
    "ModelCache": "gqa.cache",
    "GQAConfig": "gqa.model",
    "GQAForCausalLM": "gqa.model",
    "load_hf": "gqa.model",
    "save_hf": "gqa.model",
    "load_model": "gqa.model.loading",
    "generate": "gqa.generation",
    "GQAUserError": "gqa.errors",
}
_SUBMODULES = ("masks",)

__all__ = [*_LAZY, *_SUBMODULES, "register_transformers", "__version__"]


def register_transformers() -> None:
    """Let ``transformers.AutoModelForCausalLM`` load gqa folders with per-layer KV heads (idempotent).

    One line after ``import gqa``::

        gqa.register_transformers()
        model = AutoModelForCausalLM.from_pretrained("model-variable-gqa")  # per-layer KV heads
        model.generate(input_ids, max_new_tokens=20)

    Uniform folders keep loading as transformers' own Llama/Mistral/Qwen classes. Imports transformers.
    """
    from gqa.hf_registry import register

    register()


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"gqa.{name}")
    else:
        raise AttributeError(f"module 'gqa' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
