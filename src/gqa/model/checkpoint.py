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

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "gqa-train-checkpoint/1"


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
