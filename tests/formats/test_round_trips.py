"""Write -> read -> the same config and tensors, once per format: transformers folder, GGUF f32, DeciLM."""

from __future__ import annotations

import pytest
import torch

from gqa.model import GQAConfig, GQAForCausalLM


def _model(kv, **over) -> GQAForCausalLM:
    torch.manual_seed(0)
    cfg = GQAConfig(vocab_size=64, d_model=64, n_layers=3, n_heads=8, n_kv_heads=kv, ffn_dim=256, max_seq_len=64,
                    **over)  # fmt: skip
    model = GQAForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))  # norms start at 1: a dropped or swapped one would pass
    return model


def _same(a: GQAForCausalLM, b: GQAForCausalLM) -> None:
    assert b.config.kv_heads_per_layer == a.config.kv_heads_per_layer
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim", "resolved_head_dim", "tie_embeddings"):
        assert getattr(b.config, field) == getattr(a.config, field), field
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("kv", [2, [4, 2, 1]])
def test_transformers_folder(tmp_path, kv):
    from gqa.formats.transformers import load_hf, save_hf

    model = _model(kv, qkv_bias=True, o_bias=True)
    _same(model, load_hf(save_hf(model, tmp_path / "m")))


@pytest.mark.parametrize("kv", [2, [4, 2, 1]])
def test_gguf_f32(tmp_path, kv):
    pytest.importorskip("gguf")
    from gqa.formats.gguf import export_gguf, load_gguf

    model = _model(kv, tie_embeddings=True)
    _same(model, load_gguf(export_gguf(model, tmp_path / "m.gguf", dtype="f32")))


def test_decilm(tmp_path):
    from gqa.formats.decilm import export_decilm, load_decilm

    model = _model([4, 2, 1])
    _same(model, load_decilm(export_decilm(model, tmp_path / "d")))


def test_no_function_in_formats_is_over_100_lines():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "src" / "gqa" / "formats"
    long = [
        f"{f.name}:{n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for f in root.rglob("*.py")
        for n in ast.walk(ast.parse(f.read_text()))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 100
    ]
    assert len(list(root.rglob("*.py"))) >= 6 and long == []
