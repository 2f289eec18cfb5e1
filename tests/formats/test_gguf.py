"""GGUF export: metadata and shapes through gguf.GGUFReader, logits through transformers' GGUF loader (uniform
KV heads) and through gqa's own reader (uniform and per-layer), the tokenizer, and the RoPE row order."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa.errors import GQAUserError
from gqa.formats.gguf import _rope_permute, export_gguf, load_gguf
from gqa.model import GQAConfig, GQAForCausalLM, save_hf
from gqa.progress import quiet_loading

ASSET = Path(__file__).resolve().parents[2] / "src" / "gqa" / "assets" / "shakespeare-mha"  # BPE tokenizer, 2048 ids
IDS = torch.tensor([[5, 900, 17, 2000, 33, 4, 1500, 61, 7, 250, 12, 1999]])
TEXT = "To be, or not to be: that is the question. 1599 <|endoftext|> Ophelia's 'nymph'"


def _model(n_kv_heads, *, tie=False, seed=0, **over) -> GQAForCausalLM:
    torch.manual_seed(seed)
    c = GQAConfig(
        vocab_size=2048, d_model=64, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=96,
        tie_embeddings=tie, bos_token_id=0, eos_token_id=0, max_seq_len=128, **over,
    )
    return GQAForCausalLM(c).eval()


def _fields(path: Path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}, {t.name: t for t in r.tensors}


@pytest.fixture(scope="module")
def uniform(tmp_path_factory):
    """A 4-query / 2-KV-head model saved as an HF folder (with the shipped tokenizer) and exported to f32 GGUF."""
    d = tmp_path_factory.mktemp("gguf")
    m = _model(2)
    folder = save_hf(m, d / "folder", side_files_from=ASSET)
    path = export_gguf(m, d / "m.gguf", tokenizer_dir=folder, dtype="f32")
    return m, folder, path


def test_uniform_metadata_and_shapes(uniform):
    m, _, path = uniform
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not the private temp file's 0600
    f, t = _fields(path)
    assert f["general.architecture"] == "llama"
    assert f["llama.block_count"] == 3 and f["llama.embedding_length"] == 64
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.feed_forward_length"] == 96 and f["llama.rope.dimension_count"] == 16
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == 2048 and f["tokenizer.ggml.eos_token_id"] == 0
    # GGUF lists dims innermost first: attn_k is (d_model, Hkv * D)
    assert list(t["blk.0.attn_k.weight"].shape) == [64, 2 * 16]
    assert list(t["blk.0.attn_q.weight"].shape) == [64, 4 * 16]
    assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "output.weight" in t  # untied


def test_uniform_transformers_loader_matches_folder(uniform):
    m, folder, path = uniform
    with quiet_loading():
        from_gguf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        from_folder = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        a, b, ours = from_gguf.eval()(IDS).logits, from_folder.eval()(IDS).logits, m(IDS)
    # fp32 all the way and the permutation is a pure reordering: the same numbers, the same arithmetic
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(a, ours, rtol=1e-5, atol=1e-5)


def test_uniform_tokenizer_round_trip(uniform):
    _, folder, path = uniform
    with quiet_loading():
        tok_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tok_folder = AutoTokenizer.from_pretrained(folder)
    ids = tok_folder(TEXT).input_ids
    assert tok_gguf(TEXT).input_ids == ids
    assert tok_gguf.decode(ids) == tok_folder.decode(ids)


def test_gqa_reader_round_trip_exact(uniform):
    m, _, path = uniform
    r = load_gguf(path)
    for (k, a), b in zip(m.state_dict().items(), r.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with torch.no_grad():
        torch.testing.assert_close(r(IDS), m(IDS), rtol=0, atol=0)


@pytest.mark.parametrize("dtype,torch_dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_rounds_matrices_only(tmp_path, dtype, torch_dtype):
    m = _model(1, tie=True)
    path = export_gguf(m, tmp_path / "m.gguf", dtype=dtype)
    _, t = _fields(path)
    assert t["blk.1.attn_v.weight"].tensor_type == getattr(gguf.GGMLQuantizationType, dtype.upper())
    assert t["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in t  # tied: llama.cpp and transformers reuse token_embd
    r = load_gguf(path)
    # each matrix is exactly the source rounded to the file's precision; norms are exact
    for (k, a), b in zip(m.state_dict().items(), r.state_dict().values(), strict=True):
        expected = a if a.dim() == 1 else a.to(torch_dtype).float()
        assert torch.equal(b, expected), k
    # the logits then differ from fp32 by the weight rounding only (f16 eps ~1e-3, bf16 ~8e-3)
    with torch.no_grad():
        err = (r(IDS) - m(IDS)).abs().max().item()
    assert 0 < err < 50 * torch.finfo(torch_dtype).eps


def test_f16_through_transformers(tmp_path):
    m = _model(2)
    folder = save_hf(m, tmp_path / "folder", side_files_from=ASSET)
    path = export_gguf(m, tmp_path / "m.gguf", tokenizer_dir=folder, dtype=torch.float16)
    rounded = load_gguf(path)  # the same weights rounded to f16 (see the test above), computed in fp32
    with quiet_loading():
        hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, rounded(IDS), rtol=1e-5, atol=1e-5)


def test_per_layer_heads_write_deci_with_array(tmp_path):
    m = _model([2, 1, 4])
    folder = save_hf(m, tmp_path / "folder", side_files_from=ASSET)
    path = export_gguf(m, tmp_path / "var.gguf", tokenizer_dir=folder, dtype="f32")
    f, t = _fields(path)
    # llama.cpp's llama loader sizes k/v of every layer from layer 0; its deci loader reads the array per layer
    assert f["general.architecture"] == "deci"
    assert f["deci.attention.head_count_kv"] == [2, 1, 4]
    assert f["deci.attention.head_count"] == 4
    for i, h in enumerate([2, 1, 4]):
        assert list(t[f"blk.{i}.attn_k.weight"].shape) == [64, h * 16]
        assert list(t[f"blk.{i}.attn_v.weight"].shape) == [64, h * 16]
    # transformers' GGUF loader has no deci architecture: gqa's own reader is the round trip here
    r = load_gguf(path)
    assert r.config.kv_heads_per_layer == [2, 1, 4]
    with torch.no_grad():
        torch.testing.assert_close(r(IDS), m(IDS), rtol=0, atol=0)


def _rope_halves(x, pos, theta=10000.0):
    """transformers' RoPE on one head vector [D]: rotate (x[i], x[i + D/2]) pairs."""
    d = x.shape[-1]
    freqs = pos / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = freqs.cos(), freqs.sin()
    a, b = x[: d // 2], x[d // 2 :]
    return torch.cat([a * cos - b * sin, a * sin + b * cos])


def _rope_pairs(x, pos, theta=10000.0):
    """llama.cpp's "normal" RoPE on one head vector [D]: rotate adjacent (x[2i], x[2i+1]) pairs."""
    d = x.shape[-1]
    freqs = pos / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = freqs.cos(), freqs.sin()
    a, b = x[0::2], x[1::2]
    out = torch.empty_like(x)
    out[0::2], out[1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def test_permutation_turns_halves_rope_into_pairs_rope():
    """Scores q.k are the same when transformers' RoPE runs on the HF rows and llama.cpp's on the GGUF rows."""
    n_heads, d, d_in = 3, 8, 5
    wq, wk = torch.randn(n_heads * d, d_in, dtype=torch.float64), torch.randn(n_heads * d, d_in, dtype=torch.float64)
    x = torch.randn(d_in, dtype=torch.float64)
    pq, pk = _rope_permute(wq, n_heads), _rope_permute(wk, n_heads)
    for h in range(n_heads):
        rows = slice(h * d, (h + 1) * d)
        hf = _rope_halves(wq[rows] @ x, 7) @ _rope_halves(wk[rows] @ x, 3)
        cpp = _rope_pairs(pq[rows] @ x, 7) @ _rope_pairs(pk[rows] @ x, 3)
        torch.testing.assert_close(cpp, hf, rtol=1e-12, atol=1e-12)
        # and within a head, row 2i comes from row i, row 2i+1 from row i + D/2
        assert torch.equal(pq[rows][0::2], wq[rows][: d // 2]) and torch.equal(pq[rows][1::2], wq[rows][d // 2 :])


def test_refusals_are_one_line_user_errors(tmp_path):
    m = _model(2)
    with pytest.raises(GQAUserError, match="f32, f16 or bf16|not 'q4'"):
        export_gguf(m, tmp_path / "a.gguf", dtype="q4")
    with pytest.raises(GQAUserError, match=r"end in \.gguf"):
        export_gguf(m, tmp_path / "a.bin")
    with pytest.raises(GQAUserError, match="biases"):
        export_gguf(_model(2, qkv_bias=True), tmp_path / "b.gguf")
    with pytest.raises(GQAUserError, match="no tokenizer.json"):
        export_gguf(m, tmp_path / "c.gguf", tokenizer_dir=tmp_path)
    (tmp_path / "d.gguf").write_text("old")
    with pytest.raises(GQAUserError, match="exists"):
        export_gguf(m, tmp_path / "d.gguf")
    assert (tmp_path / "d.gguf").read_text() == "old"
    (tmp_path / "trunc.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(GQAUserError, match="truncated or not GGUF"):
        load_gguf(tmp_path / "trunc.gguf")
    # nothing half-written is left behind by the failed exports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.gguf", "trunc.gguf"]


def test_tokenizer_copied_from_source_gguf(uniform, tmp_path):
    """A model converted from a GGUF takes that file's tokenizer fields as they are (transformers' tokenizer
    rebuilt from a GGUF loses details such as SmolLM2's digit-splitting pre-tokenizer)."""
    _, _, src = uniform
    out = export_gguf(_model([1, 2, 2], seed=1), tmp_path / "var.gguf", tokenizer_dir=src)
    a, _ = _fields(src)
    b, _ = _fields(out)
    tok_a = {k: v for k, v in a.items() if k.startswith("tokenizer.")}
    assert tok_a and tok_a == {k: v for k, v in b.items() if k.startswith("tokenizer.")}
    with pytest.raises(GQAUserError, match="vocab_size"):
        m = GQAForCausalLM(GQAConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48))
        export_gguf(m, tmp_path / "small.gguf", tokenizer_dir=src)
