"""GQA -> MHA (any Hkv -> a multiple of Hkv dividing Hq): K/V heads replicated in the streaming path, exact.

New KV head j is old head j // r (r = N / Hkv), so query head h reads a copy of old head
h // (Hq / Hkv): every attention score, hence every logit, is computed from the same numbers.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from gqa.cli import app
from gqa.convert import convert
from helpers import TOKENS, D, build, save

# Families with every kind of head layout: separate projections with biases (qwen2), per-head layer
# norms (stablelm), a fused qkv projection (phi3), a norm over all KV heads (olmo2), q/k norms (qwen3).
EXPAND_FAMILIES = ["llama", "qwen2", "qwen3", "stablelm", "phi3", "olmo2"]


@pytest.mark.parametrize("model_type", EXPAND_FAMILIES)
def test_expansion_keeps_logits(model_type, tmp_path):
    model = build(model_type, n_kv=2)
    src = save(model, tmp_path / "src")
    out = tmp_path / "mha"
    report = convert(src, out, kv_heads=8, progress=False)  # 2 -> 8 = Hq: MHA
    assert report.path == "streaming" and report.kv_heads_after == [8, 8]
    assert report.groups[0] == [[0], [0], [0], [0], [1], [1], [1], [1]]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 8
    # The weights are exact copies (next test); the function is the same. What differs is only the order of
    # sums inside BLAS (a K projection 4x wider is blocked differently), so: in float64 the logits agree to
    # 1e-12, and in float32 the difference is within PyTorch's own float32 error on the source model.
    want64, got64 = run(src, torch.float64), run(out, torch.float64)
    # OLMo2's k_norm spans all KV heads and transformers computes it in float32 even in a float64 model:
    # replicated heads give the same mean square, summed in another order at float32 precision.
    tol = 1e-6 if model_type == "olmo2" else 1e-12
    torch.testing.assert_close(got64, want64, rtol=0, atol=tol)
    want32, got32 = run(src, torch.float32), run(out, torch.float32)
    own_error = (want32.double() - want64).abs().max().item()
    assert (got32 - want32).abs().max().item() <= 2 * own_error + 1e-7


def run(folder, dtype):
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=dtype).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def test_replicated_heads_are_copies(tmp_path):
    model = build("llama", n_kv=2)
    out = tmp_path / "kv4"
    convert(save(model, tmp_path / "src"), out, kv_heads=4, merge="random", progress=False)  # merge is moot
    conv = AutoModelForCausalLM.from_pretrained(out)
    old = model.model.layers[1].self_attn.k_proj.weight
    new = conv.model.layers[1].self_attn.k_proj.weight  # (4*D, d): heads 0, 0, 1, 1
    for j in range(4):
        assert torch.equal(new[j * D : (j + 1) * D], old[(j // 2) * D : (j // 2 + 1) * D])
    assert torch.equal(conv.model.layers[1].self_attn.q_proj.weight, model.model.layers[1].self_attn.q_proj.weight)


def test_per_layer_expand_and_merge_in_one_pass(tmp_path):
    """Layer 0 expanded to MHA, layer 1 merged to MQA, in one streaming conversion; gqa loads it back."""
    from gqa.model import load_hf

    model = build("llama", n_kv=2)
    src = save(model, tmp_path / "src")
    out = tmp_path / "mixed"
    report = convert(src, out, kv_heads_per_layer="8,1", progress=False)
    assert report.path == "streaming" and report.kv_heads_after == [8, 1]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["per_layer_config"] == {"0": {"num_key_value_heads": 8}, "1": {"num_key_value_heads": 1}}
    ours = load_hf(out)
    assert ours.config.kv_heads_per_layer == [8, 1]
    # Layer 0 alone expanded (layer 1 untouched) gives the source's logits in gqa's own model (float64).
    convert(src, tmp_path / "l0", kv_heads_per_layer=[8, 2], progress=False)
    with torch.no_grad():
        ref = load_hf(src, dtype=torch.float64)(TOKENS)
        got = load_hf(tmp_path / "l0", dtype=torch.float64)(TOKENS)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_per_layer_heads_are_refused_for_families_gqa_cannot_load(tmp_path):
    src = save(build("phi3", n_kv=2), tmp_path / "src")
    r = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out"), "--kv-heads-per-layer", "8,2"])
    assert r.exit_code == 2 and "one --kv-heads for every layer" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("kv,needle", [("3", "is not a multiple"), ("6", "is not a multiple"), ("16", "exceeds")])
def test_non_multiples_are_refused_with_one_line(kv, needle, tmp_path):
    src = save(build("llama", n_kv=2), tmp_path / "src")
    r = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out"), "--kv-heads", kv])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.stderr
    assert "choose one of [1, 2, 4, 8]" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
