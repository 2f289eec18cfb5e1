"""Training checkpoints: one file, written atomically (temp file + rename), read back with checks.

A checkpoint holds the model and optimizer state as full (unsharded) tensors, the step reached and
both configs; data order and the learning rate are functions of the step, so this is all a run
needs to continue exactly where it stopped.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from gqa.errors import GQAUserError

__all__ = ["CHECKPOINT_NAME", "save_checkpoint", "load_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"
_FORMAT = "gqa-train-checkpoint/1"


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write ``state`` (tensors, numbers, strings, dicts) to ``path`` atomically; a crash leaves the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"format": _FORMAT, **state}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; a damaged file raises a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; start a new run without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, wrong file: all mean "cannot resume from this"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GQAUserError(
            f"checkpoint {path} is corrupt ({reason[:120]}); restore it or delete it to start over"
        ) from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise GQAUserError(f"{path} is not a gqa training checkpoint; restore it or delete it to start over")
    return state
