"""Load what the commands are pointed at: transformers folders, gqa training checkpoints and GGUF files,
each with its tokenizer. ``gqa eval``, ``generate``, ``uptrain`` and calibrated ``convert`` load through here.

Model folders are data, never code. Every transformers ``from_pretrained`` call passes
``trust_remote_code=False``, and a folder that asks for its own code (``auto_map`` in ``config.json`` or
``tokenizer_config.json``, or ``*.py`` files) is refused before anything is loaded. Nothing is downloaded:
a path that does not exist is an error, never a hub id. transformers' own progress bars and load reports
are silenced during loads (:func:`gqa.progress.quiet_loading`); any mismatch between weights and config
(missing, unexpected or misshapen tensors) is an error, never a randomly initialised model. A GGUF file's
metadata and tensor table are checked (:func:`gqa.formats.gguf.read_gguf_header`) before transformers sees it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gqa.errors import GQAUserError, first_line
from gqa.model.files import read_json_object

__all__ = [
    "load_model",
    "load_model_tokenizer",
    "read_config_json",
    "check_no_remote_code",
    "model_context",
    "load_checkpoint_model",
]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_WHAT = "pass a transformers folder, a gqa checkpoint.pt or a .gguf file"


def read_config_json(path: str | Path) -> dict:
    """A ``config.json`` read as a JSON object; anything else is a one-line :class:`GQAUserError`."""
    return read_json_object(path, missing=_WHAT)


def check_no_remote_code(folder: str | Path) -> None:
    """Refuse a model folder that ships Python code or asks transformers to run it (``auto_map``).

    gqa never executes code from a model folder; refusing such folders outright means no later step
    (a tokenizer load, a conversion that copies side files) can run or spread that code.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    code = sorted(p.name for p in folder.glob("*.py"))
    mapped = []
    for name in ("config.json", "tokenizer_config.json"):
        f = folder / name
        if f.is_file():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # read (and reported) properly by whoever loads that file
            if isinstance(data, dict) and data.get("auto_map"):
                mapped.append(name)
    if code or mapped:
        found = ", ".join([*(f"auto_map in {m}" for m in mapped), *code[:3]])
        raise GQAUserError(
            f"{folder} contains model code ({found}); gqa never runs code from a model folder: "
            "use a folder without auto_map and *.py files"
        )


def model_context(model) -> int | None:
    """The longest sequence ``model`` was built for (``max_seq_len`` / ``max_position_embeddings``), or None."""
    cfg = getattr(model, "config", None)
    for name in ("max_seq_len", "max_position_embeddings", "n_positions"):
        val = getattr(cfg, name, None)
        if isinstance(val, int) and val > 0:
            return val
    return None


def check_context(seq_len: int, models: dict) -> None:
    """``seq_len`` must fit each model's context ({role: model or None}; RoPE tables and caches are sized
    by it): else a one-line :class:`GQAUserError` naming the role and the longest allowed."""
    for role, m in models.items():
        ctx = model_context(m) if m is not None else None
        if ctx is not None and seq_len > ctx:
            raise GQAUserError(f"--seq-len {seq_len} is past {role}'s context of {ctx} tokens; use --seq-len {ctx} or less")


def load_checkpoint_model(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """The model held by a gqa training checkpoint (``checkpoint.pt``), with every tensor checked."""
    from gqa.model.checkpoint import load_checkpoint
    from gqa.model.config import GQAConfig
    from gqa.model.decoder import GQAForCausalLM

    state = load_checkpoint(path)
    cfg = state.get("model_config")
    weights = state.get("model")
    if not isinstance(cfg, dict) or not isinstance(weights, dict):
        raise GQAUserError(f"{path} has no model_config/model entries; restore it or delete it to start over")
    try:
        config = GQAConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise GQAUserError(f"{path} holds a bad model config ({first_line(e)}); restore the checkpoint") from None
    model = GQAForCausalLM(config).to(dtype)  # sizes validated (bounded) by GQAConfig; weights copied in at dtype
    _check_state(model.state_dict(), weights, str(path))
    model.load_state_dict(weights, strict=True)
    return model.eval()


def _check_state(own: dict, loaded: dict, where: str) -> None:
    missing = sorted(set(own) - set(loaded))
    unexpected = sorted(set(loaded) - set(own))
    if missing or unexpected:
        raise GQAUserError(
            f"{where}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "restore the checkpoint"
        )
    for k, t in own.items():
        if tuple(loaded[k].shape) != tuple(t.shape):
            raise GQAUserError(
                f"{where}: {k} has shape {tuple(loaded[k].shape)}, the config needs {tuple(t.shape)}; restore the checkpoint"
            )


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise GQAUserError(f"{path} does not exist; {_WHAT}")
    return path


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, prefer_gqa: bool = True):
    """A causal LM from ``path``.

    * a transformers folder (config.json + safetensors): a :class:`gqa.GQAForCausalLM` when gqa runs its
      family (``gqa.families.names(runs=True)``, or a dense DeepSeek-V2 folder: latent layers, see
      :func:`gqa.formats.deepseek2.load_deepseek_v2`) and ``prefer_gqa``, else ``AutoModelForCausalLM``
      (its own code only: ``trust_remote_code=False``);
    * a gqa training checkpoint (``checkpoint.pt``, or a folder of an unfinished run holding one);
    * a ``.gguf`` file (needs the ``gguf`` package): ``deci`` files (per-layer KV heads, as
      :func:`gqa.formats.gguf.export_gguf` writes them) through gqa's own reader; others through
      transformers, turned into a gqa model when the family is supported.

    Every user-fixable problem (missing path, bad config, weights that do not match it, a folder with
    code) raises :class:`GQAUserError` with one line.
    """
    from gqa.model.checkpoint import CHECKPOINT_NAME

    path = _existing(path)
    ckpt = path if path.is_file() and path.suffix == ".pt" else path / CHECKPOINT_NAME
    if ckpt.is_file() and not (path.is_dir() and (path / "model.safetensors").is_file()):
        return load_checkpoint_model(ckpt, dtype=dtype)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype=dtype, prefer_gqa=prefer_gqa)
    if path.is_dir() and (path / "config.json").is_file():
        check_no_remote_code(path)
        cfg = read_config_json(path / "config.json")
        from gqa import families
        from gqa.formats import decilm
        from gqa.formats.transformers import load_hf

        if prefer_gqa and cfg.get("model_type") in families.names(runs=True):
            return load_hf(path, dtype=dtype)
        if prefer_gqa and cfg.get("model_type") == "deepseek_v2":  # latent layers (gqa.latent); dense ones only
            from gqa.formats.deepseek2 import load_deepseek_v2

            return load_deepseek_v2(path, dtype=dtype)
        if cfg.get("model_type") == decilm.MODEL_TYPE and "block_configs" in cfg:
            # DeciLM / Nemotron-NAS (per-layer KV heads, gqa's --export decilm): transformers has no class
            # for it without the model folder's own code, which gqa never runs; gqa's reader has.
            return decilm.load_decilm(path, dtype=dtype)
        return _load_transformers(path, dtype=dtype)
    raise GQAUserError(f"{path} is not a transformers folder, a gqa checkpoint.pt or a .gguf file; {_WHAT}")


def _refuse_mismatch(info: dict, where: Path, *, gguf: bool = False) -> None:
    """transformers initialises missing weights randomly and only logs it: make that an error.

    A GGUF may carry tensors transformers has no use for (llama.cpp's ``rope_freqs``): only missing or
    misshapen weights are refused there.
    """
    missing = list(info.get("missing_keys") or [])
    unexpected = [] if gguf else list(info.get("unexpected_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    source, fix = (
        ("its metadata", "the file is incomplete: re-export or re-download it")
        if gguf
        else ("config.json", "re-save the model")
    )
    if missing or mismatched:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"wrong shapes {[m[0] for m in mismatched][:3]}"
        raise GQAUserError(f"{where}: weights do not match {source} ({detail}); {fix}")
    if unexpected:
        raise GQAUserError(
            f"{where}: weights include tensors config.json has no place for ({sorted(unexpected)[:3]}); re-save the model"
        )


def _load_transformers(folder: Path, *, dtype: torch.dtype):
    from gqa.progress import quiet_loading

    with quiet_loading():
        from transformers import AutoModelForCausalLM

        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                folder,
                dtype=dtype,
                trust_remote_code=False,
                local_files_only=True,
                use_safetensors=True,  # never unpickle pytorch_model.bin
                output_loading_info=True,
            )
        except GQAUserError:
            raise
        except Exception as e:  # transformers fails in many ways on a malformed folder; all mean "fix the folder"
            raise GQAUserError(
                f"transformers cannot load {folder} ({first_line(e)}); check that it is a causal LM folder"
            ) from None
    _refuse_mismatch(info, folder)
    return model.eval()


