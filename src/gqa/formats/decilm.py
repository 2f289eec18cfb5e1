"""The DeciLM / Nemotron-NAS ``block_configs`` layout (per-layer KV heads): its one reader and its writer.

Serving engines (vLLM, TensorRT-LLM, llama.cpp's ``convert_hf_to_gguf.py``; SGLang reads the layout
but refuses differing KV heads per layer as of this writing) describe per-layer attention and FFN
shapes in ``config.json``. Field mapping, checked against vLLM's ``models/nemotron_nas.py``,
SGLang's ``models/nemotron_nas.py``, TensorRT-LLM's ``_torch/models/modeling_nemotron_nas.py`` and
the ``modeling_decilm.py`` that NVIDIA ships with Llama-3.3-Nemotron-Super-49B-v1 (via their
``_ffn_mult_to_intermediate_size`` helpers and KV-head lookups):

=====================================  ==================================================
gqa (:class:`GQAConfig`)               DeciLM / Nemotron-NAS ``config.json``
=====================================  ==================================================
``model_type``                         ``"nemotron-nas"``; ``architectures = ["DeciLMForCausalLM"]``
``n_heads``                            ``num_attention_heads``
``kv_heads_per_layer[i]``              ``block_configs[i].attention.n_heads_in_group = n_heads // kv``
                                       (readers compute ``num_kv_heads = num_attention_heads // g``)
``ffn_dim``                            ``block_configs[i].ffn.ffn_mult = 1.5 * ffn_dim / d_model``; readers
                                       compute ``round_up(int(2 * ffn_mult * hidden_size / 3), 256)``,
                                       so ``ffn_dim`` must be a multiple of 256 that this reproduces
``d_model``, ``n_layers``, ``vocab``   ``hidden_size``, ``num_hidden_layers``, ``vocab_size``
``norm_eps``, ``rope_theta``           ``rms_norm_eps``, ``rope_theta`` (``rope_scaling = null``)
``head_dim``                           implied: ``hidden_size // num_attention_heads`` (must match)
=====================================  ==================================================

``no_op`` and ``replace_with_linear`` are always false (gqa keeps every block). Tensor names are the
Llama ones (``model.layers.{i}.self_attn.k_proj.weight`` of shape ``[kv_i * D, d_model]``, ...).
Query head h of layer i reads KV head h // n_heads_in_group.

:func:`read_blocks` is the one reader of ``block_configs``, used by loading (:func:`load_decilm`, through
:func:`build_config`) and by ``gqa memory`` (:func:`gqa.formats.transformers.spec_from_config`), so both
check the same values with the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gqa import families
from gqa.errors import GQAUserError
from gqa.formats.spec import CheckpointSpec, positive_float
from gqa.model.config import check_int
from gqa.model.files import read_json_object

__all__ = [
    "MODEL_TYPE",
    "export_decilm",
    "load_decilm",
    "decilm_config",
    "read_blocks",
    "build_config",
    "ffn_mult_for",
    "intermediate_size_for",
]

MODEL_TYPE = "nemotron-nas"


def intermediate_size_for(ffn_mult: float, hidden_size: int) -> int:
    """The FFN width DeciLM readers derive from ``ffn_mult``: round_up(int(2 m h / 3), 256)."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return size if size % 256 == 0 else size + 256 - size % 256


def ffn_mult_for(ffn_dim: int, hidden_size: int) -> float:
    """The ``ffn_mult`` that reproduces ``ffn_dim`` exactly, or a one-line GQAUserError."""
    mult = round(1.5 * ffn_dim / hidden_size, 6)
    if intermediate_size_for(mult, hidden_size) != ffn_dim:
        raise GQAUserError(
            f"ffn_dim {ffn_dim} cannot be expressed in DeciLM's block_configs (readers round "
            f"2 * ffn_mult * hidden_size / 3 up to a multiple of 256); export needs such a width"
        )
    return mult


