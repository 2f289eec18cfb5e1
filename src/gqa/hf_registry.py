"""Let ``AutoModelForCausalLM.from_pretrained(folder)`` load checkpoints with per-layer KV heads.

Call ``gqa.register_transformers()`` once (explicit; ``import gqa`` never imports transformers).

gqa writes variable-GQA checkpoints as ordinary Llama-family folders whose ``config.json`` adds
transformers' heterogeneous-config field ``per_layer_config = {"<layer>": {"num_key_value_heads":
n}}`` (see :func:`gqa.save_hf`). transformers reads that field into the config, but its Llama,
Mistral and Qwen2/3 modelling builds every layer with one ``num_key_value_heads`` and fails on it.

:func:`register` (what ``gqa.register_transformers()`` calls) registers, for each of those config classes, a
subclass of transformers' own model class whose ``from_pretrained`` / ``from_config`` dispatch:

- a config without per-layer heads -> the unchanged transformers class (LlamaForCausalLM, ...),
  so nothing changes for ordinary checkpoints;
- a config with per-layer heads -> :class:`GQAModelForCausalLM`, a transformers ``PreTrainedModel``
  around :class:`gqa.GQAForCausalLM` (query head h reads KV head h // (Hq // Hkv_layer)).

``GQAModelForCausalLM`` supports ``forward`` (logits, loss with ``labels``, left or right padding
through ``attention_mask``) and transformers' ``generate()``. That ``generate()`` keeps no KV cache
(each step re-runs the whole sequence: correct, slow for long outputs); :func:`gqa.generate` uses gqa's
KV cache and is the fast path. Model folders are plain data: nothing here runs code from a folder
(``trust_remote_code=False``).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["register", "GQAModelForCausalLM", "is_per_layer_config", "read_per_layer_heads"]

_registered = False


def _families() -> list[tuple[str, str]]:
    """(config class, model class) of every family whose per-layer KV heads gqa reads back."""
    from gqa import families

    return [(f.hf_config_class, f.hf_model_class) for f in families.FAMILIES if f.per_layer]


def is_per_layer_config(config) -> bool:
    """True when a transformers config carries per-layer KV heads that differ between layers."""
    per_layer = getattr(config, "per_layer_config", None)
    if not per_layer:
        return False
    try:
        heads = {int(per_layer[i].num_key_value_heads) for i in range(config.num_hidden_layers)}
    except (AttributeError, TypeError, KeyError, IndexError):
        heads = {int(v.get("num_key_value_heads", 0)) for v in dict(per_layer).values()}
    return len(heads) > 1 or bool(getattr(config, "is_heterogeneous", False))


def _make_wrapper():
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class GQAModelForCausalLM(PreTrainedModel, GenerationMixin):
        """A transformers causal LM around :class:`gqa.GQAForCausalLM` (per-layer KV heads).

        ``forward(input_ids [B, T], attention_mask [B, T] | None, labels [B, T] | None)`` returns
        ``CausalLMOutputWithPast(loss, logits [B, T, vocab])``. ``.gqa_model`` is the gqa model.
        ``generate()`` works without a KV cache (every step runs the whole sequence).
        """

        config_class = PretrainedConfig
        base_model_prefix = "gqa_model"
        main_input_name = "input_ids"

        def __init__(self, config, gqa_model=None):
            super().__init__(config)
            if gqa_model is None:
                from gqa.formats.transformers import config_from_hf
                from gqa.model.decoder import GQAForCausalLM

                gqa_model = GQAForCausalLM(config_from_hf(_config_dict(config)))
            self.gqa_model = gqa_model

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, dtype=None, **kwargs):
            from gqa.formats.transformers import load_hf

            folder = Path(pretrained_model_name_or_path)
            if not (folder / "config.json").is_file():
                from gqa.errors import GQAUserError

                raise GQAUserError(f"{folder} has no config.json; per-layer gqa checkpoints load from a local folder")
            if isinstance(dtype, str) and dtype != "auto":
                from gqa.units import parse_dtype

                dtype = parse_dtype(dtype)
            model = load_hf(folder, dtype=dtype if isinstance(dtype, torch.dtype) else None)
            if config is None:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
            wrapped = cls(config, model).eval()
            wrapped.generation_config.use_cache = False  # no transformers cache; see the class docstring
            return wrapped

        @classmethod
        def _from_config(cls, config, **kwargs):
            return cls(config)

        def get_input_embeddings(self):
            return self.gqa_model.embed

        def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
            # No cache: every step sees the whole sequence so far.
            return {"input_ids": input_ids, "attention_mask": attention_mask}

        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            if input_ids is None:
                raise TypeError("GQAModelForCausalLM.forward needs input_ids [B, T]")
            key_valid = positions = None
            if attention_mask is not None:
                key_valid = attention_mask.bool()  # (B, T)
                # RoPE positions count real tokens only, so left-padded rows start at 0 like transformers'.
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
            logits = self.gqa_model(input_ids, positions=positions, key_valid=key_valid)  # (B, T, vocab)
            loss = None
            if labels is not None:
                shift = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
                loss = torch.nn.functional.cross_entropy(shift, labels[:, 1:].reshape(-1), ignore_index=-100)
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    GQAModelForCausalLM.__qualname__ = "GQAModelForCausalLM"
    GQAModelForCausalLM.__module__ = __name__
    return GQAModelForCausalLM


def _config_dict(config) -> dict:
    d = config.to_dict()
    per_layer = getattr(config, "per_layer_config", None)
    if per_layer and not isinstance(d.get("per_layer_config"), dict):
        d["per_layer_config"] = {
            str(i): {"num_key_value_heads": int(per_layer[i].num_key_value_heads)}
            for i in range(config.num_hidden_layers)
        }
    return d


GQAModelForCausalLM = None  # built on first register(): transformers is imported lazily


def _dispatcher(hf_class, wrapper):
    """A subclass of ``hf_class`` whose constructors route per-layer configs to ``wrapper``."""

    class Dispatch(hf_class):
        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
            if kwargs.get("trust_remote_code"):
                from gqa.errors import GQAUserError

                raise GQAUserError("gqa's per-layer loader never runs code from a model folder; drop trust_remote_code")
            kwargs.pop("trust_remote_code", None)
            if config is None:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(pretrained_model_name_or_path, trust_remote_code=False)
            if is_per_layer_config(config):
                return wrapper.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
            return hf_class.from_pretrained(
                pretrained_model_name_or_path, *args, config=config, trust_remote_code=False, **kwargs
            )

        @classmethod
        def _from_config(cls, config, **kwargs):
            if is_per_layer_config(config):
                return wrapper(config)
            return hf_class._from_config(config, **kwargs)

    Dispatch.__name__ = Dispatch.__qualname__ = hf_class.__name__
    Dispatch.__module__ = __name__
    return Dispatch


def register() -> None:
    """Register the dispatch for every family with per-layer KV heads (``gqa.families.names(per_layer=True)``)
    with ``AutoModelForCausalLM`` (idempotent). Public as ``gqa.register_transformers()``."""
    global _registered, GQAModelForCausalLM
    if _registered:
        return
    import transformers
    from transformers import AutoModelForCausalLM

    GQAModelForCausalLM = _make_wrapper()
    for config_name, model_name in _families():
        config_cls = getattr(transformers, config_name)
        model_cls = getattr(transformers, model_name)
        AutoModelForCausalLM.register(config_cls, _dispatcher(model_cls, GQAModelForCausalLM), exist_ok=True)
    _registered = True


def read_per_layer_heads(folder: str | Path) -> list[int] | None:
    """The per-layer KV heads a folder's config.json declares, or None when it has none (values validated)."""
    from gqa.formats.spec import per_layer_kv_heads
    from gqa.model.config import check_int
    from gqa.model.loading import read_config_json

    cfg = read_config_json(Path(folder) / "config.json")
    if cfg.get("per_layer_config") is None:
        return None
    n_layers = check_int("n_layers", cfg.get("num_hidden_layers"), field="num_hidden_layers")
    default = cfg.get("num_key_value_heads")
    default = cfg.get("num_attention_heads") if default is None else default
    return per_layer_kv_heads(cfg, n_layers, check_int("n_kv_heads", default, field="num_key_value_heads"))
