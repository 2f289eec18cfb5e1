"""Temp-then-rename writing: the one way gqa writes files and folders.

Everything is written under a hidden temporary name beside its target and renamed into place at the
end, so an interrupted run (error, Ctrl-C, SIGTERM, kill -9) never leaves a half-written target. A
folder being built is named ``.NAME.partial-XXXX``; a file ``.NAME.tmp-XXXX``.

One writer per folder: :func:`atomic_dir` holds an exclusive lock on ``.NAME.lock`` beside the folder
for the whole build, so a second run into the same folder is refused at once, and leftovers of killed
runs are removed only by the lock's holder (while it holds the lock no other run can be alive). The
final rename never replaces what was not checked at the start: a folder that appeared meanwhile, or
one swapped for another, is left as it is and the run refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gqa.errors import GQAUserError

__all__ = [
    "atomic_file",
    "atomic_dir",
    "write_text_atomic",
    "write_json_atomic",
    "clean_stale_partials",
    "check_replaceable",
    "writer_lock",
]

# The kinds of temporaries gqa leaves beside a target NAME: ``.NAME.<kind>-<random token>``.
_TEMP_KINDS = ("partial", "old", "tmp")


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
        os.chmod(tmp, 0o666 & ~_umask())
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


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# ---- replacing an existing folder ------------------------------------------------------------------


def check_replaceable(path: str | Path, force: bool, marker: str | None = None) -> tuple[int, int] | None:
    """Whether a writer may put a new folder at ``path``: the one rule for ``force``.

    A missing ``path`` is free (returns None). An existing one is replaced only with ``force``, only when
    it is a real folder (not a link or a file) and, when ``marker`` is given, only when it is empty or
    holds ``marker`` (the file its writer leaves, e.g. gqa convert's report): a folder gqa did not write is
    never deleted. Returns the folder's identity, which :func:`atomic_dir` checks again before replacing.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return None
    if not force:
        raise GQAUserError(f"{path} exists; choose another path or pass --force / force=True")
    if path.is_symlink() or not path.is_dir():
        raise GQAUserError(f"{path} exists and is not a folder; remove it yourself or choose another path")
    if marker is not None and not (path / marker).is_file() and any(path.iterdir()):
        raise GQAUserError(
            f"--force replaces only an earlier model folder that gqa wrote (with {marker}); {path} has none: "
            "choose another OUT or remove it yourself"
        )
    return _identity(path)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, force: bool = False, marker: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it becomes ``path``.

    Holds :func:`writer_lock` on ``path`` throughout, and first removes leftovers of killed runs. An
    existing ``path`` is replaced (after the new folder is complete) only as :func:`check_replaceable`
    allows, and only if it is still the folder that was checked; a ``path`` that appeared while the
    folder was built is never replaced. On any error, or a signal that raises, the temporary folder is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    check_replaceable(path, force, marker)  # refuse before creating anything
    path.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(path):
        _remove_temporaries(path)
        expected = check_replaceable(path, force, marker)  # again, now that no other gqa run can change it
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
        try:
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700 folders; give OUT the permissions mkdir would
            _put_in_place(tmp, path, expected)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _put_in_place(tmp: Path, path: Path, expected: tuple[int, int] | None) -> None:
    """Rename ``tmp`` to ``path``, replacing only the folder checked at the start (``expected``)."""
    if expected is None:
        if not _rename_noreplace(tmp, path):
            raise GQAUserError(
                f"{path} appeared while this run was writing it; it was left as it is and this run's output "
                "removed: choose another OUT, or check it and pass --force"
            )
        return
    old_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    old = old_dir / path.name
    try:
        os.rename(path, old)
    except FileNotFoundError:
        old_dir.rmdir()
        raise GQAUserError(f"{path} was removed while this run was writing it; run again") from None
    if _identity(old) != expected:  # swapped for another folder meanwhile: put it back untouched
        back = _rename_noreplace(old, path)
        if back:
            old_dir.rmdir()
        raise GQAUserError(
            f"{path} was replaced by another program while this run was writing it; it was left as it is"
            + ("" if back else f" (in {old})")
            + ": check it, then run again"
        )
    if not _rename_noreplace(tmp, path):
        # Something was created at path in the instant between the two renames: keep both, say where
        # (a later run into path cleans .NAME.old-* up, so the user has to move it now).
        raise GQAUserError(f"{path} appeared while this run replaced it; the earlier output is kept in {old}")
    shutil.rmtree(old_dir, ignore_errors=True)


_renameat2 = None


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (then return False and change nothing).

    Uses Linux's atomic ``renameat2(RENAME_NOREPLACE)`` where the system and filesystem offer it (a plain
    rename silently replaces an empty folder); elsewhere a check just before the rename.
    """
    global _renameat2
    if _renameat2 is None:
        _renameat2 = _load_renameat2()
    if _renameat2:
        at_fdcwd, rename_noreplace = -100, 1
        if _renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return True
        import ctypes

        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not "unsupported here": a real error
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        return False
    os.rename(src, dst)
    return True


def _load_renameat2():
    """libc's renameat2, or False where there is none (not Linux, old glibc, no ctypes)."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (ImportError, OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


# ---- one writer per target -------------------------------------------------------------------------


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def writer_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``.NAME.lock`` beside ``path`` for the block.

    A second writer gets one line (:class:`GQAUserError`) at once instead of waiting or racing. The lock
    file is removed on exit (a kill -9 leaves it; the next run takes it over: a lock dies with its process).
    Where the system has no ``fcntl`` (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    lock = _lock_path(path)
    while True:
        try:  # O_NOFOLLOW: a link planted at the lock's name never makes us create a file elsewhere
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise GQAUserError(f"{lock} is a link, not gqa's lock file; remove it and run again") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise GQAUserError(f"another gqa run is writing {path}; wait for it or choose another OUT") from None
        # The run that held it before may have removed the file after we opened it: lock the current one.
        st = os.fstat(fd)
        if _identity(lock) == (st.st_dev, st.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still holding it, so no run can take a file about to vanish
        os.close(fd)


# ---- leftovers of killed runs ----------------------------------------------------------------------


def _is_temporary_of(name: str, path: Path) -> bool:
    """Whether ``name`` is one of gqa's temporaries for ``path``: ``.NAME.<kind>-TOKEN`` compared literally.

    TOKEN is the random part mkdtemp/mkstemp add (no dots; a file's own suffix may follow), so the
    temporaries of a target named e.g. ``NAME.partial-1`` are never taken for those of ``NAME``.
    """
    for kind in _TEMP_KINDS:
        prefix = f".{path.name}.{kind}-"
        if not name.startswith(prefix):
            continue
        token = name[len(prefix) :]
        if kind == "tmp" and path.suffix and token.endswith(path.suffix):
            token = token[: -len(path.suffix)]
        if token and "." not in token:
            return True
    return False


def _remove_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of ``path``; call only while holding :func:`writer_lock` on it."""
    removed = []
    for name in sorted(os.listdir(path.parent)):
        if _is_temporary_of(name, path):
            p = path.parent / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def clean_stale_partials(path: str | Path) -> list[Path]:
    """Remove ``.NAME.partial-*`` / ``.NAME.old-*`` / ``.NAME.tmp-*`` entries that killed runs left beside
    ``path`` (names matched literally, never as a pattern). Nothing is removed while another run holds the
    lock on ``path``: its temporaries are alive. Returns what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    try:
        with writer_lock(path):
            return _remove_temporaries(path)
    except (GQAUserError, OSError):  # locked by a live run, or a folder we cannot write: nothing is stale
        return []
