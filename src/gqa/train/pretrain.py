"""Pretraining from scratch: a byte-level BPE trained on the training text, then a GQAConfig model.

``REFERENCE_CONFIG`` / ``REFERENCE_TRAIN`` are the settings of the MHA model shipped in
``gqa/assets/shakespeare-mha`` (see :func:`shipped_model_path`); ``gqa pretrain`` with its defaults
reproduces it.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from gqa.data import encode, load_text, save_tokenizer, train_bpe_tokenizer
from gqa.data.text import held_out_spec
from gqa.model import GQAConfig, GQAForCausalLM
from gqa.model.assets import shipped_model_path
from gqa.train.config import TrainConfig
from gqa.train.loop import TrainResult, check_out_dir, train

__all__ = ["REFERENCE_CONFIG", "REFERENCE_TRAIN", "REFERENCE_VOCAB", "pretrain", "shipped_model_path"]

REFERENCE_VOCAB = 2048
#: The shipped model: 4 layers, 8 query heads and 8 KV heads (MHA) of width 24, tied embeddings.
REFERENCE_CONFIG = GQAConfig(
    vocab_size=REFERENCE_VOCAB,
    d_model=192,
    n_layers=4,
    n_heads=8,
    n_kv_heads=8,
    ffn_dim=512,
    max_seq_len=256,
    tie_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
)
REFERENCE_TRAIN = TrainConfig(
    steps=400,
    seq_len=256,
    batch_size=16,
    lr=2e-3,
    warmup_steps=30,
    min_lr_ratio=0.1,
    weight_decay=0.1,
    eval_every=100,
    eval_tokens=20_000,
    checkpoint_every=50,
)


def pretrain(
    out_dir: str | Path,
    *,
    data: str = "shakespeare:train",
    val_data: str | None = "auto",
    model_config: GQAConfig = REFERENCE_CONFIG,
    train_config: TrainConfig = REFERENCE_TRAIN,
    resume: bool = False,
    device=None,
    progress: bool = True,
) -> TrainResult:
    """Train a tokenizer (``model_config.vocab_size`` byte-level BPE) and a model from scratch.

    The tokenizer is trained on ``data`` only (never on validation text) and saved with the model.
    ``val_data="auto"`` validates on the held-out split of a built-in ``data`` spec and not at all on
    the user's own text (:func:`gqa.data.text.held_out_spec`); None turns validation off.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, resume)
    if val_data == "auto":  # the held-out split of a built-in corpus; none for the user's own text
        val_data = held_out_spec(data)
    text = load_text(data)
    tokenizer = train_bpe_tokenizer(text, vocab_size=model_config.vocab_size)
    train_ids = encode(tokenizer, text)
    val_ids = encode(tokenizer, load_text(val_data, default_split="validation")) if val_data else None
    torch.manual_seed(train_config.seed)
    model = GQAForCausalLM(replace(model_config, max_seq_len=max(model_config.max_seq_len, train_config.seq_len)))
    with tempfile.TemporaryDirectory() as tok_dir:
        save_tokenizer(tokenizer, tok_dir)
        return train(
            model,
            train_ids,
            out_dir,
            train_config,
            val_ids=val_ids,
            resume=resume,
            tokenizer_from=tok_dir,
            device=device,
            progress=progress,
            summary={"kind": "pretrain", "data": str(data), "validation_data": val_data},
            desc="pretrain",
        )
