"""Load and save transformers Llama-family folders (llama, mistral, qwen2, qwen3) with explicit weight maps.

Every tensor has a named counterpart (see :func:`weight_map`); loading checks that every expected
key is present with the expected shape and that nothing is left over, so a wrong layout fails loudly
instead of loading half a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gqa.model.config import GQAConfig
from gqa.model.decoder import GQAForCausalLM

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "config_from_hf",
    "config_to_hf",
    "weight_map",
    "load_hf",
    "save_hf",
    "write_model_folder",
    "from_transformers",
    "read_safetensors_folder",
]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Files that travel with a checkpoint unchanged (tokenizer and generation settings).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "training.json",  # pre-training token count, read by `gqa uptrain --fraction`
)


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(
            f"RoPE type {rope_type!r} is not supported yet; gqa models use plain RoPE (rope_type 'default')"
        )
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def config_from_hf(cfg: dict) -> GQAConfig:
    """A transformers ``config.json`` dict of a supported family -> :class:`GQAConfig`."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {mt!r} is not supported by gqa.model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported; gqa's decoder uses SwiGLU with silu")
    n_heads = cfg["num_attention_heads"]
    n_layers = cfg["num_hidden_layers"]
    n_kv: int | list[int] = cfg.get("num_key_value_heads") or n_heads
    per_layer = cfg.get("per_layer_config")
    if per_layer:
        n_kv = [
            int(per_layer.get(str(i), per_layer.get(i, {})).get("num_key_value_heads", n_kv)) for i in range(n_layers)
        ]
    attention_bias = bool(cfg.get("attention_bias", False))
    sliding = cfg.get("sliding_window")
    if mt in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        sliding = None
    return GQAConfig(
        vocab_size=cfg["vocab_size"],
        d_model=cfg["hidden_size"],
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=cfg.get("head_dim"),
        ffn_dim=cfg["intermediate_size"],
        rope_theta=_rope_theta(cfg),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=True if mt == "qwen2" else attention_bias,
        o_bias=False if mt == "qwen2" else attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=mt == "qwen3",
        sliding_window=sliding,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
    )


def _model_type_for(config: GQAConfig) -> str:
    if config.qk_norm:
        if config.qkv_bias != config.o_bias or config.mlp_bias:
            raise ValueError("qk_norm models save as qwen3, which needs qkv_bias == o_bias and no mlp_bias")
        return "qwen3"
    if config.qkv_bias and not config.o_bias:
        if config.mlp_bias:
            raise ValueError("qkv-bias-only models save as qwen2, which has no mlp_bias")
        return "qwen2"
    if config.qkv_bias != config.o_bias:
        raise ValueError("an o_proj bias without q/k/v biases has no transformers Llama-family layout")
    return "mistral" if config.sliding_window else "llama"


