"""The one exception type for mistakes a user can fix (bad paths, options, config values).

The CLI prints a :class:`GQAUserError` as one line (``error: ...``) with exit code 2; any other
exception is a bug and keeps its traceback. The message says what is wrong *and* how to fix it.
"""

from __future__ import annotations

__all__ = ["GQAUserError", "first_line"]


class GQAUserError(ValueError):
    """A problem with the user's input, not with gqa. Subclasses ValueError so library callers that
    catch ValueError keep working."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type name when empty), cut to ``limit`` characters:
    the reason quoted inside a one-line error."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
