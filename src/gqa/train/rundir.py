"""The run folder OUT of a training run: refusing to overwrite, the live-run lock, the metrics log.

A run holds an exclusive advisory lock on RUN_MARKER in OUT from its start until it finishes; a folder
with a checkpoint (or the marker without one: a run killed before its first checkpoint) is unfinished
and can only be resumed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from gqa.errors import GQAUserError
from gqa.model.checkpoint import CHECKPOINT_NAME

__all__ = ["METRICS_NAME", "SUMMARY_NAME", "RUN_MARKER", "check_out_dir", "check_not_inside", "read_metrics"]

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "training.json"
#: Present in OUT from the start of a run until it finishes; a live run holds an exclusive lock on it.
RUN_MARKER = ".gqa-training"


def _lock_holder(marker: Path) -> str | None:
    """The pid text of a live run holding ``marker``'s lock, or None when no live run holds it."""
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): nothing to check
        return None
    try:
        fd = os.open(marker, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return (marker.read_text().strip() or "?") if marker.exists() else "?"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _acquire_lock(out_dir: Path):
    """Create RUN_MARKER in ``out_dir`` and hold an exclusive lock on it for the run; returns the fd."""
    marker = out_dir / RUN_MARKER
    fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise GQAUserError(
                f"another gqa run is training into {out_dir} right now; wait for it to finish or choose another OUT"
            ) from None
    except ImportError:
        pass
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}\n".encode())
    return fd


def _release_lock(fd, out_dir: Path, finished: bool) -> None:
    if fd is None:
        return
    if finished:
        (out_dir / RUN_MARKER).unlink(missing_ok=True)
    os.close(fd)  # closing releases the lock


def check_not_inside(out_dir: str | Path, sources: dict[str, str | Path | None]) -> None:
    """Refuse an OUT that is, contains or lies inside any of ``sources`` ({"MODEL": path, ...})."""
    o = Path(out_dir).expanduser().resolve()
    for name, src in sources.items():
        if src is None:
            continue
        s = Path(src).expanduser().resolve()
        base = s.parent if s.is_file() and s.suffix == ".pt" else s  # a checkpoint.pt stands for its run folder
        if o == s or o == base or o.is_relative_to(base) or base.is_relative_to(o):
            raise GQAUserError(
                f"OUT {out_dir} overlaps {name} {src}; choose an output folder outside it (sources are never written)"
            )


def _unfinished(out_dir: Path) -> bool:
    return (out_dir / CHECKPOINT_NAME).is_file() or (out_dir / RUN_MARKER).is_file()


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """Refuse to overwrite anything: OUT must be new, or hold an unfinished run when resuming.

    An unfinished run is one with a checkpoint, or one killed before its first checkpoint (OUT holds the
    run marker but no checkpoint): ``--resume`` restarts the latter from step 0. A run that is still alive
    (it holds the marker's lock) is refused either way.
    """
    out_dir = Path(out_dir)
    holder = _lock_holder(out_dir / RUN_MARKER) if out_dir.is_dir() else None
    if holder is not None:
        raise GQAUserError(
            f"another gqa run ({holder}) is training into {out_dir} right now; wait for it or choose another OUT"
        )
    if resume:
        if _unfinished(out_dir):
            return
        if out_dir.exists():
            raise GQAUserError(
                f"{out_dir} holds no unfinished run to resume (finished or not a training folder); "
                "choose another OUT and drop --resume"
            )
        raise GQAUserError(f"{out_dir} does not exist, so there is nothing to resume; drop --resume to start a run")
    if out_dir.exists():
        if _unfinished(out_dir):
            raise GQAUserError(f"{out_dir} holds an unfinished run; pass --resume to continue it or choose another OUT")
        raise GQAUserError(f"{out_dir} exists; choose another output path (nothing was written)")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn line (a run killed mid-write) is skipped, not an error."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _clean_partials(out_dir: Path) -> None:
    """Remove temporary files that a killed run left in OUT (half-written checkpoints, staged folders)."""
    for pattern in (f".{CHECKPOINT_NAME}.*", ".model.*", f".{SUMMARY_NAME}.tmp*", f".{METRICS_NAME}.tmp*"):
        for p in out_dir.glob(pattern):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
