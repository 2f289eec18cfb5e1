"""Provenance stamped on every results file and training summary: machine, versions, commit, command, date."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["provenance", "provenance_markdown", "git_commit", "cpu_name"]


def git_commit(paths: list[str] | None = None) -> str:
    """Short commit of the repository this module lives in, marked ``+local-changes`` when tracked files
    (only those under ``paths``, if given) differ from it."""
    repo = Path(__file__).resolve().parents[2]  # src/gqa/provenance.py -> repository root
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        commit = out.stdout.strip()
        if not commit:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--", *(paths or [])],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return commit + ("+local-changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(command: str | None = None, dtype: str | None = None) -> dict:
    """Where and how a result was produced. ``command`` defaults to this process's command line."""
    import transformers

    import gqa

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU: {cpu_name()}"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command or " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": f"{device}; {os.cpu_count()} logical CPUs visible, torch threads {torch.get_num_threads()}",
        "platform": platform.platform(),
        "dtype": dtype,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gqa": gqa.__version__,
        },
    }


def provenance_markdown(prov: dict) -> str:
    """The provenance dict as a markdown bullet list."""
    v = prov["versions"]
    lines = [
        f"- date: {prov['date']}",
        f"- command: `{prov['command']}`",
        f"- git commit: {prov['git_commit']}",
        f"- machine: {prov['machine']} ({prov['platform']})",
        f"- dtype: {prov.get('dtype') or 'float32'}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
    ]
    return "\n".join(lines) + "\n"
