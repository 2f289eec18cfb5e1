"""The streaming path of :func:`gqa.convert.convert`: tensor by tensor, never the whole model in memory.

Reads a transformers folder (safetensors, sharded or not) or a GGUF file and writes a transformers
folder whose attention holds the requested KV heads per layer. Three separate pieces decide the result:

- the family's weight map (:mod:`gqa.families`): which tensors hold heads, and how;
- the groups (:mod:`gqa.convert.groups`): which old KV heads form each new one (merging when a layer
  gets fewer heads, replicating when it gets a multiple of its heads);
- the merge (:mod:`gqa.convert.merge`): how a group's heads are pooled.

Head mapping: query head h uses KV head h // (Hq // Hkv), before and after. Safetensors input is
read one tensor at a time and each output shard is written as its tensors are converted (see
:mod:`gqa.formats.transformers.safetensors`), so peak memory is about the largest tensor. GGUF input is
dequantized by transformers into memory first (fine for small models; GGUF files are quantized).

What is read from SRC: ``config.json``, the index, the safetensors files it names (bare file names
inside SRC only) and plain side files (tokenizer, generation config). Python files are never copied, and
``auto_map`` (any :data:`CODE_KEYS`) is dropped from every JSON file written, so gqa can load its own
output; output shard names are the converter's own.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gqa import families
from gqa.convert.groups import Groups, check_kv_heads, groups_for, is_expansion, query_order, validate_groups
from gqa.convert.merge import merge_heads
from gqa.errors import GQAUserError
from gqa.families.base import AttentionShape, Role
from gqa.formats.transformers.config import spec_from_config
from gqa.formats.transformers.safetensors import INDEX_NAME, SafetensorsWriter, TensorInfo, read_folder, read_tensor
from gqa.model.files import read_json_object, safe_member
from gqa.units import derived_seed, dtype_name

__all__ = ["read_source_config", "convert_streaming", "StreamingResult", "safe_member", "INDEX_NAME", "layout_for", "attention_shape"]

# Side files go along (tokenizer, generation settings); weights are rewritten, code is never copied.
_NOT_COPIED_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".gguf",
    ".h5",
    ".msgpack",
    ".ckpt",
    ".py",
    ".pyc",
    ".so",
)
# Keys of a JSON file (config.json, tokenizer_config.json, ...) that name code in the model folder.
CODE_KEYS = ("auto_map", "custom_pipelines")
_NOT_COPIED_NAMES = ("config.json", INDEX_NAME, "conversion_report.json", "grouping_report.json")


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a one-line error (not JSON, not an object)."""
    return read_json_object(path, fix="the file is truncated or corrupt: restore it from the original checkpoint")


def read_source_config(src: Path) -> dict | None:
    """SRC's config.json (checked to be a JSON object), None for a GGUF file."""
    if src.is_dir():
        cfg = src / "config.json"
        if not cfg.is_file():
            raise GQAUserError(f"{src} has no config.json; pass a transformers model folder or a .gguf file")
        safe_member(src, "config.json", "config.json")
        return read_json(cfg)
    return None


# ---------------------------------------------------------------------------------------------
# Sources: tensors grouped by shard, each readable on demand


@dataclass(frozen=True)
class SourceTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    read: Callable[[], torch.Tensor]
    info: TensorInfo | None = None  # where the bytes lie, for file sources (lets unchanged tensors be copied raw)


@dataclass
class Source:
    config: dict
    shards: list[list[SourceTensor]]  # tensors of each input shard, in file order
    side_files: list[Path]
    tokenizer: object | None = None  # built from GGUF metadata, saved with save_pretrained
    generation_config: object | None = None
    close: Callable[[], None] = lambda: None


def layout_for(model_type):
    """The conversion weight-map module of ``model_type``'s family; a one-line error lists the families
    gqa convert takes."""
    return families.require(model_type, "convert", "gqa convert").convert


def attention_shape(config: dict) -> AttentionShape:
    """Layers, query heads, KV heads and head_dim of a config dict (the one config reader), each checked."""
    return spec_from_config(config).attention_shape()


def _safetensors_source(folder: Path) -> Source:
    config = read_source_config(folder)
    handles: dict[Path, object] = {}

    def reader(info):
        def read():
            if info.file not in handles:
                handles[info.file] = open(info.file, "rb")
            return read_tensor(info, handles[info.file])

        return read

    shards = [[SourceTensor(i.name, i.dtype, i.shape, i.nbytes, reader(i), i) for i in infos]
              for infos in read_folder(folder)]  # fmt: skip
    side = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name in _NOT_COPIED_NAMES or p.name.endswith(_NOT_COPIED_SUFFIXES):
            continue
        if p.is_file():
            side.append(safe_member(folder, p.name, "side file"))

    def close():
        for h in handles.values():
            h.close()

    return Source(config, shards, side, close=close)


