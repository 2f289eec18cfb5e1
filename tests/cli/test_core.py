"""The CLI entry point: help, the core demo, one-line errors."""

from __future__ import annotations

from typer.testing import CliRunner

from gqa.cli import app

runner = CliRunner()


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    assert "demo" in res.output