def _gguf_family(arch: str):
    from gqa import families

    return families.by_gguf_arch(arch)


def _only_gqa_reads(arch: str) -> bool:
    """True for a GGUF architecture gqa reads and transformers does not (``deci``: per-layer KV heads)."""
    family = _gguf_family(arch)
    return family is not None and family.gguf_native and not family.runs


def _load_gguf(path: Path, *, dtype: torch.dtype, prefer_gqa: bool):
    from gqa import families
    from gqa.formats.gguf import load_gguf, read_gguf_header
    from gqa.formats.transformers import from_transformers
    from gqa.progress import quiet_loading

    # every metadata value and tensor checked before anything is allocated or handed to transformers
    family = _gguf_family(read_gguf_header(path).arch)
    if family is not None and family.gguf_native and (prefer_gqa or not family.runs):
        # gqa's own reader: the architectures transformers has no reader for (deci) and those gqa reads
        # directly (gemma3: dequantized tensor by tensor, no transformers model built first)
        return load_gguf(path, dtype=dtype)
    with quiet_loading():
        from transformers import AutoModelForCausalLM

        try:
            hf, info = AutoModelForCausalLM.from_pretrained(
                path.parent,
                gguf_file=path.name,
                dtype=dtype,
                trust_remote_code=False,
                local_files_only=True,
                output_loading_info=True,
            )
        except GQAUserError:
            raise
        except Exception as e:  # the GGUF reader raises many types for cut or garbled files
            raise GQAUserError(
                f"cannot read {path} as a GGUF model ({first_line(e)}); the file is truncated or not a GGUF model"
            ) from None
    _refuse_mismatch(info, path, gguf=True)  # the architectures gqa does not check itself
    if prefer_gqa and hf.config.model_type in families.names(runs=True):
        return from_transformers(hf).to(dtype)
    return hf.eval()


def load_model_tokenizer(path: str | Path, tokenizer: str | Path | None = None):
    """The tokenizer that goes with ``path`` (or the one at ``tokenizer``): a transformers tokenizer,
    loaded without running any code from its folder."""
    src = _existing(tokenizer if tokenizer is not None else path)
    if src.is_file() and src.suffix == ".pt":
        src = src.parent
    if src.is_dir():
        check_no_remote_code(src)
    from gqa.progress import quiet_loading

    with quiet_loading():
        from transformers import AutoTokenizer

        try:
            if src.is_file() and src.suffix == ".gguf":
                # transformers' Auto classes know no "deci" architecture (per-layer KV heads); the tokenizer
                # fields are the same, so the generic fast tokenizer reads them
                from gqa.formats.gguf import gguf_file_architecture

                auto = AutoTokenizer
                if _only_gqa_reads(gguf_file_architecture(src)):
                    from transformers import PreTrainedTokenizerFast as auto
                return auto.from_pretrained(
                    src.parent, gguf_file=src.name, trust_remote_code=False, local_files_only=True
                )
            if src.is_dir() and any((src / f).is_file() for f in _TOKENIZER_FILES):
                return AutoTokenizer.from_pretrained(src, trust_remote_code=False, local_files_only=True)
        except GQAUserError:
            raise
        except Exception as e:  # transformers reads config.json too, and fails in many ways on malformed ones
            raise GQAUserError(
                f"cannot load a tokenizer from {src} ({type(e).__name__}: {first_line(e)}); "
                "fix its config.json / tokenizer files or pass --tokenizer"
            ) from None
    raise GQAUserError(f"{src} has no tokenizer files; pass --tokenizer with the model's tokenizer folder")