def _check_complete(config: dict, shapes: dict, folder: Path) -> None:
    """Every tensor config.json implies, with its shape, for the families gqa runs (headers only, before
    anything is read): a folder lacking an MLP or norm weight used to convert, exit 0, and write an
    incomplete OUT. Attention tensors of every family are checked by the conversion plan itself."""
    from gqa.formats.transformers import check_weight_table, config_from_hf

    if config.get("model_type") not in families.names(runs=True):
        return
    try:
        model_config = config_from_hf(config)
    except GQAUserError:  # a config gqa cannot run but can still convert: its plan checks what it reads
        return
    check_weight_table(model_config, shapes, folder)


def _gguf_source(path: Path) -> Source:
    from gqa.errors import first_line
    from gqa.formats.gguf import read_gguf

    read_gguf(path)  # parse the header and tensor table ourselves first: a clear error for a truncated file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gqa.progress import quiet_loading

    with quiet_loading():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, trust_remote_code=False, local_files_only=True
            )
        except Exception as e:
            raise GQAUserError(f"transformers cannot load {path.name}: {first_line(e)}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(path.parent), gguf_file=path.name, trust_remote_code=False, local_files_only=True
            )
        except Exception as e:
            raise GQAUserError(f"transformers cannot build the tokenizer of {path.name}: {first_line(e)}") from None
    config = model.config.to_dict()
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the same storage as the embedding; transformers re-ties it
    tensors = [
        SourceTensor(n, t.dtype, tuple(t.shape), t.numel() * t.element_size(), (lambda t=t: t.detach()))
        for n, t in state.items()
    ]
    return Source(config, [tensors], [], tokenizer, model.generation_config)


def _open_source(src: Path) -> Source:
    if src.is_dir():
        return _safetensors_source(src)
    if src.suffix.lower() == ".gguf":
        return _gguf_source(src)
    raise GQAUserError(f"{src} is neither a folder nor a .gguf file; pass a transformers model folder or a .gguf file")


# ---------------------------------------------------------------------------------------------
# The plan: every output tensor, with its inputs and operation, known before anything is written


@dataclass
class _Item:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    inputs: list[SourceTensor]
    op: Callable[[list[torch.Tensor]], torch.Tensor] | None  # None: the single input's bytes, unchanged


def _expected_rows(role: Role, s: AttentionShape) -> int | None:
    return {
        "q_rows": s.n_heads * s.head_dim,
        "kv_rows": s.n_kv_heads * s.head_dim,
        "kv_norm": s.n_kv_heads * s.head_dim,
        "qkv_rows": (s.n_heads + 2 * s.n_kv_heads) * s.head_dim,
    }.get(role.kind)


def _check_shape(t: SourceTensor, role: Role, s: AttentionShape) -> None:
    rows = _expected_rows(role, s)
    ok = True
    if rows is not None:
        ok = len(t.shape) >= 1 and t.shape[0] == rows
    elif role.kind == "o_cols":
        ok = len(t.shape) == 2 and t.shape[1] == s.n_heads * s.head_dim
    elif role.kind in ("q_head", "kv_head"):
        ok = t.shape == (s.head_dim,)
    if not ok:
        raise GQAUserError(
            f"{t.name} has shape {t.shape}, which does not match config.json "
            f"({s.n_heads} query heads, {s.n_kv_heads} KV heads, head_dim {s.head_dim}); fix config.json or re-save"
        )
    if role.kind != "shared" and not t.dtype.is_floating_point:
        raise GQAUserError(f"{t.name} is {t.dtype}; only float checkpoints can be converted (dequantize it first)")


def _check_layer_count(by_name: dict, n_layers: int) -> None:
    """config.json's layer count against the tensors (before a loop over n_layers can run away)."""
    found = set()
    for name in by_name:
        if name.startswith("model.layers."):
            idx = name.split(".")[2]
            if idx.isdigit():
                found.add(int(idx))
    if len(found) != n_layers:
        raise GQAUserError(
            f"config.json says num_hidden_layers={n_layers} but the checkpoint holds {len(found)} layers; fix config.json"
        )


