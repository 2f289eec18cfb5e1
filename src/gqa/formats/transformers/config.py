"""A transformers ``config.json``: read into a :class:`~gqa.formats.spec.CheckpointSpec` and into a
:class:`~gqa.model.config.GQAConfig`, and written from one.

The one reader of a config dict (:func:`spec_from_config`): transformers configs of any family with
heads (nested ``text_config`` too, per-layer KV heads in ``per_layer_config`` or a per-layer
``num_key_value_heads`` list, DeciLM / Nemotron-NAS ``block_configs``) and gqa's own ``GQAConfig`` JSON.
Which families run, and how their configs map, is :mod:`gqa.families`'s.
"""

from __future__ import annotations

from gqa import families
from gqa.errors import GQAUserError
from gqa.formats.spec import CheckpointSpec, per_layer_kv_heads, required
from gqa.model.config import GQAConfig, check_int, check_kv_heads

__all__ = ["spec_from_config", "config_from_hf", "config_to_hf", "model_type_for", "kv_heads_of"]


def _head_dim(cfg: dict, n_heads: int) -> int:
    if cfg.get("head_dim") is not None:
        if "hidden_size" in cfg:
            check_int("d_model", cfg["hidden_size"], field="hidden_size")
        return check_int("head_dim", cfg["head_dim"], field="head_dim")
    d_model = check_int("d_model", required(cfg, "hidden_size"), field="hidden_size")
    if d_model % n_heads:
        raise GQAUserError(
            f"hidden_size={d_model} is not divisible by num_attention_heads={n_heads} and there is no head_dim; fix config.json"
        )
    return d_model // n_heads


def kv_heads_of(cfg: dict, n_heads: int, n_layers: int) -> list[int]:
    """KV heads per layer of a transformers config: ``num_key_value_heads`` (one, or one per layer; default
    one per query head), overridden by ``per_layer_config`` or DeciLM ``block_configs``; each checked and
    dividing ``n_heads`` (0: a layer without attention)."""
    kv_field = cfg.get("num_key_value_heads")
    if isinstance(kv_field, list):  # some configs list one entry per layer
        if len(kv_field) != n_layers:
            raise GQAUserError(
                f"num_key_value_heads lists {len(kv_field)} layers but num_hidden_layers is {n_layers}; fix the config"
            )
        heads = [check_int("n_kv_heads", h, minimum=0, field="num_key_value_heads") for h in kv_field]
    else:
        n_kv = n_heads if kv_field is None else check_int("n_kv_heads", kv_field, field="num_key_value_heads")
        heads = [n_kv] * n_layers
    if cfg.get("per_layer_config") is not None:
        heads = per_layer_kv_heads(cfg, n_layers, heads[0])
    if cfg.get("block_configs") is not None:
        from gqa.formats.decilm import read_blocks

        heads = [b.kv_heads for b in read_blocks(cfg["block_configs"], n_heads, n_layers)]
    check_kv_heads(n_heads, heads, field="num_key_value_heads", allow_zero=True)
    return heads


def _build(spec: CheckpointSpec) -> GQAConfig:
    return GQAConfig(**families.get(spec.family).config_from_hf(spec.raw, spec))


def spec_from_config(cfg, source: str = "config.json") -> CheckpointSpec:
    """The one reader of a config dict -> :class:`CheckpointSpec`, every size checked (one-line errors
    naming the field). Its ``model_config()`` works for the families gqa runs."""
    if not isinstance(cfg, dict):
        raise GQAUserError(f"config.json must hold a JSON object, got a {type(cfg).__name__}; restore it")
    if "n_heads" in cfg and "d_model" in cfg:  # gqa's own GQAConfig
        c = GQAConfig.from_dict(cfg)
        heads = tuple(c.kv_heads_per_layer)
        return CheckpointSpec(source, "gqa", c.n_layers, c.n_heads, heads, c.resolved_head_dim, c.max_seq_len, cfg,
                              lambda spec: c)  # fmt: skip
    family = cfg.get("model_type")
    if "num_attention_heads" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]  # multimodal configs nest the language model's
    n_heads = check_int("n_heads", required(cfg, "num_attention_heads"), field="num_attention_heads")
    n_layers = check_int("n_layers", required(cfg, "num_hidden_layers"), field="num_hidden_layers")
    kv = kv_heads_of(cfg, n_heads, n_layers)
    head_dim = _head_dim(cfg, n_heads)
    ctx = cfg.get("max_position_embeddings")
    ctx = cfg.get("seq_length") if ctx is None else ctx
    ctx = None if ctx is None else check_int("max_seq_len", ctx, field="max_position_embeddings")
    record = families.find(family)
    build = _build if record is not None and record.config_from_hf is not None else None
    if record is not None and cfg.get("block_configs") is not None:
        from gqa.formats.decilm import build_config as build
    return CheckpointSpec(source, family, n_layers, n_heads, tuple(kv), head_dim, ctx, cfg, build)


def config_from_hf(cfg) -> GQAConfig:
    """A transformers ``config.json`` dict of a family gqa runs -> :class:`GQAConfig`.

    Every integer is checked (positive, bounded, heads dividing) before anything is allocated; a bad value
    is a one-line :class:`GQAUserError` naming the config.json field.
    """
    if not isinstance(cfg, dict):
        raise GQAUserError(f"config.json must hold a JSON object, got a {type(cfg).__name__}; restore it")
    family = families.find(cfg.get("model_type"))
    if family is None or not family.runs:
        raise GQAUserError(
            f"model_type {cfg.get('model_type')!r} is not supported by gqa.model; supported: "
            f"{', '.join(families.names(runs=True))}"
        )
    return spec_from_config(cfg).model_config()


def model_type_for(config: GQAConfig) -> str:
    """The transformers ``model_type`` a :class:`GQAConfig` saves as (a family's ``saves`` predicate first,
    then the Llama-block rules), or a one-line error for a combination no family has."""
    for f in families.FAMILIES:
        if f.saves is not None and f.saves(config):
            return f.model_type
    if config.qk_norm:
        if config.qkv_bias != config.o_bias or config.mlp_bias:
            raise GQAUserError("qk_norm models save as qwen3, which needs qkv_bias == o_bias and no mlp_bias")
        return "qwen3"
    if config.qkv_bias and not config.o_bias:
        if config.mlp_bias:
            raise GQAUserError("qkv-bias-only models save as qwen2, which has no mlp_bias")
        return "qwen2"
    if config.qkv_bias != config.o_bias:
        raise GQAUserError("an o_proj bias without q/k/v biases has no transformers Llama-family layout")
    return "mistral" if config.sliding_window else "llama"


def config_to_hf(config: GQAConfig) -> dict:
    """:class:`GQAConfig` -> a transformers ``config.json`` dict of the family it saves as."""
    mt = model_type_for(config)
    family = families.get(mt)
    if family.config_to_hf is not None:
        return family.config_to_hf(config)
    heads = config.kv_heads_per_layer
    out = {
        "architectures": [families.get(mt).hf_model_class],
        "model_type": mt,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": max(heads),
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    if mt in ("llama", "mistral", "qwen3"):
        out["attention_bias"] = config.qkv_bias
    if mt == "llama":
        out["mlp_bias"] = config.mlp_bias
    if mt == "mistral":
        out["sliding_window"] = config.sliding_window
    if config.is_variable:
        # transformers' heterogeneous-config field; its Llama modelling does not build it yet.
        out["per_layer_config"] = {str(i): {"num_key_value_heads": h} for i, h in enumerate(heads)}
    out.update(config.extra)
    return out
