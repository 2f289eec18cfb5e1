"""Export variable-GQA models in the DeciLM / Nemotron-NAS ``block_configs`` layout, and read it back.

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
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from gqa.errors import GQAUserError
from gqa.model.hf import write_model_folder

__all__ = ["export_decilm", "load_decilm", "decilm_config", "ffn_mult_for", "intermediate_size_for"]


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
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
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
    cfg = decilm_config(model.config)  # validates before anything is written
    return write_model_folder(model, folder, cfg, dtype=dtype, side_files_from=side_files_from, force=force)


def load_decilm(folder: str | Path, *, dtype: torch.dtype | None = None):
    """Read a DeciLM folder written by :func:`export_decilm` (or any with uniform FFN widths and no
    no-op blocks) into a :class:`gqa.GQAForCausalLM`."""
    from gqa.model import GQAConfig, GQAForCausalLM
    from gqa.model.hf import weight_map

    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise GQAUserError(f"{folder} has no config.json; pass a DeciLM model folder")
    cfg = json.loads(path.read_text())
    blocks = cfg.get("block_configs")
    if not blocks:
        raise GQAUserError(f"{path} has no block_configs; it is not a DeciLM / Nemotron-NAS config")
    if len(blocks) != cfg["num_hidden_layers"]:
        raise GQAUserError(f"{path} lists {len(blocks)} block_configs for {cfg['num_hidden_layers']} layers")
    n_heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    kv, ffn = [], set()
    for i, b in enumerate(blocks):
        a, f = b.get("attention", {}), b.get("ffn", {})
        if a.get("no_op") or a.get("replace_with_linear") or f.get("no_op") or f.get("replace_with_linear"):
            raise GQAUserError(f"block {i} is a no-op or linear replacement, which gqa models do not have")
        kv.append(n_heads // int(a["n_heads_in_group"]))
        ffn.add(intermediate_size_for(float(f["ffn_mult"]), hidden))
    if len(ffn) != 1:
        raise GQAUserError(f"blocks have different FFN widths {sorted(ffn)}; gqa models use one ffn_dim")
    config = GQAConfig(
        vocab_size=cfg["vocab_size"],
        d_model=hidden,
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=kv,
        ffn_dim=ffn.pop(),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
    )
    tensors = load_file(str(folder / "model.safetensors"))
    model = GQAForCausalLM(config)
    state = {ours: tensors[hf] for ours, hf in weight_map(config).items()}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True)
    return (model.to(dtype) if dtype else model).eval()