def _plan(
    source: Source,
    layout,
    shape: AttentionShape,
    groups_per_layer: list[Groups],
    merge: str,
    out_dtype: torch.dtype | None,
    seed: int,
) -> list[list[_Item]]:
    cfg, s, D = source.config, shape, shape.head_dim
    by_name = {t.name: t for tensors in source.shards for t in tensors}
    _check_layer_count(by_name, s.n_layers)
    roles: dict[str, tuple[int, Role]] = {}
    for layer in range(s.n_layers):
        for name, role in layout.attention_map(cfg, layer, s).items():
            roles[name] = (layer, role)
    missing = [n for n in roles if n not in by_name]
    if missing:
        raise GQAUserError(
            f"checkpoint lacks {len(missing)} attention tensors the {layout.NAME} layout expects, e.g. {missing[0]}; "
            "is model_type in config.json right?"
        )
    for name in by_name:
        if ".self_attn." in name and name not in roles and not name.endswith("rotary_emb.inv_freq"):
            raise GQAUserError(
                f"{name} is not in the {layout.NAME} layout's weight map; the checkpoint has another layout "
                "(check model_type in config.json)"
            )
    for name, (_, role) in roles.items():
        _check_shape(by_name[name], role, s)

    def generator(name: str) -> torch.Generator:
        # Seeded per tensor name: the random merge does not depend on shard or tensor order.
        return torch.Generator().manual_seed(derived_seed(seed, zlib.crc32(name.encode())))

    def out_dtype_of(t: SourceTensor) -> torch.dtype:
        return out_dtype if (out_dtype is not None and t.dtype.is_floating_point) else t.dtype

    def cast(x: torch.Tensor, like: SourceTensor) -> torch.Tensor:
        return x.to(out_dtype_of(like))

    def copied(t: SourceTensor, name: str | None = None) -> _Item:
        """An output tensor equal to input ``t`` (renamed to ``name``), cast if the dtype changes."""
        dt = out_dtype_of(t)
        op = None if dt == t.dtype else (lambda xs, t=t: cast(xs[0], t))
        return _Item(name or t.name, dt, t.shape, [t], op)

    shards_out = []
    done: set[str] = set()  # per-head tensors consumed by an earlier item
    for tensors in source.shards:
        items: list[_Item] = []
        for t in tensors:
            if t.name in done:
                continue
            layer, role = roles.get(t.name, (None, Role("shared")))
            if layer is None:
                items.append(copied(t))
                continue
            groups = groups_per_layer[layer]
            n_new = len(groups)
            order = query_order(groups, s.n_heads, s.n_kv_heads)
            # Replication copies single heads: "first" is exact for any merge the user chose.
            layer_merge = "first" if is_expansion(groups, s.n_kv_heads) else merge

            def permute_rows(x: torch.Tensor, order=order) -> torch.Tensor:
                if order is None:
                    return x
                return x.reshape(s.n_heads, D, *x.shape[1:])[order].reshape(x.shape)  # (Hq, D, ...) reordered

            def merge_rows(x: torch.Tensor, kind: str, name: str, groups=groups, m=layer_merge) -> torch.Tensor:
                return merge_heads(x, groups, D, method=m, kind=kind, generator=generator(name))

            kind = role.kind
            if kind == "shared" or (kind in ("q_rows", "o_cols") and order is None):
                items.append(copied(t))
            elif kind == "q_rows":
                op = lambda xs, t=t, f=permute_rows: cast(f(xs[0]), t)  # noqa: E731
                items.append(_Item(t.name, out_dtype_of(t), t.shape, [t], op))
            elif kind == "o_cols":

                def op(xs, t=t, order=order):
                    x = xs[0].reshape(xs[0].shape[0], s.n_heads, D)[:, order]  # (d, Hq, D) reordered
                    return cast(x.reshape(xs[0].shape), t)

                items.append(_Item(t.name, out_dtype_of(t), t.shape, [t], op))
            elif kind in ("kv_rows", "kv_norm"):
                mkind = "norm" if kind == "kv_norm" else ("bias" if t.name.endswith(".bias") else "weight")
                op = lambda xs, t=t, mk=mkind, f=merge_rows: cast(f(xs[0], mk, t.name), t)  # noqa: E731
                items.append(_Item(t.name, out_dtype_of(t), (n_new * D, *t.shape[1:]), [t], op))
            elif kind == "qkv_rows":
                q_rows, kv_rows = s.n_heads * D, s.n_kv_heads * D

                def op(xs, t=t, f=permute_rows, m=merge_rows, q_rows=q_rows, kv_rows=kv_rows):
                    x = xs[0]  # rows: q heads | k heads | v heads
                    q, k, v = x[:q_rows], x[q_rows : q_rows + kv_rows], x[q_rows + kv_rows :]
                    parts = [f(q), m(k, "weight", t.name + ":k"), m(v, "weight", t.name + ":v")]
                    return cast(torch.cat([p.to(x.dtype) for p in parts]), t)

                new_shape = ((s.n_heads + 2 * n_new) * D, *t.shape[1:])
                items.append(_Item(t.name, out_dtype_of(t), new_shape, [t], op))
            elif kind == "q_head":
                # Query head lists are renamed: new position p holds old head order[p].
                qo = order or list(range(s.n_heads))
                for p in range(s.n_heads):
                    src_t = by_name[role.template.format(h=qo[p])]
                    items.append(copied(src_t, role.template.format(h=p)))
                    done.add(src_t.name)
            elif kind == "kv_head":
                for j, group in enumerate(groups):
                    ins = [by_name[role.template.format(h=k)] for k in group]
                    name = role.template.format(h=j)

                    def op(xs, t=ins[0], name=name, m=layer_merge):
                        stacked = torch.stack(xs).reshape(-1)  # (r*D,): one group's per-head scales
                        pooled = merge_heads(stacked, [list(range(len(xs)))], D, method=m, kind="norm",
                                             generator=generator(name))  # fmt: skip
                        return cast(pooled, t)

                    items.append(_Item(name, out_dtype_of(ins[0]), (D,), ins, op))
                done.update(role.template.format(h=k) for k in range(s.n_kv_heads))
            else:
                raise AssertionError(f"unknown role {kind!r}")
        shards_out.append(items)
    return shards_out


