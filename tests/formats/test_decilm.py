"""DeciLM / Nemotron-NAS export: field mapping, round trip with identical logits, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from gqa import GQAConfig, GQAForCausalLM
from gqa.formats.decilm import decilm_config, export_decilm, ffn_mult_for, intermediate_size_for, load_decilm


def variable_model(**kw) -> GQAForCausalLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=61, d_model=64, n_layers=3, n_heads=8, n_kv_heads=[4, 2, 1], ffn_dim=256, max_seq_len=64)
    cfg.update(kw)
    return GQAForCausalLM(GQAConfig(**cfg)).eval()


def test_block_configs_mapping():
    cfg = decilm_config(variable_model().config)
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    groups = [b["attention"]["n_heads_in_group"] for b in cfg["block_configs"]]
    assert groups == [2, 4, 8]  # 8 query heads // (4, 2, 1) KV heads
    assert [8 // g for g in groups] == [4, 2, 1]
    for b in cfg["block_configs"]:
        assert intermediate_size_for(b["ffn"]["ffn_mult"], 64) == 256
        assert b["attention"]["no_op"] is False and b["ffn"]["replace_with_linear"] is False


def test_ffn_mult_of_real_shapes():
    assert ffn_mult_for(1536, 576) == 4.0  # SmolLM2-135M
    assert intermediate_size_for(ffn_mult_for(14336, 4096), 4096) == 14336  # Llama-3-8B
    with pytest.raises(ValueError, match="cannot be expressed"):
        ffn_mult_for(48, 32)


def test_round_trip_keeps_logits_and_per_layer_shapes(tmp_path):
    model = variable_model(tie_embeddings=True)
    export_decilm(model, tmp_path / "deci")
    cfg = json.loads((tmp_path / "deci" / "config.json").read_text())
    assert len(cfg["block_configs"]) == 3
    loaded = load_decilm(tmp_path / "deci")
    assert loaded.config.kv_heads_per_layer == [4, 2, 1]
    assert loaded.layers[2].attn.k_proj.weight.shape == (8, 64)  # 1 KV head x head_dim 8
    ids = torch.randint(0, 61, (2, 12))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_bad_input_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="has no qkv_bias"):
        export_decilm(variable_model(qkv_bias=True), tmp_path / "a")
    with pytest.raises(ValueError, match="cannot be expressed"):
        export_decilm(variable_model(ffn_dim=100), tmp_path / "b")
    with pytest.raises(ValueError, match="implies head_dim"):
        export_decilm(variable_model(head_dim=16), tmp_path / "c")
    assert list(tmp_path.iterdir()) == []
    export_decilm(variable_model(), tmp_path / "d")
    with pytest.raises(ValueError, match="exists"):
        export_decilm(variable_model(), tmp_path / "d")
    with pytest.raises(ValueError, match="no block_configs"):
        (tmp_path / "e").mkdir()
        (tmp_path / "e" / "config.json").write_text("{}")
        load_decilm(tmp_path / "e")
