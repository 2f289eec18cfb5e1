"""Provenance stamped on every results file and training summary: machine, versions, commit, command, date,
load — one schema and one date format (ISO 8601, UTC) for every results file."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["provenance", "provenance_markdown", "load_average", "git_commit", "cpu_name", "versions", "utc_date"]


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


def utc_date() -> str:
    """Now, in the one date format of results files: ISO 8601, UTC, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    """Versions of python, torch, gqa, transformers and triton (None when not installed)."""
    import importlib.metadata as md

    import gqa

    out = {"python": platform.python_version(), "torch": torch.__version__, "gqa": gqa.__version__}
    for pkg in ("transformers", "triton"):  # read from metadata: importing them is slow and not needed
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        return None


def load_average() -> list[float] | None:
    """The 1/5/15-minute load average now (pass it as ``load_before`` to :func:`provenance`)."""
    return _load()


def provenance(
    command: str | None = None, dtype: str | None = None, *, load_before: list[float] | None = None, **extra
) -> dict:
    """Where and how a result was produced: the one provenance schema of every results file.

    Keys: ``date`` (ISO 8601, UTC, seconds), ``command`` (default: this process's command line),
    ``git_commit``, ``machine`` (device, CPUs visible, torch threads), ``platform``, ``dtype``, ``versions``
    (python, torch, gqa, transformers, triton), ``load_average`` (``before`` — pass ``load_before`` taken with
    :func:`load_average` when the work started — and ``after``, each the 1/5/15-minute averages, with the
    ``cpus`` they compare against), then any ``extra`` keys (e.g. ``device``, ``mode``).
    """
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU: {cpu_name()}"
    return {
        "date": utc_date(),
        "command": command or " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": f"{device}; {os.cpu_count()} logical CPUs visible, torch threads {torch.get_num_threads()}",
        "platform": platform.platform(),
        "dtype": dtype,
        "versions": versions(),
        "load_average": {"before": load_before, "after": _load(), "cpus": os.cpu_count()},
        **extra,
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
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None),
    ]
    load = prov.get("load_average")
    if load:
        fmt = lambda xs: "/".join(f"{x:.2f}" for x in xs) if xs else "not recorded"  # noqa: E731
        lines.append(
            f"- load average (1/5/15 min) before: {fmt(load.get('before'))}; after: {fmt(load.get('after'))} "
            f"on {load.get('cpus')} CPUs"
        )
    for key, val in prov.items():
        if key not in {"date", "command", "git_commit", "machine", "platform", "dtype", "versions", "load_average"}:
            lines.append(f"- {key}: {val}")
    return "\n".join(lines) + "\n"