# ---------------------------------------------------------------------------------------------


@dataclass
class StreamingResult:
    """What the streaming path did (turned into a :class:`gqa.convert.ConversionReport` by the caller)."""

    config: dict
    layout: str
    shape: AttentionShape
    kv_heads_after: list[int]
    groups: list[Groups]
    grouping: str
    parameters_before: int
    parameters_after: int
    kv_dtype: torch.dtype
    written_dtype: str


def resolve_targets(shape: AttentionShape, kv_heads: int | None, kv_heads_per_layer: list[int] | None) -> list[int]:
    """Per-layer KV-head targets from ``kv_heads`` or ``kv_heads_per_layer``, each checked (one line)."""
    if kv_heads_per_layer is not None:
        if len(kv_heads_per_layer) != shape.n_layers:
            raise GQAUserError(
                f"--kv-heads-per-layer lists {len(kv_heads_per_layer)} layers; the model has {shape.n_layers}"
            )
        for i, n in enumerate(kv_heads_per_layer):
            check_kv_heads(shape.n_kv_heads, shape.n_heads, n, f"--kv-heads-per-layer (layer {i})")
        return list(kv_heads_per_layer)
    check_kv_heads(shape.n_kv_heads, shape.n_heads, kv_heads)
    return [kv_heads] * shape.n_layers


