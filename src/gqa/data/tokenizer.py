"""Tokenizers: turn text into token ids with a model's own tokenizer, and train the byte-level BPE
that the shipped reference model uses.

Any of these works as ``tokenizer`` argument across gqa: a ``tokenizers.Tokenizer``, a transformers
tokenizer (fast or slow), or a folder holding ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gqa.errors import GQAUserError

__all__ = ["train_bpe_tokenizer", "save_tokenizer", "load_tokenizer", "encode", "vocab_size", "ENDOFTEXT"]

ENDOFTEXT = "<|endoftext|>"


def train_bpe_tokenizer(text: str, vocab_size: int = 2048, *, min_frequency: int = 2):
    """Train a GPT-2 style byte-level BPE on ``text`` (every byte is a base token, so nothing is unknown).

    Returns a ``tokenizers.Tokenizer`` whose id 0 is ``<|endoftext|>``. Deterministic for a given text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise GQAUserError(f"vocab_size={vocab_size} is too small for byte-level BPE; use at least 257 (256 bytes + 1)")
    if not text.strip():
        raise GQAUserError("cannot train a tokenizer on empty text; pass the training split")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Train on lines so the trainer's work splits into many small sequences.
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer, length=text.count("\n") + 1)
    return tok


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that transformers' AutoTokenizer reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_tokenizer(folder: str | Path):
    """The ``tokenizers.Tokenizer`` stored in ``folder/tokenizer.json``."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json" if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass --tokenizer with a folder holding tokenizer.json")
    return Tokenizer.from_file(str(path))


def _backend(tokenizer):
    """The Rust ``tokenizers.Tokenizer`` behind a tokenizer, or None for a slow transformers one."""
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(tokenizer)
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "get_vocab_size"):
        return tokenizer
    return getattr(tokenizer, "backend_tokenizer", None)


def encode(tokenizer, text: str) -> torch.Tensor:
    """``text`` -> token ids [N] (int64), without special tokens (no BOS/EOS added)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    backend = _backend(tokenizer)
    if backend is not None:
        ids = backend.encode(text, add_special_tokens=False).ids
    else:
        ids = tokenizer.encode(text, add_special_tokens=False)
    return torch.tensor(ids, dtype=torch.long)


def leading_bos(tokenizer) -> int | None:
    """The token the tokenizer puts in front of a text when asked for its special tokens (Gemma's BOS),
    or None when it adds none (SmolLM2, GPT-2): what a prompt or an evaluation window starts with."""
    backend = _backend(tokenizer)
    if backend is not None:
        with_special = backend.encode("a", add_special_tokens=True).ids
        plain = backend.encode("a", add_special_tokens=False).ids
    else:
        with_special = tokenizer.encode("a", add_special_tokens=True)
        plain = tokenizer.encode("a", add_special_tokens=False)
    return (
        with_special[0]
        if len(with_special) > len(plain) and with_special[1:] == plain[: len(with_special) - 1]
        else None
    )


def vocab_size(tokenizer) -> int:
    """Number of ids the tokenizer can produce (added tokens included)."""
    backend = _backend(tokenizer)
    if backend is not None:
        return backend.get_vocab_size(with_added_tokens=True)
    return len(tokenizer)
