"""`gqa --version` and the top-level help, as a newcomer's first commands."""

from __future__ import annotations

import re

from typer.testing import CliRunner

import gqa
from gqa.cli import app


def test_version():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0, r.output
    assert re.fullmatch(rf"gqa {re.escape(gqa.__version__)} \(torch \S+, Python \d+\.\d+\.\d+\)\n", r.output)


def test_help_lists_every_command():
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0, r.output
    for command in ("demo", "convert", "pretrain", "uptrain", "eval", "generate", "memory", "bench"):
        assert re.search(rf"│ {command}\s", r.output), command
    assert "--version" in r.output
