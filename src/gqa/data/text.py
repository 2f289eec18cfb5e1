"""Text sources: plain-text files, folders of them, JSON Lines, and the built-in Shakespeare splits.

A data *spec* (what ``--data`` takes on the command line) is one of:

* ``shakespeare`` or ``shakespeare:<split>`` with split ``train`` / ``validation`` / ``test``
  (``shakespeare`` alone means the split the caller asks for by default);
* ``english:<split>`` or ``pydoc:<split>`` with split ``train`` (= ``calib``) / ``eval``: English prose
  that ships offline (the Python language reference, dependencies' READMEs), split by document so
  calibration and evaluation never overlap (see :mod:`gqa.data.english`);
* a text file (any extension except ``.jsonl``), read as UTF-8;
* a ``.jsonl`` file: one JSON object per line, its ``"text"`` field is used (other fields ignored);
* a folder: every ``*.txt``, ``*.md`` and ``*.jsonl`` file below it, in sorted path order.

Documents are joined with a blank line.
"""

from __future__ import annotations

import json
from pathlib import Path

from gqa.data.english import is_english_spec, load_english
from gqa.data.shakespeare import SPLIT_NAMES, shakespeare_splits
from gqa.errors import GQAUserError

__all__ = ["load_text", "held_out_spec", "load_jsonl", "load_folder", "DOC_SEPARATOR", "FOLDER_SUFFIXES"]

DOC_SEPARATOR = "\n\n"
FOLDER_SUFFIXES = (".txt", ".md", ".jsonl")


def load_jsonl(path: str | Path, field: str = "text") -> list[str]:
    """The ``field`` of every JSON object in a JSON Lines file (blank lines are skipped)."""
    path = Path(path)
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise GQAUserError(
                    f"{path}:{lineno} is not valid JSON ({e.msg}); write one JSON object per line"
                ) from None
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise GQAUserError(
                    f'{path}:{lineno} has no string "{field}" field; write {{"{field}": "..."}} per line'
                )
            docs.append(obj[field])
    return docs


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return load_jsonl(path)
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        raise GQAUserError(f"{path} is not UTF-8 text; convert it with iconv or pass a .txt/.jsonl file") from None


def load_folder(folder: str | Path) -> list[str]:
    """Every ``.txt``, ``.md`` and ``.jsonl`` document below ``folder``, in sorted path order."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in FOLDER_SUFFIXES)
    if not files:
        raise GQAUserError(f"{folder} holds no {', '.join(FOLDER_SUFFIXES)} files; point --data at text files")
    return [doc for p in files for doc in _read_file(p)]


def held_out_spec(spec: str | Path) -> str | None:
    """The held-out split that matches a built-in training spec (``shakespeare:validation`` for
    ``shakespeare[:split]``, ``<source>:eval`` for ``english``/``pydoc``), or None for the user's own text:
    validation never defaults to a corpus the user did not ask for."""
    s = str(spec)
    if s == "shakespeare" or s.startswith("shakespeare:"):
        return "shakespeare:validation"
    if is_english_spec(s):
        return f"{s.partition(':')[0]}:eval"
    return None


def _check_not_shadowed(spec: str) -> None:
    """A local file or folder named like a built-in corpus (``english``, ``shakespeare:train``) is ambiguous."""
    if Path(spec).exists():
        raise GQAUserError(
            f"{spec!r} names both a built-in corpus and a file or folder here; pass ./{spec} for the file"
        )


def load_text(spec: str | Path, *, default_split: str = "train") -> str:
    """The text behind a data spec (see the module docstring), as one string.

    ``default_split`` is used when the spec is plain ``shakespeare``.
    Raises ValueError for an unknown split or empty data, FileNotFoundError for a missing path.
    """
    s = str(spec)
    if s == "shakespeare" or s.startswith("shakespeare:") or is_english_spec(s):
        _check_not_shadowed(s)
    if s == "shakespeare" or s.startswith("shakespeare:"):
        split = s.partition(":")[2] or default_split
        if split not in SPLIT_NAMES:
            raise GQAUserError(f"unknown Shakespeare split {split!r}; use one of {', '.join(SPLIT_NAMES)}")
        return shakespeare_splits()[split]
    if is_english_spec(s):
        return load_english(s, default_split=default_split)
    path = Path(s).expanduser()
    if path.is_dir():
        docs = load_folder(path)
    elif path.is_file():
        docs = _read_file(path)
    else:
        raise FileNotFoundError(f"data {s!r} is neither a file, a folder nor shakespeare[:split]; check the path")
    text = DOC_SEPARATOR.join(d for d in docs if d.strip())
    if not text.strip():
        raise GQAUserError(f"data {s!r} is empty; give a file or folder with text in it")
    return text
