"""Output layouts of :func:`gqa.convert.convert`: one registry, :data:`EXPORTS`.

Each entry names a writer from :mod:`gqa.formats` (one module per format):

- ``hf``: a transformers folder (:func:`gqa.formats.transformers.save_hf`; per-layer KV heads in ``per_layer_config``).
  The streaming path writes this layout itself, tensor by tensor.
- ``decilm``: the DeciLM / Nemotron-NAS ``block_configs`` layout (:func:`gqa.formats.decilm.export_decilm`).
- ``gguf``: a GGUF file ``OUT/model.gguf`` (:func:`gqa.formats.gguf.export_gguf`), when that module exists.
- ``gqa``: gqa's own ``OUT/checkpoint.pt`` (the format ``gqa uptrain`` writes) with ``gqa_config.json``
  beside it: any model gqa runs, latent layers (:mod:`gqa.latent`) included.

Only ``hf`` is written by the streaming path; the others need the model in memory, so they take the
calibrated path's loader (with or without calibration text).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gqa.errors import GQAUserError

__all__ = ["EXPORTS", "Export", "export_for", "GGUF_NAME", "gguf_tokenizer_source", "side_files_folder"]

GGUF_NAME = "model.gguf"


def _write_hf(model, folder: Path, dtype: torch.dtype | None, side_files_from: Path | None, src: Path) -> None:
    from gqa.formats.transformers import save_hf

    save_hf(model, folder, dtype=dtype, side_files_from=side_files_from, force=True)


def _write_decilm(model, folder: Path, dtype: torch.dtype | None, side_files_from: Path | None, src: Path) -> None:
    from gqa.formats.decilm import export_decilm

    export_decilm(model, folder, dtype=dtype, side_files_from=side_files_from, force=True)


def _write_gqa(model, folder: Path, dtype: torch.dtype | None, side_files_from: Path | None, src: Path) -> None:
    from gqa.model.checkpoint import save_gqa_model

    save_gqa_model(model, folder, dtype=dtype, side_files_from=side_files_from)


def _gguf_available() -> bool:
    return importlib.util.find_spec("gqa.formats.gguf") is not None


def side_files_folder(src: Path) -> Path | None:
    """The folder whose side files (tokenizer, generation config) go along with a conversion of ``src``:
    the source folder, a ``checkpoint.pt``'s folder, or None for a GGUF file (its tokenizer is inside)."""
    if src.is_dir():
        return src
    return src.parent if src.suffix == ".pt" else None


def gguf_tokenizer_source(src: Path, side_files_from: Path | None) -> Path:
    """Where the GGUF export takes its tokenizer: the source ``.gguf`` itself (its tokenizer fields are
    copied exactly) or the folder holding ``tokenizer.json``.

    A GGUF without a tokenizer cannot run in llama.cpp, so a source without one is refused (one line)
    rather than written silently.
    """
    if src.suffix.lower() == ".gguf":
        return src
    if side_files_from is not None and (side_files_from / "tokenizer.json").is_file():
        return side_files_from
    where = side_files_from if side_files_from is not None else src
    raise GQAUserError(
        f"--export gguf needs the model's tokenizer.json (llama.cpp cannot run a GGUF without a tokenizer) and "
        f"{where} has none; copy the model's tokenizer.json into {where} or use --export hf"
    )


def _write_gguf(model, folder: Path, dtype: torch.dtype | None, side_files_from: Path | None, src: Path) -> None:
    from gqa.formats.gguf import export_gguf

    tok = gguf_tokenizer_source(src, side_files_from)
    folder.mkdir(parents=True, exist_ok=True)
    export_gguf(model, folder / GGUF_NAME, tokenizer_dir=tok, dtype=dtype or torch.float16)


def _check_gguf_source(src: Path) -> None:
    gguf_tokenizer_source(src, side_files_folder(src))


@dataclass(frozen=True)
class Export:
    """An output layout: its name, its writer ``(model, folder, dtype, side_files_from, src)``, whether
    the streaming path writes it directly, and a check of the source run before any weight is read."""

    name: str
    help: str
    write: Callable[[object, Path, torch.dtype | None, Path | None, Path], None]
    streaming: bool = False
    available: Callable[[], bool] = lambda: True
    check_source: Callable[[Path], None] = lambda src: None


EXPORTS: dict[str, Export] = {
    e.name: e
    for e in (
        Export("hf", "transformers folder", _write_hf, streaming=True),
        Export("decilm", "DeciLM / Nemotron-NAS block_configs folder", _write_decilm),
        Export(
            "gguf",
            f"GGUF file OUT/{GGUF_NAME}",
            _write_gguf,
            available=_gguf_available,
            check_source=_check_gguf_source,
        ),
        Export("gqa", "gqa checkpoint OUT/checkpoint.pt (latent layers too)", _write_gqa),
    )
}


def export_for(name: str) -> Export:
    """The registered export ``name`` (one-line error listing the choices, or saying it is not available)."""
    if name not in EXPORTS:
        raise GQAUserError(f"unknown --export {name!r}; choose one of {', '.join(EXPORTS)}")
    e = EXPORTS[name]
    if not e.available():
        raise GQAUserError(f"--export {name} is not available in this gqa build; choose hf or decilm")
    return e