def convert_streaming(
    src: Path,
    folder: Path,
    *,
    kv_heads: int | None,
    kv_heads_per_layer: list[int] | None,
    groups=None,
    merge: str = "mean",
    out_dtype: torch.dtype | None = None,
    seed: int = 0,
    progress: bool = True,
    fsync: bool = False,
) -> StreamingResult:
    """Convert ``src`` into the (empty, temporary) ``folder``: weights, index, side files, config.json.

    groups: ``[[0, 1], [2, 3]]`` for every layer or one such list per layer (reduction only); default
    contiguous groups when reducing, replication when expanding.
    """
    cfg = read_source_config(src)
    if cfg is not None:  # cheap checks before reading any weights (GGUF configs come from the file itself)
        layout_for(cfg.get("model_type"))
        resolve_targets(attention_shape(cfg), kv_heads, kv_heads_per_layer)
    source = _open_source(src)
    try:
        config = source.config
        layout = layout_for(config.get("model_type"))
        shape = attention_shape(config)
        targets = resolve_targets(shape, kv_heads, kv_heads_per_layer)
        if len(set(targets)) > 1 and config.get("model_type") not in families.names(per_layer=True):
            raise GQAUserError(
                f"per-layer KV heads are stored as per_layer_config, which gqa reads only for "
                f"{', '.join(families.names(per_layer=True))}; give {config.get('model_type')} one --kv-heads "
                "for every layer"
            )
        if groups is None:
            groups_per_layer = [groups_for(shape.n_kv_heads, n) for n in targets]
            grouping = "contiguous"
        else:
            per_layer = groups if (groups and isinstance(groups[0][0], (list, tuple))) else [groups] * shape.n_layers
            if len(per_layer) != shape.n_layers:
                raise GQAUserError(
                    f"groups has {len(per_layer)} per-layer entries; the model has {shape.n_layers} layers"
                )
            groups_per_layer = [validate_groups(g, shape.n_kv_heads) for g in per_layer]
            if [len(g) for g in groups_per_layer] != targets:
                raise GQAUserError(
                    f"the groups form {[len(g) for g in groups_per_layer]} KV heads; asked for {targets}"
                )
            grouping = "custom"
        plan = _plan(source, layout, shape, groups_per_layer, merge, out_dtype, seed)  # checks attention
        if Path(src).is_dir():  # a safetensors folder (a GGUF's tensor table is checked when it is read)
            _check_complete(config, {t.name: t.shape for shard in source.shards for t in shard}, src)
        _write(source, plan, folder, fsync, progress)
    finally:
        source.close()
    out_cfg = _without_code_keys(config)  # never point a loader at code we did not copy
    out_cfg["num_key_value_heads"] = max(targets)
    if len(set(targets)) > 1:
        out_cfg["per_layer_config"] = {str(i): {"num_key_value_heads": n} for i, n in enumerate(targets)}
    else:
        out_cfg.pop("per_layer_config", None)
    if out_dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in out_cfg or key == "torch_dtype":
                out_cfg[key] = dtype_name(out_dtype)
    (folder / "config.json").write_text(json.dumps(out_cfg, indent=2, sort_keys=True) + "\n")
    n_before = sum(_numel(t.shape) for ts in source.shards for t in ts)
    n_after = sum(_numel(i.shape) for items in plan for i in items)
    return StreamingResult(
        config=config,
        layout=layout.NAME,
        shape=shape,
        kv_heads_after=targets,
        groups=groups_per_layer,
        grouping=grouping,
        parameters_before=n_before,
        parameters_after=n_after,
        kv_dtype=_kv_dtype(plan, layout, config, shape),
        written_dtype=dtype_name(out_dtype) if out_dtype else "as source",
    )


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _kv_dtype(plan, layout, config, shape) -> torch.dtype:
    """The dtype of layer 0's K projection in the output: what a KV cache would be computed in."""
    names = layout.attention_map(config, 0, shape)
    k_name = next(n for n, r in names.items() if r.kind in ("kv_rows", "qkv_rows"))
    return next(i.dtype for items in plan for i in items if i.name == k_name)


def _without_code_keys(data: dict) -> dict:
    """A JSON object with the keys that point transformers at a folder's own code removed."""
    return {k: v for k, v in data.items() if k not in CODE_KEYS}


def _copy_side_file(src: Path, dst: Path) -> None:
    """Copy a side file; a JSON object loses its :data:`CODE_KEYS` (a tokenizer_config.json's ``auto_map``
    would make gqa's own loaders refuse OUT, and the code it names is never copied)."""
    raw = src.read_bytes() if src.suffix == ".json" else b""
    if any(f'"{k}"'.encode() in raw for k in CODE_KEYS):  # parse only a file that may hold one
        try:
            data = json.loads(raw)
        except ValueError:  # not JSON after all: copied as it is, read (and judged) by whoever loads it
            data = None
        if isinstance(data, dict) and any(k in data for k in CODE_KEYS):
            dst.write_text(json.dumps(_without_code_keys(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            return
    shutil.copyfile(src, dst)


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write(source: Source, plan, folder: Path, fsync: bool, progress: bool) -> None:
    """Write ``plan`` into ``folder``: one output shard per input shard, named by us."""
    from gqa.progress import progress as bar_for

    total = sum(t.nbytes for ts in source.shards for t in ts)
    weight_map, total_size = {}, 0
    with bar_for(total=total, unit="B", unit_scale=True, desc="convert", enabled=progress) as bar:
        for i, items in enumerate(plan):
            file_name = _shard_name(i, len(plan))
            writer = SafetensorsWriter(folder / file_name, [(it.name, it.dtype, it.shape) for it in items])
            try:
                for item in items:
                    if item.op is None and item.inputs[0].info is not None:
                        writer.copy_from(item.name, item.inputs[0].info, item.dtype, item.shape)
                    else:
                        x = item.op([t.read() for t in item.inputs]) if item.op else item.inputs[0].read()
                        writer.write(item.name, x)
                    weight_map[item.name] = file_name
                    total_size += _numel(item.shape) * item.dtype.itemsize
                    bar.update(sum(t.nbytes for t in item.inputs))
            except BaseException:
                writer.abort()
                raise
            writer.close(fsync=fsync)
    if len(plan) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    for path in source.side_files:
        _copy_side_file(path, folder / path.name)
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(str(folder))
    if source.generation_config is not None:
        source.generation_config.save_pretrained(str(folder))
    if fsync:
        for p in folder.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
