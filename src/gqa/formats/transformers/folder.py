"""A transformers model folder (config.json + safetensors, sharded or not, + side files): load and save.

Every tensor has a named counterpart (the family's runnable weight map, :attr:`gqa.families.Family.weight_map`);
loading checks that every expected key is present with the expected shape and that nothing is left over,
so a wrong layout fails loudly instead of loading half a model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from gqa import families
from gqa.errors import GQAUserError
from gqa.formats.dtypes import by_name, by_torch
from gqa.formats.transformers.config import config_from_hf, config_to_hf, model_type_for
from gqa.formats.transformers.safetensors import read_folder, read_tensor
from gqa.model.config import GQAConfig
from gqa.model.decoder import GQAForCausalLM
from gqa.model.files import read_json_object
from gqa.units import dtype_name, parse_dtype

__all__ = [
    "SIDE_FILES",
    "weight_map",
    "load_hf",
    "save_hf",
    "write_model_folder",
    "copy_side_files",
    "from_transformers",
    "load_weights",
    "check_weight_table",
]

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


def _family(config: GQAConfig) -> families.Family:
    return families.get(model_type_for(config))


def weight_map(config: GQAConfig) -> dict[str, str]:
    """gqa parameter name -> transformers tensor name, for every tensor of the model (its family's map)."""
    return _family(config).weight_map(config)


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
    wm = weight_map(config)
    _check_names(wm, shapes, config, where)
    with torch.device("meta"):
        own = GQAForCausalLM(config).state_dict()
    for ours, hf in wm.items():
        _check_shape(hf, shapes[hf], own[ours].shape)


def _load_state(model: GQAForCausalLM, names, config: GQAConfig, getter) -> GQAForCausalLM:
    """Fill ``model`` with ``getter(transformers name)`` for every tensor of its weight map (the family's
    read transform applied), after checking ``names`` (what the source holds) against the map."""
    family = _family(config)
    wm = family.weight_map(config)
    own = model.state_dict()
    _check_names(wm, names, config, "the checkpoint")
    new_state = {}
    for ours, hf in wm.items():
        t = getter(hf)
        _check_shape(hf, t.shape, own[ours].shape)
        new_state[ours] = family.read_transform(ours, t) if family.read_transform else t
    if config.tie_embeddings:
        new_state["lm_head.weight"] = new_state["embed.weight"]
    model.load_state_dict(new_state, strict=True, assign=False)
    return model


def load_hf(folder: str | Path, *, dtype: torch.dtype | None = None, device=None) -> GQAForCausalLM:
    """Load a transformers folder of a family gqa runs (config.json + safetensors, sharded or not).

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


def _stored_dtype(infos: dict, names) -> torch.dtype:
    """The dtype a model loads in when none is asked for: the stored one (the first by name if mixed);
    a stored dtype gqa does not load is a one-line error."""
    stored = set()
    for hf in names:
        row = by_torch(infos[hf].dtype)
        if row is None or not row.loads:
            code = row.safetensors if row else infos[hf].dtype
            raise GQAUserError(
                f"{hf} is stored as {code}, which gqa does not load; save the model in float32, bfloat16 or float16"
            )
        stored.add(row.name)
    return by_name(sorted(stored)[0]).torch


def load_weights(folder: Path, config: GQAConfig, *, dtype: torch.dtype | None = None, device=None) -> GQAForCausalLM:
    """A model of ``config`` with the weights of ``folder``'s safetensors files (transformers names,
    sharded or not): the one loader of safetensors weights (:func:`load_hf`, the DeciLM folder reader).

    Every tensor ``config`` implies is checked for presence and shape from the headers before the
    model's memory is allocated; nothing is left over. ``dtype`` None keeps the stored dtype.
    """
    folder = Path(folder)
    infos = {i.name: i for shard in read_folder(folder) for i in shard}
    check_weight_table(config, {name: i.shape for name, i in infos.items()}, folder)
    stored = _stored_dtype(infos, weight_map(config).values())  # refuses dtypes gqa does not load
    torch_dtype = parse_dtype(dtype) if dtype is not None else stored
    with torch.device("meta"):
        model = GQAForCausalLM(config)
    model = model.to_empty(device=device or "cpu").to(torch_dtype)
    if config.tie_embeddings:  # to_empty gives each module its own tensor: share them again
        model.lm_head.weight = model.embed.weight
    handles: dict[Path, object] = {}
    try:

        def get(name: str) -> torch.Tensor:
            info = infos[name]
            if info.file not in handles:
                handles[info.file] = open(info.file, "rb")
            return read_tensor(info, handles[info.file]).to(torch_dtype)

        _load_state(model, infos, config, get)
    finally:
        for h in handles.values():
            h.close()
    _rope_buffers(model)
    return model.eval()


def _rope_buffers(model: GQAForCausalLM) -> None:
    """RoPE frequency buffers of a model built on the meta device, computed where its weights are."""
    from gqa.rope import rope_frequencies

    for layer in model.layers:
        attn = layer.attn
        if getattr(attn, "rope_theta", None) is not None:
            attn.inv_freq = rope_frequencies(attn.head_dim, attn.rope_theta, device=attn.q_proj.weight.device)


def from_transformers(hf_model) -> GQAForCausalLM:
    """Build a gqa model from a loaded transformers model of a family gqa runs (e.g. read from GGUF)."""
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

    The folder is written under a temporary name beside ``folder`` and renamed at the end. A latent model
    (:mod:`gqa.latent`) is written as ``DeepseekV2ForCausalLM`` (:func:`gqa.formats.deepseek2.save_deepseek_v2`).
    ``side_files_from``: a folder whose tokenizer/generation files are copied along.
    """
    if model.config.latent_rank is not None:  # a latent KV cache: DeepSeek-V2's layout
        from gqa.formats.deepseek2 import save_deepseek_v2

        return save_deepseek_v2(model, folder, dtype=dtype, side_files_from=side_files_from, force=force)
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
    from safetensors.torch import save_file

    from gqa.atomic import atomic_dir

    family = _family(model.config)
    folder = Path(folder)
    with atomic_dir(folder, force=force) as tmp:  # refuses an existing folder unless force
        state = model.state_dict()
        tensors = {}
        for ours, hf in family.weight_map(model.config).items():
            t = state[ours].detach()
            t = family.write_transform(ours, t) if family.write_transform else t
            tensors[hf] = (t.to(dtype) if dtype else t).contiguous().cpu()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_config = {**hf_config, "torch_dtype": dtype_name(dtype or next(model.parameters()).dtype)}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if side_files_from is not None:
            copy_side_files(side_files_from, tmp)
    return folder
