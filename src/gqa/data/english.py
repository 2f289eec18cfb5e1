"""English text that ships offline: the Python language reference and the READMEs of gqa's dependencies.

Two sources, both present on any machine where gqa is installed:

* ``pydoc``: the standard library's ``pydoc_data/topics.py`` -- the Python language reference and
  library prose that ``help("topic")`` prints (about 80 topics, 460k characters on Python 3.11).
* ``readme``: the long description (the README) in the ``METADATA`` file of each installed
  distribution among :data:`README_PACKAGES` (gqa's own runtime dependencies: torch, transformers,
  numpy, ...). A package missing from the environment is skipped, never an error, and the loaded
  documents are listed by :func:`english_documents`.

Every document has a stable id (``pydoc:<topic>``, ``readme:<package>``). The split is by document and
depends on the id alone: a document is in ``eval`` when the first byte of SHA-256 of its id is below
:data:`EVAL_SHARE` x 256, otherwise in ``train``. So calibration / training text and evaluation text
never share a document, and the split does not change with the order of discovery or with which
other packages are installed. Paragraphs that recur in several documents (pydoc repeats some between
topics) are removed from the training side when an evaluation document holds them. ``calib`` is the same text as ``train`` (calibration is training data
for the conversion); evaluation is only ever on ``eval``.

Data specs (what ``--calib`` and ``--data`` take): ``english:train``, ``english:calib``,
``english:eval`` (both sources) and ``pydoc:train``, ``pydoc:calib``, ``pydoc:eval`` (the standard
library alone: identical on every install of the same Python version).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass

from gqa.errors import GQAUserError

__all__ = [
    "ENGLISH_SOURCES",
    "ENGLISH_SPLITS",
    "EVAL_SHARE",
    "README_PACKAGES",
    "EnglishDocument",
    "english_documents",
    "english_split",
    "is_english_spec",
    "load_english",
]

#: Spec prefixes: ``english`` = pydoc + package READMEs; ``pydoc`` = the standard library's text alone.
ENGLISH_SOURCES = ("english", "pydoc")
#: ``calib`` is an alias of ``train``: both are text the conversion may see; ``eval`` is never seen.
ENGLISH_SPLITS = ("train", "calib", "eval")
#: Fraction of documents (by id hash) held out for evaluation.
EVAL_SHARE = 0.25
#: Distributions whose README (METADATA long description) is used: gqa's runtime dependencies.
README_PACKAGES = (
    "torch",
    "transformers",
    "numpy",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "tqdm",
    "rich",
    "typer",
    "matplotlib",
)

_HTML_LINE = re.compile(r"^\s*(<[^>]*>\s*)+$")  # a line of HTML tags only (logos, badges, <p align=...>)
_BADGE = re.compile(r"\[!\[[^\]]*\]\([^)]*\)\]\([^)]*\)|!\[[^\]]*\]\([^)]*\)")  # markdown images / badges


@dataclass(frozen=True)
class EnglishDocument:
    """One document: ``id`` (``pydoc:<topic>`` or ``readme:<package>``), its text and its split."""

    id: str
    text: str
    origin: str  # where it was read from, e.g. "pydoc_data/topics.py (Python 3.11.7)" or "numpy 2.4.6 METADATA"

    @property
    def split(self) -> str:
        return english_split(self.id)


def english_split(doc_id: str) -> str:
    """``"eval"`` or ``"train"`` for a document id: a function of the id alone (SHA-256), so it is stable."""
    first = hashlib.sha256(doc_id.encode("utf-8")).digest()[0]
    return "eval" if first < EVAL_SHARE * 256 else "train"


def _pydoc_documents() -> list[EnglishDocument]:
    import platform
    from pydoc_data.topics import topics

    origin = f"pydoc_data/topics.py (Python {platform.python_version()})"
    return [EnglishDocument(f"pydoc:{name}", topics[name].strip(), origin) for name in sorted(topics)]


def _readme_text(metadata: str) -> str:
    """The long description of a METADATA file (the body after the headers), badges and HTML lines removed."""
    _, _, body = metadata.partition("\n\n")
    lines = []
    for line in body.splitlines():
        if _HTML_LINE.match(line):
            continue
        lines.append(_BADGE.sub("", line).rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _readme_documents() -> list[EnglishDocument]:
    docs = []
    for package in README_PACKAGES:
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            continue  # listed by english_documents(); the split of the others does not change
        raw = dist.read_text("METADATA") or ""
        text = _readme_text(raw)
        if len(text) >= 200:
            docs.append(EnglishDocument(f"readme:{package}", text, f"{package} {dist.version} METADATA"))
    return docs


@functools.lru_cache(maxsize=4)
def english_documents(source: str = "english") -> tuple[EnglishDocument, ...]:
    """Every document of ``source`` (``english`` or ``pydoc``), pydoc topics first, each group by id."""
    if source not in ENGLISH_SOURCES:
        raise GQAUserError(f"unknown English source {source!r}; use one of {', '.join(ENGLISH_SOURCES)}")
    docs = _pydoc_documents()
    if source == "english":
        docs += _readme_documents()
    return tuple(docs)


def is_english_spec(spec: str) -> bool:
    """True for ``english[:split]`` and ``pydoc[:split]``."""
    return spec.partition(":")[0] in ENGLISH_SOURCES


def load_english(spec: str, *, default_split: str = "train") -> str:
    """The text of ``english:<split>`` / ``pydoc:<split>``: its documents joined by a blank line.

    ``calib`` and ``train`` give the same text; ``eval`` shares no document with them.
    """
    source, _, split = str(spec).partition(":")
    split = split or default_split
    if source not in ENGLISH_SOURCES:
        raise GQAUserError(f"{spec!r} is not an English text spec; use english:<split> or pydoc:<split>")
    if split == "validation":  # what callers ask for by default elsewhere (Shakespeare's name)
        split = "eval"
    if split not in ENGLISH_SPLITS:
        raise GQAUserError(f"unknown split {split!r} in {spec!r}; use one of {', '.join(ENGLISH_SPLITS)}")
    docs = english_documents(source)
    if split == "eval":
        return "\n\n".join(d.text for d in docs if d.split == "eval")
    # Some passages recur across documents (pydoc repeats paragraphs between topics): drop from the
    # training text every paragraph that an evaluation document also contains, so no evaluation
    # passage is ever seen in calibration or training.
    held = {p.strip() for d in docs if d.split == "eval" for p in _paragraphs(d.text)}
    kept = []
    for d in docs:
        if d.split == "train":
            text = "\n\n".join(p for p in _paragraphs(d.text) if p.strip() not in held)
            if text.strip():
                kept.append(text)
    return "\n\n".join(kept)


def _paragraphs(text: str) -> list[str]:
    return re.split(r"\n\s*\n", text)
