"""Shared CLI plumbing: one-line user errors with exit code 2, the console, and global-state restoring.

Only :class:`gqa.errors.GQAUserError` and the OS errors a user causes (a missing path, no permission, a full
disk) are printed as one line ``error: ...`` on stderr, on a line of their own (any progress bar is ended
first), with exit code 2. Every other exception (TypeError, KeyError, a bare ValueError, ...) is a bug and
keeps its traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from gqa.errors import GQAUserError, first_line

__all__ = [
    "console",
    "err_console",
    "user_errors",
    "print_error",
    "user_message",
    "restore_global_state",
    "dataclass_options",
    "with_parameters",
]

console = Console()
err_console = Console(stderr=True)

# OS errors a user causes, and the fix each message names.
_OS_HINTS = {
    FileNotFoundError: "check the path",
    FileExistsError: "choose another path or pass --force",
    NotADirectoryError: "pass a folder",
    IsADirectoryError: "pass a file, not a folder",
    PermissionError: "check its permissions or choose another path",
}
_ERRNO_HINTS = {
    errno.ENOSPC: "free some disk space or write to another disk",
    errno.EDQUOT: "free some disk space or write to another disk",
    errno.EROFS: "choose a writable location",
    errno.ENAMETOOLONG: "use a shorter path",
}


def _user_os_error(e: BaseException) -> str | None:
    """The one-line message for an OS error a user causes, or None when it is not one."""
    if not isinstance(e, OSError):
        return None
    hint = _ERRNO_HINTS.get(e.errno or -1)
    if hint is None:
        hint = next((h for cls, h in _OS_HINTS.items() if type(e) is cls), None)
    if hint is None:
        return None
    if e.strerror is None:  # raised by gqa with its own message, which names the fix
        text = " ".join(str(e).split())
        return text or f"{type(e).__name__}; {hint}"
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror[:1].lower()}{e.strerror[1:]}; {hint}"


# How the writers gqa uses report a full disk when they do not raise OSError(ENOSPC) themselves:
# safetensors ("I/O error: No space left on device (os error 28)"), numpy's tofile under the gguf writer
# ("98304 requested and 61880 written": a short write), torch.save ("unexpected pos" from its zip writer).
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded")
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
_TORCH_WRITER = re.compile(r"inline_container\.cc.*(unexpected pos|failed writing)", re.S)


def _failed_write(e: BaseException) -> str | None:
    """The one-line message when ``e`` (or an exception it wraps) is a write a full disk stopped, else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
            t in text for t in _DISK_FULL_TEXT
        ):
            return "no space left on device while writing; free some disk space or write to another disk"
        if _SHORT_WRITE.fullmatch(text.strip()) or _TORCH_WRITER.search(text):
            return (
                f"a file could not be written completely ({first_line(e, 80)}); the disk is probably full: "
                "free some disk space or write to another disk"
            )
        e = e.__cause__ or e.__context__
    return None


def user_message(e: BaseException) -> str | None:
    """``e`` as the one line the CLI prints, or None when ``e`` is a bug (it keeps its traceback)."""
    if isinstance(e, GQAUserError):
        text = " ".join(str(e).split())  # one line, whatever the message held
        return text or type(e).__name__
    return _user_os_error(e) or _failed_write(e)


def print_error(message: str) -> None:
    """``error: message`` on stderr, starting on a line of its own (a progress bar being drawn is ended)."""
    try:
        from gqa.progress import end_line

        end_line()
    except ImportError:  # pragma: no cover - gqa.progress is part of the package
        pass
    sys.stdout.flush()
    err_console.print(Text("error: ", style="bold red") + Text(message), highlight=False, soft_wrap=True)


def user_errors(fn):
    """Decorator for CLI commands: a user error becomes ``error: <message>`` on stderr and exit code 2;
    Ctrl-C exits 130 with one line; anything else propagates with its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with restore_global_state():
                return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised below unless the user can fix it
            msg = user_message(e)
            if msg is None:
                raise
            print_error(msg)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            print_error("interrupted")
            sys.exit(130)

    return wrapper


@contextlib.contextmanager
def restore_global_state() -> Iterator[None]:
    """Restore process-wide settings that a command or benchmark may change: torch's thread count, and
    matplotlib's backend should code inside the block call ``matplotlib.use`` (gqa's own plots draw on a
    ``Figure`` with its own Agg canvas and never switch the backend).

    Use it around code that calls ``torch.set_num_threads``::

        with restore_global_state():
            torch.set_num_threads(1)
            ...  # measure
    """
    import torch

    threads = torch.get_num_threads()
    backend = _mpl_backend()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        mpl = sys.modules.get("matplotlib")
        now = _mpl_backend()
        if mpl is not None and now is not None and now != backend:
            if backend is None:  # matplotlib had not chosen one yet: let it choose again
                mpl.rcParams._set("backend", mpl.rcsetup._auto_backend_sentinel)
            else:
                mpl.use(backend, force=True)


def _mpl_backend() -> str | None:
    """matplotlib's selected backend without resolving it (resolving imports pyplot); None if unset or not loaded."""
    mpl = sys.modules.get("matplotlib")
    if mpl is None:
        return None
    getter = getattr(mpl.rcParams, "_get_backend_or_none", None)
    return getter() if getter is not None else mpl.get_backend()


def _cli_type(annotation, name: str):
    """``int | None`` -> ``int``: the one type an option parses (a field allowing several names ``cli_type``)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(kinds) != 1:
            raise TypeError(f"field {name!r} allows {annotation}: give its command-line type as cli_type")
        return kinds[0]
    return annotation


def dataclass_options(cls) -> list[inspect.Parameter]:
    """One keyword typer option per field of the dataclass ``cls`` whose metadata names a ``flag``: that flag,
    the metadata's ``help``, the field's default, and its type (the metadata's ``cli_type``, else the field's
    annotation without None). Fields without a flag are not offered on the command line."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("flag")
        if not flag:
            continue
        if f.default is dataclasses.MISSING:
            raise TypeError(f"field {f.name!r} of {cls.__name__} has no default; a command-line option needs one")
        kind = f.metadata.get("cli_type") or _cli_type(hints[f.name], f.name)
        option = typer.Option(flag, help=f.metadata.get("help"))
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=Annotated[kind, option]
            )
        )
    return params


def with_parameters(params: Sequence[inspect.Parameter]) -> Callable:
    """Decorator: the command's parameters, as typer reads them, are ``params`` (typer passes them as keywords),
    so a command can take generated options (:func:`dataclass_options`) through ``**kwargs``."""

    def decorate(fn):
        fn.__signature__ = inspect.Signature(list(params))
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return fn

    return decorate


#: Model dtypes the running commands take (``--dtype``): weights, activations and the KV cache alike.
MODEL_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_HELP = (
    "Weights, activations and KV cache in this dtype: float32 (default), bfloat16 (CPUs with AVX-512 BF16 or AMX "
    "compute it natively) or float16."
)


def model_loader(dtype: str | None) -> Callable:
    """:func:`gqa.model.load_model` in ``--dtype`` (checked first: a bad name is a one-line error)."""
    from gqa.model import load_model
    from gqa.units import parse_dtype

    dt = parse_dtype(dtype or "float32", allowed=MODEL_DTYPES)
    return functools.partial(load_model, dtype=dt)
