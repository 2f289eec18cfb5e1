"""One progress style for every long-running gqa operation, and quiet third-party loading.

* :func:`progress` wraps tqdm. On a terminal it draws the usual bar (on stderr). When stderr is not a
  terminal (CI logs, ``nohup``, pipes) it prints a plain line every ``GQA_PROGRESS_INTERVAL`` seconds
  (default 30) and one final line, never carriage returns.
* :func:`quiet_loading` silences transformers' / huggingface_hub's own bars and info logging
  ("Loading weights", "Converting and de-quantizing GGUF tensors") inside a ``with`` block and restores
  their settings afterwards.
* :func:`end_line` moves to a fresh line if a bar is being drawn, so an error message starts on its own line.

Environment: ``GQA_PROGRESS=0`` turns every bar off; ``GQA_PROGRESS_INTERVAL=<seconds>`` sets the period
of the plain lines.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

__all__ = ["Progress", "progress", "quiet_loading", "announce_loading", "load_announced", "end_line", "is_terminal"]

_ACTIVE: list[Progress] = []  # bars currently open, innermost last


def is_terminal(stream: IO[str] | None = None) -> bool:
    """True when ``stream`` (default stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams (pytest capture, notebooks)
        return False


def _enabled_by_env() -> bool:
    return os.environ.get("GQA_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("GQA_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


def _fmt_count(n: float, unit_scale: bool) -> str:
    if not unit_scale:
        return f"{int(n)}" if float(n).is_integer() else f"{n:.1f}"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{int(n)}" if float(n).is_integer() else f"{n:.1f}"


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """A progress bar: ``update(n)``, ``set_postfix(**kv)``, ``write(msg)``, ``close()``; iterable and a context manager.

    Use :func:`progress` to make one. When disabled every method is a no-op (iteration still yields items).
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: float | None = None,
        desc: str = "",
        unit: str = "it",
        unit_scale: bool = False,
        enabled: bool = True,
        leave: bool = True,
        file: IO[str] | None = None,
        interval: float | None = None,
    ) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.unit_scale = unit_scale
        self.enabled = enabled and _enabled_by_env()
        self.file = file
        self.n: float = 0
        self.postfix: dict[str, Any] = {}
        self._start = time.monotonic()
        self._interval = _interval() if interval is None else interval
        self._last_print = self._start
        self._closed = False
        self._tqdm = None
        stream = sys.stderr if file is None else file
        self.terminal = is_terminal(stream)
        if self.enabled and self.terminal:
            from tqdm import tqdm

            self._tqdm = tqdm(
                total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=leave, file=stream, dynamic_ncols=True
            )
        if self.enabled:
            _ACTIVE.append(self)

    # -- plain-line mode ------------------------------------------------------------------------------
    def _line(self, final: bool = False) -> str:
        elapsed = time.monotonic() - self._start
        done = _fmt_count(self.n, self.unit_scale)
        if self.total:
            pct = 100.0 * self.n / self.total
            head = f"{self.desc}: {pct:.0f}% ({done}/{_fmt_count(self.total, self.unit_scale)} {self.unit})"
        else:
            head = f"{self.desc}: {done} {self.unit}"
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [head, f"{_fmt_time(elapsed)} elapsed"]
        if rate > 0:
            parts.append(f"{_fmt_count(rate, self.unit_scale)} {self.unit}/s")
            if self.total and not final and self.n < self.total:
                parts.append(f"about {_fmt_time((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(", ".join(f"{k}={v}" for k, v in self.postfix.items()))
        if final:
            parts.append("done")
        return ", ".join(parts)

    def _emit(self, text: str) -> None:
        stream = sys.stderr if self.file is None else self.file
        print(text, file=stream, flush=True)

    # -- public API -----------------------------------------------------------------------------------
    def update(self, n: float = 1) -> None:
        """Advance by ``n`` units."""
        if not self.enabled or self._closed:
            return
        self.n += n
        if self._tqdm is not None:
            self._tqdm.update(n)
            return
        now = time.monotonic()
        if now - self._last_print >= self._interval:
            self._last_print = now
            self._emit(self._line())

    def set_postfix(self, **values: Any) -> None:
        """Show ``key=value`` pairs after the bar (e.g. the current loss)."""
        if not self.enabled:
            return
        self.postfix = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()}
        if self._tqdm is not None:
            self._tqdm.set_postfix(self.postfix, refresh=False)

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._tqdm is not None:
            self._tqdm.set_description(desc, refresh=False)

    def write(self, message: str) -> None:
        """Print ``message`` on its own line without breaking the bar."""
        if self._tqdm is not None:
            self._tqdm.write(message, file=self._tqdm.fp)
        else:
            self._emit(message)

    def close(self) -> None:
        """Finish the bar (idempotent). In plain-line mode prints one final line if anything was done."""
        if self._closed:
            return
        self._closed = True
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.n > 0:
            self._emit(self._line(final=True))

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this Progress was made without an iterable; call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    unit_scale: bool = False,
    enabled: bool = True,
    leave: bool = True,
    file: IO[str] | None = None,
) -> Progress:
    """Make a progress bar (the one style gqa uses).

    Args:
        iterable: optional; iterating the returned object yields its items and advances the bar.
        total: units of work (``len(iterable)`` by default); ``None`` for an open-ended count.
        desc: short label (``"convert"``, ``"eval"``).
        unit: what is counted (``"tok"``, ``"B"``, ``"step"``); ``unit_scale`` shows k/M/G.
        enabled: ``False`` makes every method a no-op (pass the caller's ``progress`` flag here).
        leave: keep the finished bar on a terminal.
        file: the stream (stderr by default).

    Example::

        with progress(total=n_tokens, desc="eval", unit="tok", unit_scale=True, enabled=show) as bar:
            ...
            bar.update(chunk)
    """
    return Progress(
        iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, enabled=enabled, leave=leave, file=file
    )


def end_line() -> None:
    """Before printing an error: make sure it starts on a fresh line (closes any bar drawn on a terminal)."""
    for bar in reversed(list(_ACTIVE)):
        if bar._tqdm is not None:
            bar.close()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' and huggingface_hub's progress bars and info/warning logs inside the block.

    Their previous settings are restored on exit. Errors still raise as usual. Safe when transformers is not
    installed (then it does nothing).
    """
    restore: list[Any] = []
    try:
        try:
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            bars_on = hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()

            def _restore_transformers() -> None:
                hf_logging.set_verbosity(verbosity)
                if bars_on:
                    hf_logging.enable_progress_bar()

            restore.append(_restore_transformers)
        except ImportError:
            pass
        try:
            # The GGUF de-quantizing bar uses tqdm directly, outside transformers' switch: swap in a silent one.
            import functools

            import transformers.modeling_gguf_pytorch_utils as gguf_utils

            original_tqdm = gguf_utils.tqdm
            gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
            restore.append(lambda: setattr(gguf_utils, "tqdm", original_tqdm))
        except (ImportError, AttributeError):
            pass
        try:
            from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

            hub_was_disabled = are_progress_bars_disabled()
            disable_progress_bars()
            if not hub_was_disabled:
                restore.append(enable_progress_bars)
        except ImportError:
            pass
        yield
    finally:
        for fn in reversed(restore):
            fn()


def load_announced(path, loader, what: str = "model"):
    """``loader(path)`` inside :func:`announce_loading`; None for a None ``path`` (an optional teacher)."""
    if path is None:
        return None
    with announce_loading(path, what):
        return loader(path)


@contextlib.contextmanager
def announce_loading(path, what: str = "model", after_s: float = 2.0) -> Iterator[None]:
    """For a GGUF ``path`` (dequantized tensor by tensor: a minute or more for SmolLM2 on 2 cores), say on
    stderr what is being loaded once it has taken ``after_s`` seconds, and how long it took. A load that
    ends sooner, or fails on a bad file at once, says nothing; so do folders and ``GQA_PROGRESS=0``."""
    import threading
    from pathlib import Path

    name = Path(path).name
    if Path(path).suffix != ".gguf":  # folders load in seconds
        yield
        return
    t0 = time.perf_counter()
    said = threading.Event()

    def say():
        said.set()
        print(f"loading {what} {name} (dequantizing a GGUF)...", file=sys.stderr, flush=True)

    timer = threading.Timer(after_s, say)
    timer.daemon = True
    if _enabled_by_env():
        timer.start()
    try:
        yield
    finally:
        timer.cancel()
    if said.is_set():
        print(f"loaded {name} in {_fmt_time(time.perf_counter() - t0)}", file=sys.stderr, flush=True)
