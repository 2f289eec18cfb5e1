"""The ``gqa`` command line: thin commands over library functions.

Each command lives in its own module with a ``register(app)`` function; add new modules to
``COMMAND_MODULES``.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="gqa",
    help="Grouped-query attention: convert, uptrain, evaluate, generate and benchmark GQA models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Grouped-query attention: convert, uptrain, evaluate, generate and benchmark GQA models."""


COMMAND_MODULES = ["demo", "convert", "pretrain", "uptrain", "eval", "generate", "memory", "bench"]

for _name in COMMAND_MODULES:
    importlib.import_module(f"gqa.cli.{_name}").register(app)


def main() -> None:
    app()
