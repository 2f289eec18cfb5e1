"""The family registry: every capability list derives from the records, and each family's weight maps
cover a tiny random transformers model of that family."""

from __future__ import annotations

import pytest
import transformers

from gqa import families
from gqa.convert import SUPPORTED_MODEL_TYPES
from gqa.errors import GQAUserError
from gqa.formats.gguf import LLAMA_BLOCK_ARCHS
from gqa.formats.transformers import config_from_hf, spec_from_config, weight_map
from helpers import FAMILIES, build


def test_capability_lists_are_queries_on_the_records():
    runs = {f.model_type for f in families.FAMILIES if f.runs}
    assert set(families.names(runs=True)) == runs and "llama" in runs
    assert set(SUPPORTED_MODEL_TYPES) == {f.model_type for f in families.FAMILIES if f.convert is not None}
    assert set(families.names(per_layer=True)) <= set(families.names(convert=True))
    assert set(LLAMA_BLOCK_ARCHS) == {f.gguf_arch for f in families.FAMILIES if f.gguf_layer_extras is not None}
    assert families.by_gguf_arch("deci").model_type == "nemotron-nas"
    assert families.find("gpt2") is None


def test_unknown_and_incapable_families_are_one_line_errors():
    with pytest.raises(GQAUserError, match="supported: gemma, gemma3_text, granite, llama"):
        families.require("gpt2", "convert", "gqa convert")
    with pytest.raises(GQAUserError, match="not supported by gqa.model; supported: gemma3_text, llama, mistral, qwen2, qwen3"):
        config_from_hf({"model_type": "phi3"})


def test_transformers_class_names_exist():
    for f in families.FAMILIES:
        for name in (f.hf_config_class, f.hf_model_class):
            if name is not None and f.model_type != "nemotron-nas":  # DeciLM's class ships with its checkpoints
                assert hasattr(transformers, name), name


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_conversion_weight_map_covers_every_attention_tensor(model_type):
    model = build(model_type, n_kv=2)
    cfg = model.config.to_dict()
    shape = spec_from_config(cfg).attention_shape()
    module = families.get(model_type).convert
    mapped = set()
    for layer in range(shape.n_layers):
        mapped |= set(module.attention_map(cfg, layer, shape))
    names = set(model.state_dict())
    attention = {n for n in names if ".self_attn." in n and not n.endswith("inv_freq")}
    assert mapped == attention


@pytest.mark.parametrize("model_type", [f for f in FAMILIES if families.get(f).runs])
def test_runnable_weight_map_covers_the_model(model_type):
    model = build(model_type, n_kv=2)
    config = config_from_hf(model.config.to_dict())
    names = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_embeddings else set())
    assert set(weight_map(config).values()) == names