def config_to_hf(config: GQAConfig) -> dict:
    """:class:`GQAConfig` -> a transformers ``config.json`` dict (llama, mistral, qwen2 or qwen3)."""
    mt = _model_type_for(config)
    arch = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
    }[mt]
    heads = config.kv_heads_per_layer
    out = {
        "architectures": [arch],
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


def weight_map(config: GQAConfig) -> dict[str, str]:
    """gqa parameter name -> transformers tensor name, for every tensor of the model."""
    m = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    for i in range(config.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        m[ours + "attn_norm.weight"] = hf + "input_layernorm.weight"
        m[ours + "mlp_norm.weight"] = hf + "post_attention_layernorm.weight"
        for p in ("q", "k", "v", "o"):
            m[ours + f"attn.{p}_proj.weight"] = hf + f"self_attn.{p}_proj.weight"
        if config.qkv_bias:
            for p in ("q", "k", "v"):
                m[ours + f"attn.{p}_proj.bias"] = hf + f"self_attn.{p}_proj.bias"
        if config.o_bias:
            m[ours + "attn.o_proj.bias"] = hf + "self_attn.o_proj.bias"
        if config.qk_norm:
            m[ours + "attn.q_norm.weight"] = hf + "self_attn.q_norm.weight"
            m[ours + "attn.k_norm.weight"] = hf + "self_attn.k_norm.weight"
        for p in ("gate", "up", "down"):
            m[ours + f"mlp.{p}_proj.weight"] = hf + f"mlp.{p}_proj.weight"
            if config.mlp_bias:
                m[ours + f"mlp.{p}_proj.bias"] = hf + f"mlp.{p}_proj.bias"
    return m


def read_safetensors_folder(folder: Path) -> dict[str, tuple[Path, str]]:
    """tensor name -> (file, name) for a folder with model.safetensors or a sharded index."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e}); re-save the checkpoint") from None
        return {name: (folder / shard, name) for name, shard in wm.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}; save the model with safe_serialization=True")
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    out[name] = (f, name)
        except Exception as e:  # safetensors raises its own error types for truncated headers
            raise ValueError(f"cannot read {f.name}: {e}; the file is truncated or not safetensors") from None
    return out


def _load_state(model: GQAForCausalLM, tensors: dict[str, torch.Tensor | tuple], config: GQAConfig, getter):
    wm = weight_map(config)
    own = model.state_dict()
    missing = [hf for hf in wm.values() if hf not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}; is it a {config} model?")
    ignored = {"lm_head.weight"} if config.tie_embeddings else set()
    unexpected = sorted(set(tensors) - set(wm.values()) - ignored)
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} tensors gqa does not map, e.g. {unexpected[:3]}")
    new_state = {}
    for ours, hf in wm.items():
        t = getter(hf)
        if tuple(t.shape) != tuple(own[ours].shape):
            raise ValueError(f"{hf} has shape {tuple(t.shape)}, expected {tuple(own[ours].shape)} from config.json")
        new_state[ours] = t
    if config.tie_embeddings:
        new_state["lm_head.weight"] = new_state["embed.weight"]
    model.load_state_dict(new_state, strict=True, assign=False)
    return model


def load_hf(folder: str | Path, *, dtype: torch.dtype | None = None, device=None) -> GQAForCausalLM:
    """Load a transformers Llama-family folder (config.json + safetensors, sharded or not)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass a transformers model folder")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
    config = config_from_hf(hf_cfg)
    index = read_safetensors_folder(folder)
    first = next(iter(index.values()))
    with safe_open(str(first[0]), framework="pt") as sf:
        src_dtype = sf.get_slice(first[1]).get_dtype()
    torch_dtype = dtype or {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(
        src_dtype, torch.float32
    )
    with torch.device("meta"):
        model = GQAForCausalLM(config)
    model = model.to_empty(device=device or "cpu").to(torch_dtype)
    handles: dict[Path, object] = {}

    def get(name: str) -> torch.Tensor:
        path, key = index[name]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(key).to(torch_dtype)

    _load_state(model, {k: None for k in index}, config, get)
    for layer in model.layers:  # buffers were created on meta
        attn = layer.attn
        if attn.rope_theta is not None:
            from gqa.rope import rope_frequencies

            attn.inv_freq = rope_frequencies(attn.head_dim, attn.rope_theta, device=attn.q_proj.weight.device)
    return model.eval()


def from_transformers(hf_model) -> GQAForCausalLM:
    """Build a gqa model from a loaded transformers model of a supported family (e.g. read from GGUF)."""
    config = config_from_hf(hf_model.config.to_dict())
    state = hf_model.state_dict()
    dtype = next(hf_model.parameters()).dtype
    model = GQAForCausalLM(config).to(dtype)
    return _load_state(model, state, config, lambda name: state[name]).eval()


def save_hf(
    model: GQAForCausalLM,
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    side_files_from: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a transformers folder (config.json + model.safetensors), atomically.

    The folder is written under a temporary name beside ``folder`` and renamed at the end.
    ``side_files_from``: a folder whose tokenizer/generation files are copied along.
    """
    return write_model_folder(
        model, folder, config_to_hf(model.config), dtype=dtype, side_files_from=side_files_from, overwrite=overwrite
    )


def write_model_folder(
    model: GQAForCausalLM,
    folder: str | Path,
    hf_config: dict,
    *,
    dtype: torch.dtype | None = None,
    side_files_from: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s weights under transformers names with ``hf_config`` as config.json, atomically.

    Shared by :func:`save_hf` and the DeciLM export: the folder is built under a temporary name beside
    ``folder`` and renamed at the end, so a failure leaves nothing half-written.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; choose another path or pass overwrite=True")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        state = model.state_dict()
        tensors = {}
        for ours, hf in weight_map(model.config).items():
            t = state[ours].detach()
            tensors[hf] = (t.to(dtype) if dtype else t).contiguous().cpu()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_config = {**hf_config, "torch_dtype": str(dtype or next(model.parameters()).dtype).replace("torch.", "")}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if side_files_from is not None:
            for name in SIDE_FILES:
                src = Path(side_files_from) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
