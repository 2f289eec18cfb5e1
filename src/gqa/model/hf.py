"""Load and save transformers Llama-family folders (llama, mistral, qwen2, qwen3) with explicit weight maps.

Every tensor has a named counterpart (see :func:`weight_map`); loading checks that every expected
key is present with the expected shape and that nothing is left over, so a wrong layout fails loudly
instead of loading half a model.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gqa.errors import GQAUserError, first_line
from gqa.model.config import GQAConfig, check_int, check_kv_heads
from gqa.model.decoder import GQAForCausalLM
from gqa.model.files import read_json_object, safe_member
from gqa.units import dtype_name, parse_dtype

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "config_from_hf",
    "config_to_hf",
    "weight_map",
    "load_hf",
    "save_hf",
    "write_model_folder",
    "copy_side_files",
    "from_transformers",
    "read_safetensors_folder",
    "load_weights",
    "check_weight_table",
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


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer/generation files of :data:`SIDE_FILES` from ``src`` to ``dst``; returns the names copied.

    Never code: ``*.py`` files are not side files, and an ``auto_map`` (which would make transformers load
    code from the folder) is dropped from ``tokenizer_config.json``.
    """
    src, dst = Path(src), Path(dst)
    copied = []
    for name in SIDE_FILES:
        f = src / name
        if not f.is_file():
            continue
        if name == "tokenizer_config.json":
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (ValueError, OSError):
                data = None
            if isinstance(data, dict) and "auto_map" in data:
                data.pop("auto_map")
                (dst / name).write_text(json.dumps(data, indent=2) + "\n")
                copied.append(name)
                continue
        shutil.copy2(f, dst / name)
        copied.append(name)
    return copied


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise GQAUserError(f"rope_parameters must be an object, got {params!r}; fix config.json")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise GQAUserError(
            f"RoPE type {rope_type!r} is not supported yet; gqa models use plain RoPE (rope_type 'default')"
        )
    return positive_float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)), "rope_theta")


