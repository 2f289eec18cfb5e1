"""The one exception type for mistakes a user can fix (bad paths, options, config values).

The CLI prints a :class:`GQAUserError` as one line (``error: ...``) with exit code 2; any other
exception is a bug and keeps its traceback. The message says what is wrong *and* how to fix it.
"""

from __future__ import annotations

__all__ = ["GQAUserError"]


class GQAUserError(ValueError):
    """A problem with the user's input, not with gqa. Subclasses ValueError so library callers that
    catch ValueError keep working."""
