"""Shared CLI plumbing: one-line errors with a non-zero exit code, and the console."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

# Errors a user can fix: printed as one line, exit code 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, KeyError)


def user_errors(fn):
    """Decorator for CLI commands: a user error becomes ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(130)

    return wrapper
