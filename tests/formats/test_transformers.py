"""Decoder model: parity with transformers Llama-family models, save/load round trips, cached decoding."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import gqa
from gqa import GQAConfig, GQAForCausalLM, load_hf, save_hf
from gqa.errors import GQAUserError
from gqa.model import config_from_hf, from_transformers

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama-bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"attention_bias": True}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": 6}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
}
KV_VARIANTS = {"MHA": 8, "GQA": 2, "MQA": 1}


def tiny_hf(family: str, n_kv: int, tie: bool = False, seed: int = 0):
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = cfg_cls(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=n_kv,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
        **extra,
    )
    model = model_cls(cfg).eval()
    with torch.no_grad():  # random biases and norms so every tensor matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5).add_(1.0 if "norm" in name else 0.0)
    return model


@pytest.mark.parametrize("variant", list(KV_VARIANTS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_greedy_parity_with_transformers(tmp_path, family, variant):
    hf = tiny_hf(family, KV_VARIANTS[variant])
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    assert ours.config.kv_heads_per_layer == [KV_VARIANTS[variant]] * 2
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=2e-5, rtol=1e-4)
        want = hf.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    assert torch.equal(ours.generate_greedy(ids, 8), want)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_load_round_trip_is_exact(tmp_path, family, tie):
    hf = tiny_hf(family, 2, tie=tie)
    ours = from_transformers(hf)
    save_hf(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    for name, t in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    again = load_hf(tmp_path / "out")
    for name, t in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    assert not list(tmp_path.glob(".out.*")), "temporary folder left behind"


def test_save_refuses_to_overwrite_and_leaves_nothing(tmp_path):
    model = GQAForCausalLM(GQAConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48))
    save_hf(model, tmp_path / "m")
    with pytest.raises(GQAUserError, match="exists; choose another path or pass --force / force=True"):
        save_hf(model, tmp_path / "m")
    save_hf(model, tmp_path / "m", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("n_kv", [8, [8, 2, 1], [4, 4, 1]], ids=["MHA", "var-8-2-1", "var-4-4-1"])
def test_cached_decode_equals_uncached_forward(n_kv):
    cfg = GQAConfig(vocab_size=61, d_model=64, n_layers=3, n_heads=8, n_kv_heads=n_kv, ffn_dim=96, max_seq_len=32)
    model = GQAForCausalLM(cfg).eval()
    ids = torch.randint(0, 61, (2, 14))
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(2, 20)
        parts = [model(ids[:, :5], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(5, 14)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert [c.n_kv_heads for c in cache.layers] == cfg.kv_heads_per_layer
    assert cache.bytes_per_token() == cfg.kv_bytes_per_token(torch.float32)


def test_variable_gqa_round_trip(tmp_path):
    cfg = GQAConfig(vocab_size=61, d_model=64, n_layers=3, n_heads=8, n_kv_heads=[4, 2, 1], ffn_dim=96)
    model = GQAForCausalLM(cfg).eval()
    save_hf(model, tmp_path / "v")
    hf_cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    assert hf_cfg["per_layer_config"] == {
        "0": {"num_key_value_heads": 4},
        "1": {"num_key_value_heads": 2},
        "2": {"num_key_value_heads": 1},
    }
    back = load_hf(tmp_path / "v")
    assert back.config.kv_heads_per_layer == [4, 2, 1]
    ids = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_kv_bytes_per_token_closed_form():
    llama2_7b = GQAConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32)
    llama3_8b = GQAConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336)
    llama2_70b = GQAConfig(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672)
    assert llama2_7b.kv_bytes_per_token(torch.bfloat16) == 512 * 1024
    assert llama3_8b.kv_bytes_per_token(torch.bfloat16) == 128 * 1024
    assert llama2_70b.kv_bytes_per_token(torch.bfloat16) == 320 * 1024
    assert abs(llama2_7b.num_parameters() - 6_738_415_616) == 0


def test_num_parameters_matches_module():
    for cfg in (
        GQAConfig(vocab_size=61, d_model=64, n_layers=3, n_heads=8, n_kv_heads=[4, 2, 1], ffn_dim=96),
        GQAConfig(
            vocab_size=61,
            d_model=64,
            n_layers=2,
            n_heads=8,
            n_kv_heads=2,
            ffn_dim=96,
            tie_embeddings=True,
            qkv_bias=True,
            qk_norm=True,
        ),
    ):
        model = GQAForCausalLM(cfg)
        assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


def test_unsupported_family_and_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="supported: gemma3_text, llama"):
        config_from_hf({"model_type": "gpt2"})
    with pytest.raises(GQAUserError, match="config.json"):
        load_hf(tmp_path)
    hf = tiny_hf("llama", 2)
    hf.save_pretrained(tmp_path / "t")
    shard = next((tmp_path / "t").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="truncated"):
        load_hf(tmp_path / "t")


def test_public_api_exports():
    for name in (
        "attention",
        "masks",
        "GroupedQueryAttention",
        "KVCache",
        "GQAConfig",
        "GQAForCausalLM",
        "reference_attention",
        "load_hf",
        "save_hf",
    ):
        assert hasattr(gqa, name), name


def _llama_cfg(**over) -> dict:
    cfg = {
        "model_type": "llama",
        "vocab_size": 97,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    cfg.update(over)
    return {k: v for k, v in cfg.items() if v is not None}


BAD_CONFIGS = {
    "layers-1e9": ({"num_hidden_layers": 1e9}, "num_hidden_layers"),
    "heads-1e12": ({"num_attention_heads": 1e12}, "num_attention_heads"),
    "kv-negative": ({"num_key_value_heads": -8}, "num_key_value_heads"),
    "heads-zero": ({"num_attention_heads": 0}, "num_attention_heads"),
    "kv-zero": ({"num_key_value_heads": 0}, "num_key_value_heads"),
    "kv-not-dividing": ({"num_key_value_heads": 3}, "divide"),
    "heads-string": ({"num_attention_heads": "8"}, "integer"),
    "heads-fraction": ({"num_attention_heads": 7.5}, "integer"),
    "heads-bool": ({"num_attention_heads": True}, "integer"),
    "heads-missing": ({"num_attention_heads": None}, "'num_attention_heads'"),
    "per-layer-list-short": ({"per_layer_config": [{"num_key_value_heads": 2}]}, "one entry per layer"),
    "per-layer-bad-key": ({"per_layer_config": {"x": {"num_key_value_heads": 2}}}, "layer indices"),
    "per-layer-entry-list": ({"per_layer_config": {"0": [2]}}, "num_key_value_heads"),
    "per-layer-kv-huge": ({"per_layer_config": {"0": {"num_key_value_heads": 1e12}}}, "too large"),
    "hidden-not-dividing": ({"hidden_size": 65}, "head_dim"),
    "context-negative": ({"max_position_embeddings": -1}, "max_position_embeddings"),
    "rope-theta-nan": ({"rope_theta": float("nan")}, "rope_theta"),
    "eps-negative": ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    "flag-string": ({"tie_word_embeddings": "yes"}, "true or false"),
    "eos-string": ({"eos_token_id": "</s>"}, "token id"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_config_integers_are_validated_in_one_place(name):
    """Absurd or malformed config.json values: one GQAUserError line naming the field, before any allocation."""
    over, needle = BAD_CONFIGS[name]
    with pytest.raises(GQAUserError) as info:
        config_from_hf(_llama_cfg(**over))
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_config_json_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(GQAUserError, match="JSON list"):
        load_hf(tmp_path)
    with pytest.raises(GQAUserError, match="JSON object"):
        config_from_hf([1, 2])


def test_per_layer_config_as_a_list_of_layers():
    cfg = config_from_hf(_llama_cfg(per_layer_config=[{"num_key_value_heads": 4}, {"num_key_value_heads": 1}]))
    assert cfg.kv_heads_per_layer == [4, 1]


def _saved(tmp_path, **over) -> tuple:
    hf = tiny_hf("llama", 2)
    hf.save_pretrained(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(over)
    cfg_path.write_text(json.dumps(cfg))
    return tmp_path / "m"


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"num_hidden_layers": 3}, "lacks"),  # a layer the weights do not have
        ({"num_hidden_layers": 1}, "no place for"),  # weights for a layer the config does not have
        ({"intermediate_size": 128}, "shape"),
        ({"num_key_value_heads": 4}, "shape"),
    ],
)
def test_weights_that_do_not_match_the_config_are_refused(tmp_path, over, needle):
    """Missing, unexpected and misshapen tensors are errors, never a partly random model."""
    with pytest.raises(GQAUserError, match=needle):
        load_hf(_saved(tmp_path, **over))


def test_index_may_only_name_files_inside_the_folder(tmp_path):
    folder = _saved(tmp_path)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as sf:
        names = list(sf.keys())
    for shard in ("../m/model.safetensors", str(folder / "model.safetensors"), ""):
        index = {"metadata": {}, "weight_map": {n: shard for n in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(GQAUserError, match="not a bare file name inside the model folder"):
            load_hf(folder)


def test_unknown_stored_dtype_is_an_error_not_fp32(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _saved(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int8)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(GQAUserError, match="stored as I8"):
        load_hf(folder)


def test_tied_embeddings_stay_tied_after_loading(tmp_path):
    hf = tiny_hf("llama", 2, tie=True)
    hf.save_pretrained(tmp_path / "t")
    model = load_hf(tmp_path / "t")
    assert model.lm_head.weight is model.embed.weight


def test_side_files_never_carry_code(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["x.Tok", None]}, "a": 1}))
    (src / "tokenization_x.py").write_text("raise SystemExit\n")
    (src / "generation_config.json").write_text("{}")
    cfg = GQAConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16)
    out = save_hf(GQAForCausalLM(cfg), tmp_path / "out", side_files_from=src)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer_config.json",
    ]
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


@pytest.mark.parametrize("indexed", [True, False])
def test_weights_linked_from_outside_the_folder_are_refused(tmp_path, indexed):
    """A model folder must not make gqa read files elsewhere, through an index or a symlinked shard."""
    import shutil

    folder = _saved(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(folder / "model.safetensors", elsewhere / "model.safetensors")
    (folder / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    if indexed:
        from safetensors import safe_open

        with safe_open(str(elsewhere / "model.safetensors"), framework="pt") as sf:
            names = list(sf.keys())
        index = {"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(GQAUserError, match="outside the model folder"):
        load_hf(folder)