def positive_float(value, name: str) -> float:
    """``value`` as a float if it is a positive, finite number, else a one-line error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise GQAUserError(f"{name} must be a positive number, got {value!r}; fix config.json")
    return float(value)


def _required(cfg: dict, key: str):
    if key not in cfg or cfg[key] is None:
        raise GQAUserError(
            f"config.json has no {key!r}; a {cfg.get('model_type')} config needs it (restore config.json)"
        )
    return cfg[key]


def _flag(cfg: dict, key: str, default: bool = False) -> bool:
    val = cfg.get(key, default)
    if val is None:
        return default
    if not isinstance(val, bool):
        raise GQAUserError(f"{key} must be true or false, got {val!r}; fix config.json")
    return val


def _token_id(cfg: dict, key: str):
    val = cfg.get(key)
    ok = val is None or (isinstance(val, int) and not isinstance(val, bool) and val >= 0)
    if isinstance(val, list):
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in val)
    if not ok:
        raise GQAUserError(f"{key} must be a token id (or a list of them), got {val!r}; fix config.json")
    return val


def per_layer_kv_heads(cfg: dict, n_layers: int, default: int, *, field: str = "per_layer_config") -> list[int]:
    """KV heads per layer from transformers' ``per_layer_config`` (an object keyed by layer index, or a list
    with one object per layer); a layer without an entry uses ``default``."""
    per_layer = cfg.get(field)
    if isinstance(per_layer, list):
        if len(per_layer) != n_layers:
            raise GQAUserError(
                f"{field} lists {len(per_layer)} layers but num_hidden_layers is {n_layers}; give one entry per layer"
            )
        entries = dict(enumerate(per_layer))
    elif isinstance(per_layer, dict):
        entries = {}
        for k, v in per_layer.items():
            if not (isinstance(k, str) and k.isdigit() and int(k) < n_layers):
                raise GQAUserError(f"{field} has key {k!r}; keys are layer indices 0..{n_layers - 1} (fix config.json)")
            entries[int(k)] = v
    else:
        raise GQAUserError(f"{field} must be an object keyed by layer index, got {per_layer!r}; fix config.json")
    heads = []
    for i in range(n_layers):
        entry = entries.get(i, {})
        if not isinstance(entry, dict):
            raise GQAUserError(f'{field}[{i}] must be an object like {{"num_key_value_heads": 2}}, got {entry!r}')
        heads.append(
            check_int(
                "n_kv_heads", entry.get("num_key_value_heads", default), field=f"{field}[{i}].num_key_value_heads"
            )
        )
    return heads


def config_from_hf(cfg: dict) -> GQAConfig:
    """A transformers ``config.json`` dict of a supported family -> :class:`GQAConfig`.

    Every integer is checked (positive, bounded, heads dividing) before anything is allocated; a bad value
    is a one-line :class:`GQAUserError` naming the config.json field.
    """
    if not isinstance(cfg, dict):
        raise GQAUserError(f"config.json must hold a JSON object, got a {type(cfg).__name__}; restore it")
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise GQAUserError(
            f"model_type {mt!r} is not supported by gqa.model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise GQAUserError(f"hidden_act {act!r} is not supported; gqa's decoder uses SwiGLU with silu")
    n_heads = check_int("n_heads", _required(cfg, "num_attention_heads"), field="num_attention_heads")
    n_layers = check_int("n_layers", _required(cfg, "num_hidden_layers"), field="num_hidden_layers")
    kv_default = cfg.get("num_key_value_heads")
    kv_default = n_heads if kv_default is None else kv_default
    n_kv: int | list[int] = check_int("n_kv_heads", kv_default, field="num_key_value_heads")
    if cfg.get("per_layer_config") is not None:
        n_kv = per_layer_kv_heads(cfg, n_layers, n_kv)
    check_kv_heads(n_heads, n_kv if isinstance(n_kv, list) else [n_kv], field="num_key_value_heads")
    head_dim = cfg.get("head_dim")
    if head_dim is not None:
        head_dim = check_int("head_dim", head_dim, field="head_dim")
    d_model = check_int("d_model", _required(cfg, "hidden_size"), field="hidden_size")
    if head_dim is None and d_model % n_heads:
        raise GQAUserError(
            f"hidden_size={d_model} is not divisible by num_attention_heads={n_heads} and there is no head_dim; fix config.json"
        )
    attention_bias = _flag(cfg, "attention_bias")
    sliding = cfg.get("sliding_window")
    if mt in ("qwen2", "qwen3") and not _flag(cfg, "use_sliding_window"):
        sliding = None
    if sliding is not None:
        sliding = check_int("sliding_window", sliding, field="sliding_window")
    return GQAConfig(
        vocab_size=check_int("vocab_size", _required(cfg, "vocab_size"), field="vocab_size"),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=check_int("ffn_dim", _required(cfg, "intermediate_size"), field="intermediate_size"),
        rope_theta=_rope_theta(cfg),
        norm_eps=positive_float(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        max_seq_len=check_int("max_seq_len", cfg.get("max_position_embeddings", 4096), field="max_position_embeddings"),
        tie_embeddings=_flag(cfg, "tie_word_embeddings"),
        qkv_bias=True if mt == "qwen2" else attention_bias,
        o_bias=False if mt == "qwen2" else attention_bias,
        mlp_bias=_flag(cfg, "mlp_bias"),
        qk_norm=mt == "qwen3",
        sliding_window=sliding,
        bos_token_id=_token_id(cfg, "bos_token_id"),
        eos_token_id=_token_id(cfg, "eos_token_id"),
        pad_token_id=_token_id(cfg, "pad_token_id"),
    )


def _model_type_for(config: GQAConfig) -> str:
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


#: safetensors dtype codes gqa loads, by the names :func:`gqa.units.parse_dtype` knows.
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise GQAUserError(f"{path} is missing; restore the checkpoint's weight files") from None
    except Exception as e:  # safetensors raises its own error types for truncated or garbled headers
        raise GQAUserError(
            f"cannot read {path.name} ({first_line(e, 120)}); the file is truncated or not safetensors"
        ) from None


def read_safetensors_folder(folder: Path) -> dict[str, tuple[Path, str]]:
    """tensor name -> (file, name) for a folder with model.safetensors or a sharded index.

    Only bare file names inside ``folder`` are read: an index that names ``../x`` or an absolute path
    is refused (a model folder must not make gqa read files elsewhere).
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        wm = read_json_object(index, fix="re-save the checkpoint").get("weight_map")
        if not isinstance(wm, dict):
            raise GQAUserError(f"{index}: weight_map must be an object; re-save the checkpoint")
        return {name: (safe_member(folder, shard, f"{index.name} weight_map"), name) for name, shard in wm.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GQAUserError(f"no *.safetensors files in {folder}; save the model with safe_serialization=True")
    out = {}
    for f in files:
        safe_member(folder, f.name, "safetensors file")  # not a symlink leading out of the folder
        with _open_safetensors(f) as sf:
            for name in sf.keys():
                out[name] = (f, name)
    return out


def _check_names(wm: dict[str, str], names, config: GQAConfig, where) -> None:
    """Every tensor the config needs is present, and nothing is left over."""
    names = set(names)
    missing = [hf for hf in wm.values() if hf not in names]
    if missing:
        raise GQAUserError(
            f"{where} lacks {len(missing)} tensors config.json needs, e.g. {missing[:3]}; "
            "the weights do not match config.json (re-save the model)"
        )
    ignored = {"lm_head.weight"} if config.tie_embeddings else set()
    unexpected = sorted(names - set(wm.values()) - ignored)
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise GQAUserError(
            f"{where} has {len(unexpected)} tensors config.json has no place for, e.g. {unexpected[:3]}; "
            "the weights do not match config.json (re-save the model)"
        )


def _check_shape(hf_name: str, shape, expected) -> None:
    if tuple(shape) != tuple(expected):
        raise GQAUserError(
            f"{hf_name} has shape {tuple(shape)} but config.json needs {tuple(expected)}; "
            "the weights do not match config.json (re-save the model)"
        )


def check_weight_table(config: GQAConfig, shapes: dict, where) -> None:
    """The one check of a safetensors tensor table (``shapes``: tensor name -> shape, as the headers list
    them) against ``config``: every tensor it implies present with its shape, nothing left over. Runs on
    headers alone, before any weight is read or memory allocated."""
    _check_names(weight_map(config), shapes, config, where)
    with torch.device("meta"):
        own = GQAForCausalLM(config).state_dict()
    for ours, hf in weight_map(config).items():
        _check_shape(hf, shapes[hf], own[ours].shape)


def _load_state(model: GQAForCausalLM, tensors: dict[str, torch.Tensor | tuple], config: GQAConfig, getter):
    wm = weight_map(config)
    own = model.state_dict()
    _check_names(wm, tensors, config, "the checkpoint")
    new_state = {}
    for ours, hf in wm.items():
        t = getter(hf)
        _check_shape(hf, t.shape, own[ours].shape)
        new_state[ours] = t
    if config.tie_embeddings:
        new_state["lm_head.weight"] = new_state["embed.weight"]
    model.load_state_dict(new_state, strict=True, assign=False)
    return model


def load_hf(folder: str | Path, *, dtype: torch.dtype | None = None, device=None) -> GQAForCausalLM:
    """Load a transformers Llama-family folder (config.json + safetensors, sharded or not).

    config.json is validated first, then every tensor's name and shape is checked against it from the
    safetensors headers, before the model's memory is allocated: weights that do not match the config
    are an error (never a partly random model). ``dtype`` None keeps the stored dtype (f32/f16/bf16/f64;
    any other stored dtype is an error).
    """
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise GQAUserError(f"{folder} has no config.json; pass a transformers model folder")
    return load_weights(folder, config_from_hf(read_json_object(cfg_path)), dtype=dtype, device=device)


def load_weights(folder: Path, config: GQAConfig, *, dtype: torch.dtype | None = None, device=None) -> GQAForCausalLM:
    """A model of ``config`` with the weights of ``folder``'s safetensors files (transformers names,
    sharded or not): the one reader of safetensors weights (:func:`load_hf`, the DeciLM folder reader).

    Every tensor ``config`` implies is checked for presence and shape from the headers before the
    model's memory is allocated; nothing is left over. ``dtype`` None keeps the stored dtype.
    """
    index = read_safetensors_folder(folder)
    handles: dict[Path, object] = {}

    def handle(path: Path):
        if path not in handles:
            handles[path] = _open_safetensors(path)
        return handles[path]

    def header_entry(path: Path, key: str):
        try:
            return handle(path).get_slice(key)
        except Exception:  # safetensors' own error type: the index names a tensor the shard lacks
            raise GQAUserError(
                f"{path.name} has no tensor {key} although the index lists it; re-save the checkpoint"
            ) from None

    slices = {name: header_entry(path, key) for name, (path, key) in index.items()}
    check_weight_table(config, {name: sl.get_shape() for name, sl in slices.items()}, folder)
    src_dtypes = set()
    for hf in weight_map(config).values():
        code = slices[hf].get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise GQAUserError(
                f"{hf} is stored as {code}, which gqa does not load; save the model in float32, bfloat16 or float16"
            )
        src_dtypes.add(_SAFETENSORS_DTYPES[code])
    torch_dtype = parse_dtype(dtype) if dtype is not None else parse_dtype(sorted(src_dtypes)[0])
    with torch.device("meta"):
        model = GQAForCausalLM(config)
    model = model.to_empty(device=device or "cpu").to(torch_dtype)
    if config.tie_embeddings:  # to_empty gives each module its own tensor: share them again
        model.lm_head.weight = model.embed.weight

    def get(name: str) -> torch.Tensor:
        path, key = index[name]
        return handle(path).get_tensor(key).to(torch_dtype)

    _load_state(model, {k: None for k in index}, config, get)
    from gqa.rope import rope_frequencies

    for layer in model.layers:  # buffers were created on meta
        attn = layer.attn
        if attn.rope_theta is not None:
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
    force: bool = False,
) -> Path:
    """Write ``model`` as a transformers folder (config.json + model.safetensors), atomically.

    The folder is written under a temporary name beside ``folder`` and renamed at the end.
    ``side_files_from``: a folder whose tokenizer/generation files are copied along.
    """
    return write_model_folder(
        model, folder, config_to_hf(model.config), dtype=dtype, side_files_from=side_files_from, force=force
    )


def write_model_folder(
    model: GQAForCausalLM,
    folder: str | Path,
    hf_config: dict,
    *,
    dtype: torch.dtype | None = None,
    side_files_from: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Write ``model``'s weights under transformers names with ``hf_config`` as config.json, atomically.

    Shared by :func:`save_hf` and the DeciLM export: the folder is built under a temporary name beside
    ``folder`` and renamed at the end, so a failure leaves nothing half-written.
    """
    from gqa.atomic import atomic_dir

    folder = Path(folder)
    with atomic_dir(folder, force=force) as tmp:  # refuses an existing folder unless force
        state = model.state_dict()
        tensors = {}
        for ours, hf in weight_map(model.config).items():
            t = state[ours].detach()
            tensors[hf] = (t.to(dtype) if dtype else t).contiguous().cpu()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_config = {**hf_config, "torch_dtype": dtype_name(dtype or next(model.parameters()).dtype)}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if side_files_from is not None:
            copy_side_files(side_files_from, tmp)
    return folder
