"""Model families: one :class:`Family` record per ``model_type``, and the registry every list, check and
message derives from.

A record says what gqa can do with the family (run it, convert it, calibrate it, read its per-layer KV heads
back), which transformers classes and GGUF architecture it has, and carries the family's own pieces: the
conversion weight-map module (per-layer attention tensors and their :class:`~gqa.families.base.Role` s),
the runnable weight map (gqa parameter name -> transformers tensor name), the config mappings
(transformers ``config.json`` -> :class:`~gqa.model.config.GQAConfig` keyword arguments, and GGUF header ->
the same), the GGUF tensor-name map, whether Q/K rows are RoPE-permuted in a GGUF file, and per-tensor
transforms applied on read and on write (e.g. norm weights stored as ``w`` and meaning ``1 + w``).

Adding a family (the recipe)
----------------------------
1. Add one :class:`Family` to :data:`FAMILIES` below.
2. If its attention tensors are laid out unlike an existing weight-map module (``llama``, ``qwen3``,
   ``olmo2``, ``stablelm``, ``phi3``), write one module here with ``NAME`` and
   ``attention_map(config, layer, shape) -> {tensor name: Role}`` and name it in the record (``convert=``).
3. To run it: give the record ``weight_map`` and ``config_from_hf`` (and for GGUF files ``gguf_arch``,
   ``config_from_gguf``, ``gguf_tensor_map``, ``gguf_layer_extras``, ``gguf_rope_permuted``); put those
   functions in the same module. Nothing else changes: loading, conversion, ``gqa memory``, export,
   transformers registration and every "supported: ..." message read the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from gqa.errors import GQAUserError
from gqa.families import gemma3, llama, olmo2, phi3, qwen3, stablelm

__all__ = ["Family", "FAMILIES", "get", "find", "names", "by_gguf_arch", "require"]


@dataclass(frozen=True)
class Family:
    """What gqa knows about one ``model_type``.

    runs: gqa's decoder runs it (loaded by :func:`gqa.formats.transformers.load_hf`); calibrates: the
    calibrated conversion path takes it; per_layer: gqa reads its per-layer KV heads (``per_layer_config``)
    back. convert: the conversion weight-map module (None: gqa convert refuses the family).
    gguf_layer_extras: per-layer GGUF tensors beyond a Llama block's, as ``(name after blk.N., kind)`` with
    kind ``q`` (Hq*D), ``kv`` (Hkv*D), ``head`` (D) or ``model`` (d_model); None: gqa does not check the
    tensor table of this architecture (transformers reads it). read_transform / write_transform:
    ``(gqa name, tensor) -> tensor`` applied after reading a transformers-folder tensor / before writing
    one (GGUF tensors are read as gqa holds them). saves: a predicate on a
    :class:`~gqa.model.config.GQAConfig` that claims it for this family on save; config_to_hf writes its
    ``config.json`` (None: the Llama-block writer). gguf_metadata: ``config -> {key: int}``, the
    architecture's keys beyond a Llama block's (without the ``arch.`` prefix) that export writes, or a
    one-line error for a model llama.cpp's loader of that architecture cannot express. gguf_native: gqa's own GGUF reader loads this
    architecture (else transformers reads the file and gqa takes its weights).
    """

    model_type: str
    convert: ModuleType | None = None
    runs: bool = False
    calibrates: bool = False
    per_layer: bool = False
    hf_config_class: str | None = None
    hf_model_class: str | None = None
    gguf_arch: str | None = None
    weight_map: Callable | None = None
    config_from_hf: Callable | None = None
    config_from_gguf: Callable | None = None
    gguf_tensor_map: Callable | None = None
    gguf_layer_extras: tuple[tuple[str, str], ...] | None = None
    gguf_rope_permuted: bool = True
    read_transform: Callable | None = None
    write_transform: Callable | None = None
    saves: Callable | None = None
    config_to_hf: Callable | None = None
    gguf_metadata: Callable | None = None
    gguf_native: bool = False


def _runnable(model_type: str, hf_prefix: str, **kw) -> Family:
    """A Llama-block family gqa runs, converts, calibrates and reads per-layer KV heads of."""
    kw = {"convert": llama, "gguf_layer_extras": (), **kw}
    return Family(
        model_type,
        runs=True,
        calibrates=True,
        per_layer=True,
        hf_config_class=f"{hf_prefix}Config",
        hf_model_class=f"{hf_prefix}ForCausalLM",
        gguf_arch=model_type,
        weight_map=llama.weight_map,
        config_from_hf=llama.config_from_hf,
        **kw,
    )


_QKV_BIAS = (("attn_q.bias", "q"), ("attn_k.bias", "kv"), ("attn_v.bias", "kv"))
_QK_NORM = (("attn_q_norm.weight", "head"), ("attn_k_norm.weight", "head"))

FAMILIES: tuple[Family, ...] = (
    _runnable("llama", "Llama", config_from_gguf=llama.config_from_gguf, gguf_tensor_map=llama.gguf_tensor_map),
    _runnable("mistral", "Mistral"),
    _runnable("qwen2", "Qwen2", gguf_layer_extras=_QKV_BIAS),
    _runnable("qwen3", "Qwen3", convert=qwen3, gguf_layer_extras=_QK_NORM),
    # DeciLM / Nemotron-NAS: per-layer KV heads in block_configs (gqa.formats.decilm reads and writes the
    # folder); llama.cpp's "deci" GGUF architecture, the Llama blocks gqa's GGUF export writes for them.
    Family(
        "nemotron-nas",
        hf_model_class="DeciLMForCausalLM",
        gguf_arch="deci",
        weight_map=llama.weight_map,
        config_from_gguf=llama.config_from_gguf,
        gguf_tensor_map=llama.gguf_tensor_map,
        gguf_layer_extras=(),
        gguf_native=True,
    ),
    # Gemma-3 text models: GeGLU, QK-norm, sandwich norms, sliding-window layers (see gqa.families.gemma3).
    # Its attention tensors are Qwen3's (q/k/v/o and per-head-dim q/k norms). With one KV head (270M) the
    # conversions are GQA -> MHA expansions (and back).
    Family(
        "gemma3_text",
        qwen3,
        runs=True,
        calibrates=True,
        hf_config_class="Gemma3TextConfig",
        hf_model_class="Gemma3ForCausalLM",
        gguf_arch="gemma3",
        weight_map=gemma3.weight_map,
        config_from_hf=gemma3.config_from_hf,
        config_from_gguf=gemma3.config_from_gguf,
        gguf_tensor_map=gemma3.gguf_tensor_map,
        gguf_layer_extras=gemma3.GGUF_LAYER_EXTRAS,
        gguf_rope_permuted=False,
        read_transform=gemma3.from_hf,
        write_transform=gemma3.to_hf,
        saves=gemma3.saves,
        config_to_hf=gemma3.config_to_hf,
        gguf_metadata=gemma3.gguf_metadata,
        gguf_native=True,
    ),
    Family("gemma", llama, hf_config_class="GemmaConfig", hf_model_class="GemmaForCausalLM"),
    Family("granite", llama, hf_config_class="GraniteConfig", hf_model_class="GraniteForCausalLM"),
    Family("olmo", llama, hf_config_class="OlmoConfig", hf_model_class="OlmoForCausalLM"),
    Family("olmo2", olmo2, hf_config_class="Olmo2Config", hf_model_class="Olmo2ForCausalLM"),
    Family("stablelm", stablelm, hf_config_class="StableLmConfig", hf_model_class="StableLmForCausalLM"),
    Family("phi3", phi3, hf_config_class="Phi3Config", hf_model_class="Phi3ForCausalLM"),
)
_BY_TYPE = {f.model_type: f for f in FAMILIES}


def find(model_type) -> Family | None:
    """The record of ``model_type``, or None."""
    return _BY_TYPE.get(model_type) if isinstance(model_type, str) else None


def get(model_type) -> Family:
    """The record of ``model_type``; a one-line error lists the known families."""
    family = find(model_type)
    if family is None:
        raise GQAUserError(f"model_type {model_type!r} is not a family gqa knows; known: {', '.join(_BY_TYPE)}")
    return family


def names(**capabilities: bool) -> tuple[str, ...]:
    """The ``model_type`` s whose records have every given capability, sorted: ``names(runs=True)``,
    ``names(convert=True)`` (a conversion weight map), ``names(per_layer=True)``."""
    return tuple(sorted(f.model_type for f in FAMILIES if all(bool(getattr(f, k)) == v for k, v in capabilities.items())))


def require(model_type, capability: str, what: str) -> Family:
    """The record of ``model_type`` if it has ``capability``, else a one-line error saying ``what`` takes
    which families (``require(mt, "convert", "gqa convert")``)."""
    family = find(model_type)
    if family is None or not getattr(family, capability):
        raise GQAUserError(
            f"architecture {model_type!r} is not supported by {what}; supported: {', '.join(names(**{capability: True}))}"
        )
    return family


def by_gguf_arch(arch) -> Family | None:
    """The record whose GGUF architecture is ``arch`` (``llama``, ``deci``, ...), or None."""
    return next((f for f in FAMILIES if f.gguf_arch is not None and f.gguf_arch == arch), None)
