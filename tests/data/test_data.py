"""gqa.data: the Shakespeare corpus (cleaning, fixed play splits), text/folder/jsonl loaders, tokenizers."""

from __future__ import annotations

import json

import pytest

from gqa.data import (
    TEST_PLAYS,
    VALIDATION_PLAYS,
    clean_play_markdown,
    encode,
    load_text,
    load_tokenizer,
    save_tokenizer,
    shakespeare_plays,
    shakespeare_splits,
    train_bpe_tokenizer,
    vocab_size,
)

# Markdown hard line breaks are two trailing spaces, written here as BR.
BR = "  "
MARKDOWN = "\n".join(
    [
        "# Macbeth",
        "",
        "## ACT I",
        "",
        "### SCENE II. A camp near Forres.",
        "",
        "_Alarum within. Enter DUNCAN,",
        "meeting a bleeding Sergeant_",
        "",
        "**DUNCAN**" + BR,
        "What bloody man is that?" + BR,
        "__\\[Aside]_ He can report\\--",
        "",
        "",
        "**First Witch**" + BR,
        "Anon.",
        "",
    ]
)


def test_clean_play_markdown_strips_markup_and_keeps_text():
    assert clean_play_markdown(MARKDOWN) == (
        "Macbeth\n\nACT I\n\nSCENE II. A camp near Forres.\n\n"
        "Alarum within. Enter DUNCAN,\nmeeting a bleeding Sergeant\n\n"
        "DUNCAN:\nWhat bloody man is that?\n[Aside] He can report--\n\n"
        "First Witch:\nAnon.\n"
    )


def test_splits_are_by_play_disjoint_and_clean():
    splits = shakespeare_splits()
    assert list(splits) == ["train", "validation", "test"]
    plays = shakespeare_plays()
    assert len(plays) >= 37
    for name in VALIDATION_PLAYS:
        assert plays[name] in splits["validation"] and plays[name] not in splits["train"]
    for name in TEST_PLAYS:
        assert plays[name] in splits["test"] and plays[name] not in splits["train"]
    # A line unique to Macbeth (validation) never leaks into train or test.
    assert "Fair is foul, and foul is fair" in splits["validation"]
    assert "Fair is foul, and foul is fair" not in splits["train"] + splits["test"]
    assert "To be, or not to be" in splits["train"]  # Hamlet trains
    for text in splits.values():
        assert "**" not in text and "_" not in text and "\\" not in text
        assert not any(line.startswith("#") for line in text.splitlines())
    assert len(splits["train"]) > 10 * len(splits["validation"]) > 0


def test_load_text_sources(tmp_path):
    assert load_text("shakespeare:validation") == shakespeare_splits()["validation"]
    assert load_text("shakespeare", default_split="test") == shakespeare_splits()["test"]
    (tmp_path / "a.txt").write_text("first doc")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.jsonl").write_text(
        json.dumps({"text": "second", "id": 1}) + "\n\n" + json.dumps({"text": "third"}) + "\n"
    )
    (sub / "ignored.bin").write_bytes(b"\x00\xff")
    assert load_text(tmp_path / "a.txt") == "first doc"
    assert load_text(sub / "b.jsonl") == "second\n\nthird"
    assert load_text(tmp_path) == "first doc\n\nsecond\n\nthird"


def test_load_text_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown Shakespeare split"):
        load_text("shakespeare:dev")
    with pytest.raises(FileNotFoundError, match="neither a file"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no string \"text\""):
        load_text(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_text(tmp_path / "broken.jsonl")
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load_text(empty_dir)


def test_bpe_tokenizer_round_trips_and_loads_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    text = shakespeare_plays()["macbeth"]
    tok = train_bpe_tokenizer(text, vocab_size=400)
    assert vocab_size(tok) == 400
    sample = "When shall we three meet again\n  In thunder, lightning — or in rain? 🌩"
    ids = encode(tok, sample)
    assert tok.decode(ids.tolist()) == sample  # byte-level: nothing is unknown
    assert len(encode(tok, text)) < 0.6 * len(text.encode())  # merges learned something
    save_tokenizer(tok, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert encode(hf, sample).tolist() == ids.tolist()
    assert encode(load_tokenizer(tmp_path), sample).tolist() == ids.tolist()
    assert encode(tmp_path, sample).tolist() == ids.tolist()
    with pytest.raises(ValueError, match="empty"):
        train_bpe_tokenizer(" ")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nope")
