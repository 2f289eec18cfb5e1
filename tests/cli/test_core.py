"""The CLI's shared plumbing (gqa.cli.common): which exceptions become one line with exit code 2, which keep
their traceback, and global state restored after a command."""

from __future__ import annotations

import errno

import pytest
import torch
import typer
from typer.testing import CliRunner

from gqa.cli.common import restore_global_state, user_errors, user_message
from gqa.errors import GQAUserError

runner = CliRunner()


def _app(fn) -> typer.Typer:
    app = typer.Typer()
    app.command()(user_errors(fn))
    return app


@pytest.mark.parametrize(
    "exc,line",
    [
        (GQAUserError("--seq-len 9 is too long;\n use 8"), "error: --seq-len 9 is too long; use 8"),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "m/x"),
            "error: m/x: no such file or directory; check the path",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "out/w"),
            "error: out/w: no space left on device; free some disk space",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/root/x"),
            "error: /root/x: permission denied; check its permissions",
        ),
        (FileExistsError("out exists; pass --force"), "error: out exists; pass --force"),
    ],
)
def test_user_errors_are_one_line_on_stderr_with_exit_code_2(exc, line):
    def cmd():
        raise exc

    res = runner.invoke(_app(cmd), [])
    assert res.exit_code == 2
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(line)


@pytest.mark.parametrize(
    "exc",
    [TypeError("unhashable type: 'list'"), KeyError("num_attention_heads"), ValueError("x"), OSError(errno.EIO, "I/O")],
)
def test_bugs_keep_their_traceback(exc):
    """A bare TypeError/KeyError/ValueError, or an OS error no user caused, is a bug: it propagates."""

    def cmd():
        raise exc

    res = runner.invoke(_app(cmd), [])
    assert res.exit_code == 1 and res.exception is exc
    assert user_message(exc) is None


def test_ctrl_c_exits_130_with_one_line():
    def cmd():
        raise KeyboardInterrupt

    res = runner.invoke(_app(cmd), [])
    assert res.exit_code == 130 and res.stderr.strip() == "error: interrupted"


def test_error_after_a_progress_bar_starts_its_own_line():
    from gqa.progress import progress

    def cmd():
        bar = progress(total=10, desc="work")
        bar.update(3)
        raise GQAUserError("bad input; fix it")

    res = runner.invoke(_app(cmd), [])
    last = res.stderr.rstrip("\n").split("\n")[-1]
    assert res.exit_code == 2 and last == "error: bad input; fix it"


def test_threads_restored_after_a_command_and_on_error():
    before = torch.get_num_threads()

    def cmd():
        torch.set_num_threads(1 if before != 1 else 2)
        raise GQAUserError("stop; here")

    runner.invoke(_app(cmd), [])
    assert torch.get_num_threads() == before
    with restore_global_state():
        torch.set_num_threads(1 if before != 1 else 2)
    assert torch.get_num_threads() == before


def test_matplotlib_backend_restored():
    import matplotlib as mpl  # a dependency of gqa (plots)
    mpl.use("agg")
    with restore_global_state():
        mpl.use("svg")
        assert mpl.get_backend().lower() == "svg"
    assert mpl.get_backend().lower() == "agg"
