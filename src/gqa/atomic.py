"""Temp-then-rename writing: the one way gqa writes files and folders.

Everything is written under a hidden temporary name beside its target and renamed into place at the
end, so an interrupted run (error, Ctrl-C, SIGTERM, kill -9) never leaves a half-written target. A
folder being built is named ``.NAME.partial-XXXX``; a file ``.NAME.tmp-XXXX``. :func:`clean_stale_partials`
removes leftovers of earlier killed runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_file", "atomic_dir", "write_text_atomic", "write_json_atomic", "clean_stale_partials"]


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the result the permissions a plain open() would (umask applied).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, obj) -> Path:
    import json

    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it becomes ``path``.

    With ``force`` an existing ``path`` is replaced only after the new folder is complete (the
    caller decides whether that folder may be replaced). On any error, or a signal that raises, the
    temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if path.exists() and not force:
        from gqa.errors import GQAUserError

        raise GQAUserError(f"{path} exists; choose another path or pass --force / force=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield tmp
        umask = os.umask(0)  # mkdtemp creates 0700 folders; give OUT the permissions mkdir would
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale_partials(path: str | Path) -> list[Path]:
    """Remove ``.NAME.partial-*`` / ``.NAME.old-*`` folders that killed runs left beside ``path``."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for pattern in (f".{path.name}.partial-*", f".{path.name}.old-*", f".{path.name}.tmp-*"):
        for p in path.parent.glob(pattern):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed
