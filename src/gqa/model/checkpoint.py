"""gqa training checkpoints (``checkpoint.pt``): one file, written atomically, read back with checks.

The file format lives here, beside the model it holds, so that loading a model (:mod:`gqa.model.loading`)
never imports the training package; :mod:`gqa.train` writes and resumes from the same format.

A checkpoint holds the model and optimizer state as full (unsharded) tensors, the step reached and
both configs; data order and the learning rate are functions of the step, so this is all a run
needs to continue exactly where it stopped. It is read with ``torch.load(weights_only=True)``:
tensors and plain containers only, never arbitrary pickled objects.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gqa.errors import GQAUserError, first_line

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_FORMAT", "CONFIG_NAME", "save_checkpoint", "load_checkpoint", "save_gqa_model"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "gqa-train-checkpoint/1"
CONFIG_NAME = "gqa_config.json"  # the model config beside a checkpoint, for readers of configs (gqa memory)


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write ``state`` (tensors, numbers, strings, dicts) to ``path`` atomically; a crash leaves the old one."""
    from gqa.atomic import atomic_file

    path = Path(path)
    with atomic_file(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; a missing or damaged file is a one-line
    :class:`GQAUserError`."""
    path = Path(path)
    if not path.is_file():
        raise GQAUserError(f"no checkpoint at {path}; start a new run without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, wrong file: all mean "cannot use this file"
        raise GQAUserError(
            f"checkpoint {path} is corrupt ({first_line(e, 120)}); restore it or delete it to start over"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise GQAUserError(f"{path} is not a gqa training checkpoint; restore it or delete it to start over")
    return state


def save_gqa_model(model, folder: str | Path, *, dtype: torch.dtype | None = None, side_files_from: str | Path | None = None) -> Path:
    """gqa's own model layout in ``folder``: ``checkpoint.pt`` (config and weights, what
    :func:`gqa.model.load_model` reads), ``gqa_config.json`` and the tokenizer files of ``side_files_from``.
    Holds any model gqa runs, latent layers (:mod:`gqa.latent`) included; floating weights cast to ``dtype``."""
    import dataclasses

    from gqa.formats.transformers.folder import copy_side_files

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
    }
    save_checkpoint(folder / CHECKPOINT_NAME, {"model_config": dataclasses.asdict(model.config), "model": state})
    model.config.save(folder / CONFIG_NAME)
    if side_files_from is not None:
        copy_side_files(side_files_from, folder)
    return folder
