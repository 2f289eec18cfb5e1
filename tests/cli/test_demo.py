"""gqa demo on the shipped model, shrunk to seconds: conversion, uptraining, table and plot."""

from __future__ import annotations

import math

import pytest
from rich.console import Console
from typer.testing import CliRunner

from gqa.cli import app
from gqa.demo import run_demo
from gqa.model import load_hf
from gqa.train import shipped_model_path


def test_shipped_model_is_small_mha_with_its_tokenizer():
    path = shipped_model_path()
    model = load_hf(path)
    assert model.config.n_heads == 8 and model.config.kv_heads_per_layer == [8] * model.config.n_layers
    assert 4 <= model.config.n_layers <= 6
    assert sum(f.stat().st_size for f in path.iterdir()) <= 10 * 2**20
    assert (path / "tokenizer.json").is_file() and (path / "training.json").is_file()


def test_demo_small(tmp_path):
    console = Console(record=True, width=140)
    rows = run_demo(
        kv_heads=(2,), fraction=0.01, eval_tokens=2048, plot=tmp_path / "demo.png", console=console, progress=False
    )
    mha, gqa2 = rows
    assert (mha.kv_heads, gqa2.kv_heads) == (8, 2)
    assert gqa2.kv_bytes_per_token * 4 == mha.kv_bytes_per_token
    assert mha.ppl_converted < gqa2.ppl_converted  # pooling K/V heads costs quality...
    assert gqa2.ppl_uptrained < gqa2.ppl_converted  # ...and uptraining wins some back
    assert all(math.isfinite(r.decode_tokens_per_s) and r.decode_tokens_per_s > 0 for r in rows)
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "GQA-2" in console.export_text()


def test_demo_bad_input(tmp_path):
    with pytest.raises(ValueError, match="must divide"):
        run_demo(kv_heads=(3,), plot=None)
    res = CliRunner().invoke(app, ["demo", "--fraction", "2"])
    assert res.exit_code == 2 and "(0, 1]" in res.output
    res = CliRunner().invoke(app, ["demo", "--plot", str(tmp_path / "x.jpg")])
    assert res.exit_code == 2 and ".png" in res.output
