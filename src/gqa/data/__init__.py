"""Training and evaluation text: files, folders, JSON Lines, the built-in Shakespeare corpus, tokenizers.

``shakespeare_splits()`` gives the plays split by play into train / validation / test (see
:mod:`gqa.data.shakespeare` for which plays); ``load_text(spec)`` reads any data spec
(``shakespeare:validation``, ``english:eval``, a file, a folder, a ``.jsonl``); ``english:*`` is English
prose that ships offline, split so calibration and evaluation never share a document.
"""

from gqa.data.english import EnglishDocument, english_documents, english_split, load_english
from gqa.data.shakespeare import (
    SPLIT_NAMES,
    TEST_PLAYS,
    VALIDATION_PLAYS,
    clean_play_markdown,
    shakespeare_plays,
    shakespeare_splits,
)
from gqa.data.text import load_folder, load_jsonl, load_text
from gqa.data.tokenizer import encode, load_tokenizer, save_tokenizer, train_bpe_tokenizer, vocab_size

__all__ = [
    "shakespeare_splits",
    "shakespeare_plays",
    "clean_play_markdown",
    "VALIDATION_PLAYS",
    "TEST_PLAYS",
    "SPLIT_NAMES",
    "load_text",
    "load_english",
    "english_documents",
    "english_split",
    "EnglishDocument",
    "load_folder",
    "load_jsonl",
    "train_bpe_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
    "encode",
    "vocab_size",
]