def decilm_config(config) -> dict:
    """A DeciLM / Nemotron-NAS ``config.json`` dict for a :class:`gqa.GQAConfig`."""
    unsupported = [
        name
        for name, on in (
            ("qkv_bias", config.qkv_bias),
            ("o_bias", config.o_bias),
            ("mlp_bias", config.mlp_bias),
            ("qk_norm", config.qk_norm),
            ("sliding_window", config.sliding_window),
        )
        if on
    ]
    if unsupported:
        raise GQAUserError(f"the DeciLM layout has no {', '.join(unsupported)}; export a plain Llama-style model")
    if config.resolved_head_dim * config.n_heads != config.d_model:
        raise GQAUserError(
            f"DeciLM implies head_dim = hidden_size // num_attention_heads = {config.d_model // config.n_heads}, "
            f"but the model has head_dim {config.resolved_head_dim}"
        )
    mult = ffn_mult_for(config.ffn_dim, config.d_model)
    blocks = []
    for kv in config.kv_heads_per_layer:
        blocks.append(
            {
                "attention": {"n_heads_in_group": config.n_heads // kv, "no_op": False, "replace_with_linear": False},
                "ffn": {"ffn_mult": mult, "no_op": False, "replace_with_linear": False},
            }
        )
    return {
        "architectures": [families.get(MODEL_TYPE).hf_model_class],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "block_configs": blocks,
    }


def export_decilm(
    model,
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    side_files_from: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Write ``model`` (a :class:`gqa.GQAForCausalLM`) as a DeciLM folder, atomically (temp + rename)."""
    folder = Path(folder)
    if folder.exists() and not force:
        raise GQAUserError(f"{folder} exists; choose another path or pass --force / force=True")
    from gqa.formats.transformers import write_model_folder

    cfg = decilm_config(model.config)  # validates before anything is written
    return write_model_folder(model, folder, cfg, dtype=dtype, side_files_from=side_files_from, force=force)


def load_decilm(folder: str | Path, *, dtype: torch.dtype | None = None):
    """Read a DeciLM folder written by :func:`export_decilm` (or any with uniform FFN widths and no
    no-op blocks) into a :class:`gqa.GQAForCausalLM` (float32 unless ``dtype`` says otherwise).

    ``config.json`` is checked like any other (bounded integers, KV heads dividing the query heads), and
    the weights are read by :func:`gqa.formats.transformers.load_weights`: every tensor the config implies
    present with its shape, checked before the model's memory is allocated.
    """
    from gqa.formats.transformers import load_weights, spec_from_config

    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise GQAUserError(f"{folder} has no config.json; pass a DeciLM model folder")
    cfg = read_json_object(path)
    if not cfg.get("block_configs"):
        raise GQAUserError(f"{path} has no block_configs; it is not a DeciLM / Nemotron-NAS config")
    config = spec_from_config(cfg, str(path)).model_config()
    return load_weights(folder, config, dtype=dtype or torch.float32)


@dataclass(frozen=True)
class Block:
    """One ``block_configs`` entry: its KV heads (0: no attention) and FFN multiplier (None: none given)."""

    kv_heads: int
    ffn_mult: float | None
    replaced: bool  # a no-op or linear replacement of attention or FFN


def read_blocks(blocks, n_heads: int, n_layers: int) -> list[Block]:
    """The one reader of ``block_configs``: one :class:`Block` per layer, every value checked."""
    if not isinstance(blocks, list) or len(blocks) != n_layers:
        got = len(blocks) if isinstance(blocks, list) else type(blocks).__name__
        raise GQAUserError(f"config.json lists {got} block_configs for {n_layers} layers; give one block per layer")
    out = []
    for i, b in enumerate(blocks):
        a = b.get("attention") if isinstance(b, dict) else None
        f = b.get("ffn") if isinstance(b, dict) else None
        if not isinstance(a, dict) or not (f is None or isinstance(f, dict)):
            raise GQAUserError(f"block_configs[{i}] needs attention and ffn objects; fix config.json")
        f = f or {}
        replaced = any(bool(x.get(k)) for x in (a, f) for k in ("no_op", "replace_with_linear"))
        if a.get("no_op") or a.get("replace_with_linear"):
            out.append(Block(0, None, True))  # no attention in this block, so no cache
            continue
        field = f"block_configs[{i}].attention.n_heads_in_group"
        group = check_int("n_heads", a.get("n_heads_in_group"), field=field)
        if n_heads % group:
            raise GQAUserError(f"{field}={group} does not divide the {n_heads} query heads; fix config.json")
        mult = f.get("ffn_mult")
        if mult is not None and (isinstance(mult, bool) or not isinstance(mult, (int, float)) or not 0 < mult < 2**20):
            raise GQAUserError(f"block_configs[{i}].ffn.ffn_mult must be a positive number, got {mult!r}; fix config.json")
        out.append(Block(n_heads // group, None if mult is None else float(mult), replaced))
    return out


def build_config(spec: CheckpointSpec):
    """The :class:`gqa.GQAConfig` of a checked DeciLM spec (``spec.raw`` its config.json), or a one-line
    error for what gqa models do not have (no-op blocks, differing FFN widths)."""
    from gqa.model.config import GQAConfig

    cfg = spec.raw
    hidden = check_int("d_model", cfg.get("hidden_size"), field="hidden_size")
    blocks = read_blocks(cfg["block_configs"], spec.n_heads, spec.n_layers)
    ffn = set()
    for i, b in enumerate(blocks):
        if b.replaced:
            raise GQAUserError(f"block {i} is a no-op or linear replacement, which gqa models do not have")
        if b.ffn_mult is None:
            raise GQAUserError(f"block_configs[{i}] needs attention and ffn objects; fix config.json")
        ffn.add(intermediate_size_for(b.ffn_mult, hidden))
    if len(ffn) != 1:
        raise GQAUserError(f"blocks have different FFN widths {sorted(ffn)}; gqa models use one ffn_dim")
    return GQAConfig(
        vocab_size=check_int("vocab_size", cfg.get("vocab_size"), field="vocab_size"),
        d_model=hidden,
        n_layers=spec.n_layers,
        n_heads=spec.n_heads,
        n_kv_heads=list(spec.kv_heads),
        ffn_dim=ffn.pop(),
        rope_theta=positive_float(cfg.get("rope_theta", 10000.0), "rope_theta"),
        norm_eps=positive_float(cfg.get("rms_norm_eps", 1e-5), "rms_norm_eps"),
        max_seq_len=spec.max_context or 4096,
        tie_embeddings=cfg.get("tie_word_embeddings") is True,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
    )
