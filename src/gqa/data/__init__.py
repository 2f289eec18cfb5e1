"""Training and evaluation text: files, folders, JSON Lines, the built-in Shakespeare corpus, tokenizers.

``shakespeare_splits()`` gives the plays split by play into train / validation / test (see
:mod:`gqa.data.shakespeare` for which plays); ``load_text(spec)`` reads any data spec
(``shakespeare:validation``, a file, a folder, a ``.jsonl``).
"""

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
    "load_folder",
    "load_jsonl",
    "train_bpe_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
    "encode",
    "vocab_size",
]
