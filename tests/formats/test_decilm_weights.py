"""A DeciLM folder's weights are checked like any safetensors folder (issue 26): every tensor its config implies
present with its shape, before the model's memory is allocated; a bad ``config.json`` is one line, never a
KeyError or a ZeroDivisionError."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from gqa import GQAConfig, GQAForCausalLM
from gqa.errors import GQAUserError
from gqa.formats.decilm import export_decilm, load_decilm


@pytest.fixture(scope="module")
def deci(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = GQAConfig(vocab_size=61, d_model=64, n_layers=3, n_heads=8, n_kv_heads=[4, 2, 1], ffn_dim=256, max_seq_len=64)
    return export_decilm(GQAForCausalLM(cfg).eval(), tmp_path_factory.mktemp("d") / "deci")


def _copy(src: Path, dst: Path, *, drop=(), reshape=None, config=None) -> Path:
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    for name in drop:
        tensors.pop(name)
    for name, shape in (reshape or {}).items():
        tensors[name] = torch.zeros(shape)
    save_file(tensors, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text()) | (config or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _one_line(folder: Path) -> str:
    with pytest.raises(GQAUserError) as e:
        load_decilm(folder)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_and_misshapen_tensors_are_refused(deci, tmp_path):
    missing = _copy(deci, tmp_path / "a", drop=["model.layers.1.self_attn.k_proj.weight"])
    assert "model.layers.1.self_attn.k_proj.weight" in _one_line(missing)
    wrong = _copy(deci, tmp_path / "b", reshape={"model.layers.2.self_attn.v_proj.weight": (16, 64)})
    msg = _one_line(wrong)
    assert "model.layers.2.self_attn.v_proj.weight has shape (16, 64) but config.json needs (8, 64)" in msg


@pytest.mark.parametrize(
    "config,needle",
    [
        ({"num_hidden_layers": None}, "num_hidden_layers must be an integer"),
        ({"num_attention_heads": 0}, "num_attention_heads must be between 1"),
        ({"num_hidden_layers": 2}, "lists 3 block_configs for 2 layers"),
        ({"hidden_size": "64"}, "hidden_size must be an integer"),
        ({"rope_theta": "big"}, "rope_theta must be a positive number"),
        ({"block_configs": [{"attention": {"n_heads_in_group": 3}, "ffn": {"ffn_mult": 6.0}}] * 3}, "does not divide"),
        ({"block_configs": [{"attention": {"n_heads_in_group": 0}, "ffn": {"ffn_mult": 6.0}}] * 3}, "n_heads_in_group"),
        ({"block_configs": [{"attention": {"n_heads_in_group": 2}}] * 3}, "needs attention and ffn"),
    ],
)
def test_bad_config_is_one_line(deci, tmp_path, config, needle):
    assert needle in _one_line(_copy(deci, tmp_path / "c", config=config))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    drop=st.lists(st.integers(0, 1000), max_size=2),
    reshape=st.lists(
        st.tuples(st.integers(0, 1000), st.lists(st.integers(1, 300), min_size=1, max_size=2)), max_size=2
    ),
)
def test_any_tensor_table_loads_completely_or_is_one_line(deci, drop, reshape):
    names = sorted(load_file(str(deci / "model.safetensors")))
    drop = {names[i % len(names)] for i in drop}
    reshape = {names[i % len(names)]: tuple(s) for i, s in reshape if names[i % len(names)] not in drop}
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy(deci, Path(tmp) / "x", drop=drop, reshape=reshape)
        want = load_file(str(deci / "model.safetensors"))
        changed = drop or any(tuple(want[n].shape) != s for n, s in reshape.items())
        if changed:
            _one_line(folder)
        else:
            assert load_decilm(folder).config.kv_heads_per_layer == [4, 2, 1]


def test_weight_table_check_runs_on_headers_alone(deci):
    """:func:`gqa.formats.transformers.check_weight_table` is the check both folder readers share; it needs only the
    names and shapes a header lists (what a converter reading the headers holds)."""
    from gqa.formats.transformers import check_weight_table, spec_from_config

    config = spec_from_config(json.loads((deci / "config.json").read_text())).model_config()
    shapes = {k: tuple(v.shape) for k, v in load_file(str(deci / "model.safetensors")).items()}
    check_weight_table(config, shapes, deci)
    for name in ("model.norm.weight", "model.layers.2.mlp.gate_proj.weight"):
        with pytest.raises(GQAUserError, match=f"lacks 1 tensors config.json needs, e.g. \\['{name}'\\]"):
            check_weight_table(config, {k: v for k, v in shapes.items() if k != name}, deci)
    with pytest.raises(GQAUserError, match="has shape \\(1,\\) but config.json needs \\(64,\\)"):
        check_weight_table(config, shapes | {"model.norm.weight": (1,)}, deci)
    with pytest.raises(GQAUserError, match="no place for"):
        check_weight_table(config, shapes | {"extra.weight": (1,)}, deci)
