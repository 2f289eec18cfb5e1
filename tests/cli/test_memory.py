"""KV memory arithmetic (`gqa memory`): closed forms for known models, per-layer heads, budgets, errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gqa import GQAConfig
from gqa.cache import PagedKVCache
from gqa.cli import app
from gqa.errors import GQAUserError
from gqa.memory import kv_bytes_per_token, load_kv_shape, memory_report

KiB, GiB = 2**10, 2**30


def llama_config(layers, heads, kv_heads, hidden, ctx=4096, **extra):
    return {
        "model_type": "llama",
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "max_position_embeddings": ctx,
        "vocab_size": 32000,
        **extra,
    }


KNOWN = {  # bf16 KV bytes per token, from 2 x layers x Hkv x head_dim x 2 bytes
    "Llama-2-7B": (llama_config(32, 32, 32, 4096), 512 * KiB),
    "Llama-3-8B": (llama_config(32, 32, 8, 4096, 8192), 128 * KiB),
    "Llama-2-70B": (llama_config(80, 64, 8, 8192), 320 * KiB),
}


@pytest.mark.parametrize("name", list(KNOWN))
def test_closed_form_for_known_models(tmp_path, name):
    cfg, want = KNOWN[name]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for source in (tmp_path, tmp_path / "config.json", cfg):  # folder, file, dict
        rep = memory_report(source, context=1000, batch=3)
        assert rep["kv_bytes_per_token"] == want
        assert rep["kv_bytes_per_sequence"] == 1000 * want
        assert rep["kv_bytes_total"] == 3000 * want
    fp32 = memory_report(cfg, dtype="float32")
    assert fp32["kv_bytes_per_token"] == 2 * want and fp32["context"] == cfg["max_position_embeddings"]


def test_variants_and_budget():
    cfg, per_token = KNOWN["Llama-2-7B"]
    rep = memory_report(cfg, context=4096, batch=2, budget_gib=16)
    rows = {r["variant"]: r for r in rep["variants"]}
    assert rows["MHA"]["kv_bytes_per_token"] == per_token
    assert rows["GQA"]["kv_heads"] == 8 and rows["GQA"]["kv_bytes_per_token"] == per_token // 4
    assert rows["MQA"]["kv_bytes_per_token"] == per_token // 32
    # 16 GiB / (512 KiB x 4096) = 8 sequences of MHA; the g = 4 variant fits 4x the batch
    assert rows["model"]["max_batch"] == 8 and rows["GQA"]["max_batch"] == 32
    assert rows["MHA"]["max_context"] == 16 * GiB // (per_token * 2)
    with pytest.raises(ValueError, match="too small for one sequence"):
        memory_report(cfg, context=4096, budget_gib=1)


def test_per_layer_kv_heads_without_weights(tmp_path):
    # transformers per_layer_config, DeciLM block_configs (with an attention-free block), gqa's own config
    per_layer = llama_config(
        3, 8, 4, 512, per_layer_config={"0": {"num_key_value_heads": 1}, "2": {"num_key_value_heads": 2}}
    )
    assert load_kv_shape(per_layer).kv_heads_per_layer == (1, 4, 2)
    deci = llama_config(
        3,
        8,
        8,
        512,
        block_configs=[
            {"attention": {"n_heads_in_group": 4}},
            {"attention": {"n_heads_in_group": 8}},
            {"attention": {"no_op": True, "n_heads_in_group": None}},
        ],
    )
    shape = load_kv_shape(deci)
    assert shape.kv_heads_per_layer == (2, 1, 0)
    assert kv_bytes_per_token(shape, "bfloat16") == 2 * (2 + 1) * 64 * 2
    ours = GQAConfig(vocab_size=100, d_model=64, n_layers=3, n_heads=8, n_kv_heads=[1, 2, 4], ffn_dim=96)
    ours.save(tmp_path / "gqa.json")
    assert memory_report(tmp_path / "gqa.json", context=10)["kv_bytes_per_token"] == ours.kv_bytes_per_token()
    # and it agrees with the bytes a real paged cache allocates
    pool = PagedKVCache(ours.kv_heads_per_layer, ours.resolved_head_dim, num_pages=3, page_size=5, dtype=torch.bfloat16)
    assert pool.nbytes == 3 * 5 * ours.kv_bytes_per_token(torch.bfloat16)


def test_bad_sources(tmp_path):
    with pytest.raises(GQAUserError, match="does not exist"):
        memory_report(tmp_path / "missing.json")
    with pytest.raises(GQAUserError, match="config.json"):
        memory_report(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        memory_report(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="num_attention_heads"):
        memory_report({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="dtype"):
        memory_report(KNOWN["Llama-3-8B"][0], dtype="float7")
    with pytest.raises(ValueError, match="context"):
        memory_report(KNOWN["Llama-3-8B"][0], context=0)


def test_cli_memory_json_and_table(tmp_path):
    cfg, per_token = KNOWN["Llama-3-8B"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    runner = CliRunner()
    res = runner.invoke(app, ["memory", str(tmp_path), "--context", "8192", "--budget", "24", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["kv_bytes_per_token"] == per_token
    assert out["variants"][0]["max_batch"] == 24 * GiB // (per_token * 8192)
    table = runner.invoke(app, ["memory", str(tmp_path / "config.json"), "--budget", "24"])
    assert table.exit_code == 0 and "128 KiB" in table.output and "MQA" in table.output
    bad = runner.invoke(app, ["memory", str(tmp_path), "--budget", "0.01"])
    assert bad.exit_code == 2 and "too small" in bad.output and bad.output.count("\n") == 1


def _gemma3_config(tmp_path):
    """A Gemma-3-shaped config.json: 18 layers, every 6th global, the others sliding within 512 tokens."""
    cfg = {
        "model_type": "gemma3_text", "vocab_size": 1000, "hidden_size": 640, "intermediate_size": 2048,
        "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "sliding_window": 512, "max_position_embeddings": 32768, "query_pre_attn_scalar": 256,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
    }  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_sliding_layers_hold_at_most_their_window(tmp_path):
    from gqa.memory import memory_report

    rep = memory_report(_gemma3_config(tmp_path), context=32768, dtype="bfloat16")
    per_token_layer = 2 * 1 * 256 * 2  # K and V, 1 KV head of 256, bf16
    assert rep["kv_bytes_per_sequence"] == (3 * 32768 + 15 * 512) * per_token_layer
    short = memory_report(_gemma3_config(tmp_path), context=100)
    assert short["kv_bytes_per_sequence"] == 18 * 100 * per_token_layer  # inside the window every layer holds all
    budget = memory_report(_gemma3_config(tmp_path), context=32768, budget_gib=1.0)
    ctx = budget["variants"][0]["max_context"]
    assert (3 * ctx + 15 * 512) * per_token_layer <= 2**30 < (3 * (ctx + 1) + 15 * 512) * per_token_layer


def test_memory_command_says_the_sliding_layers_stop_growing(tmp_path):
    result = CliRunner().invoke(app, ["memory", str(_gemma3_config(tmp_path)), "--context", "32768"])
    assert result.exit_code == 0, result.output
    assert "15 of 18 layers attend within a window of 512" in " ".join(result.output.split())
