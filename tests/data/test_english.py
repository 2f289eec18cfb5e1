"""English text that ships offline (gqa.data.english): calibration and evaluation text disjoint, splits
deterministic and stable, specs through load_text, bad specs as one-line user errors."""

from __future__ import annotations

import hashlib

import pytest

from gqa.data import english_documents, english_split, load_english, load_text
from gqa.data.english import EVAL_SHARE, README_PACKAGES, _readme_text
from gqa.errors import GQAUserError


@pytest.mark.parametrize("source", ["english", "pydoc"])
def test_calibration_and_evaluation_are_disjoint(source):
    docs = english_documents(source)
    train = [d for d in docs if d.split == "train"]
    held = [d for d in docs if d.split == "eval"]
    assert train and held and len(train) + len(held) == len(docs)
    assert not {d.id for d in train} & {d.id for d in held}
    train_text, eval_text = load_english(f"{source}:calib"), load_english(f"{source}:eval")
    assert train_text == load_english(f"{source}:train")  # calib is the training text
    # No evaluation paragraph of any length appears in the calibration text.
    paragraphs = [p for d in held for p in d.text.split("\n\n") if len(p) > 200]
    assert paragraphs and not [p for p in paragraphs if p in train_text]
    assert len(eval_text) > 40_000 and len(train_text) > 5 * len(eval_text)  # enough for 8k+ eval tokens


def test_split_is_a_function_of_the_document_id_alone():
    for doc in english_documents("english"):
        first = hashlib.sha256(doc.id.encode()).digest()[0]
        assert doc.split == ("eval" if first < EVAL_SHARE * 256 else "train")
    assert english_split("pydoc:assert") == english_split("pydoc:assert")
    # pydoc's documents are split the same whether or not the package READMEs are added.
    pydoc_only = {d.id: d.split for d in english_documents("pydoc")}
    both = {d.id: d.split for d in english_documents("english") if d.id.startswith("pydoc:")}
    assert pydoc_only == both


def test_sources_are_what_the_docstring_says():
    ids = [d.id for d in english_documents("english")]
    assert all(i.startswith(("pydoc:", "readme:")) for i in ids)
    readmes = {i.split(":", 1)[1] for i in ids if i.startswith("readme:")}
    assert readmes and readmes <= set(README_PACKAGES)
    assert {"torch", "transformers", "numpy"} <= readmes  # gqa's own dependencies are always installed
    assert all("METADATA" in d.origin for d in english_documents("english") if d.id.startswith("readme:"))


def test_readme_cleaning_drops_headers_badges_and_html_lines():
    raw = (
        "Metadata-Version: 2.1\nName: x\n\n<p align='center'><img src='logo.png'></p>\n[![ci](b.svg)](u) Text stays.\n"
    )
    assert _readme_text(raw) == "Text stays."


def test_load_text_specs_and_errors():
    assert load_text("english:eval") == load_english("english:eval")
    assert load_text("pydoc", default_split="validation") == load_english("pydoc:eval")
    assert load_text("english") == load_english("english:train")
    for bad, message in (("english:test", "unknown split"), ("pydoc:", None)):
        if message is None:
            assert load_text(bad) == load_english("pydoc:train")  # empty split means the default
            continue
        with pytest.raises(GQAUserError, match=message) as e:
            load_text(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(GQAUserError, match="unknown English source"):
        english_documents("latin")
