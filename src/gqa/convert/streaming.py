"""Convert a checkpoint to fewer KV heads, streaming tensor by tensor.

:func:`convert_checkpoint` reads a transformers folder (safetensors, sharded or not) or a GGUF file
and writes a transformers folder whose config has ``num_key_value_heads = N`` and whose K/V
projections hold N heads. Three separate pieces decide the result:

- the layout (:mod:`gqa.convert.layouts`): which tensors hold heads, and how;
- the grouping (:mod:`gqa.convert.grouping`): which old KV heads form each new one;
- the merge (:mod:`gqa.convert.merge`): how a group's heads are pooled.

Head mapping: query head h uses KV head h // (Hq // Hkv), before and after. Safetensors input is
read one tensor at a time and each output shard is written as its tensors are converted (see
:mod:`gqa.convert.safetensors_io`), so peak memory is about the largest tensor. GGUF input is
dequantized by transformers into memory first (fine for small models; GGUF files are quantized).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gqa.convert.grouping import check_kv_heads, contiguous_groups, query_order, validate_groups
from gqa.convert.layouts import SUPPORTED_MODEL_TYPES, AttentionShape, Role, attention_shape, layout_for
from gqa.convert.merge import MERGE_METHODS, merge_heads
from gqa.convert.safetensors_io import SafetensorsWriter, TensorInfo, read_header, read_tensor

__all__ = ["convert_checkpoint", "ConversionReport", "OUTPUT_DTYPES", "SUPPORTED_MODEL_TYPES", "REPORT_NAME"]

OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REPORT_NAME = "conversion_report.json"
_INDEX_NAME = "model.safetensors.index.json"
# Source files that are weights or are rewritten; everything else (tokenizer, generation config) goes along.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_NOT_COPIED_NAMES = ("config.json", _INDEX_NAME, REPORT_NAME)


@dataclass
class ConversionReport:
    """What a conversion changed; written to ``OUT/conversion_report.json``."""

    source: str
    output: str
    model_type: str
    layout: str
    merge: str
    grouping: str
    n_layers: int
    n_heads: int
    head_dim: int
    kv_heads_before: list[int]
    kv_heads_after: list[int]
    groups: list[list[list[int]]]
    kv_cache_dtype: str
    kv_cache_bytes_per_token_before: int
    kv_cache_bytes_per_token_after: int
    parameters_before: int
    parameters_after: int
    parameters_removed: int
    output_dtype: str
    seconds: float
    date: str = ""
    versions: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


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
    shards: list[tuple[str, list[SourceTensor]]]  # (output file name, tensors in file order)
    side_files: list[Path]
    tokenizer: object | None = None  # built from GGUF metadata, saved with save_pretrained
    generation_config: object | None = None
    close: Callable[[], None] = lambda: None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is truncated or corrupt") from None


def _safetensors_source(folder: Path) -> Source:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass a transformers model folder or a .gguf file")
    config = _read_json(cfg_path)
    index = folder / _INDEX_NAME
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map; re-save the checkpoint")
        files = list(dict.fromkeys(weight_map.values()))  # shard order as listed
        for name in files:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"shard {name} listed in {_INDEX_NAME} is missing from {folder}")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {folder}; save the model with safe_serialization=True")
        weight_map = None
    handles: dict[Path, object] = {}

    def reader(info):
        def read():
            if info.file not in handles:
                handles[info.file] = open(info.file, "rb")
            return read_tensor(info, handles[info.file])

        return read

    shards, seen = [], set()
    for name in files:
        infos, _ = read_header(folder / name)
        if weight_map is not None:
            listed = {k for k, v in weight_map.items() if v == name}
            if listed != {i.name for i in infos}:
                raise ValueError(f"{name} does not hold the tensors {_INDEX_NAME} lists for it; re-save the checkpoint")
        dup = seen & {i.name for i in infos}
        if dup:
            raise ValueError(f"tensor {sorted(dup)[0]!r} appears in more than one shard")
        seen |= {i.name for i in infos}
        shards.append((name, [SourceTensor(i.name, i.dtype, i.shape, i.nbytes, reader(i), i) for i in infos]))
    side = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in _NOT_COPIED_NAMES
        and not p.name.endswith(_NOT_COPIED_SUFFIXES)
    ]

    def close():
        for h in handles.values():
            h.close()

    return Source(config, shards, side, close=close)


def _gguf_source(path: Path) -> Source:
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF input needs the gguf package: pip install 'gqa[gguf]'") from None
    try:  # parse the header and tensor table ourselves first: a clear error for a truncated file
        gguf.GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"cannot read {path.name}: {e}; the file is truncated or not GGUF") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"transformers cannot load {path.name}: {msg}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"transformers cannot build the tokenizer of {path.name}: {msg}") from None
    config = model.config.to_dict()
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the same storage as the embedding; transformers re-ties it
    tensors = [
        SourceTensor(n, t.dtype, tuple(t.shape), t.numel() * t.element_size(), (lambda t=t: t.detach()))
        for n, t in state.items()
    ]
    return Source(config, [("model.safetensors", tensors)], [], tokenizer, model.generation_config)


def _open_source(src: Path) -> Source:
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist; pass a transformers model folder or a .gguf file")
    if src.is_dir():
        return _safetensors_source(src)
    if src.suffix.lower() == ".gguf":
        return _gguf_source(src)
    raise ValueError(f"{src} is neither a folder nor a .gguf file; pass a transformers model folder or a .gguf file")


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
        raise ValueError(
            f"{t.name} has shape {t.shape}, which does not match config.json "
            f"({s.n_heads} query heads, {s.n_kv_heads} KV heads, head_dim {s.head_dim})"
        )
    if role.kind != "shared" and not t.dtype.is_floating_point:
        raise ValueError(f"{t.name} is {t.dtype}; only float checkpoints can be converted (dequantize it first)")


def _plan(
    source: Source,
    layout,
    shape: AttentionShape,
    groups_per_layer: list[list[list[int]]],
    merge: str,
    out_dtype: torch.dtype | None,
    seed: int,
) -> list[tuple[str, list[_Item]]]:
    cfg, s, D = source.config, shape, shape.head_dim
    roles: dict[str, tuple[int, Role]] = {}
    for layer in range(s.n_layers):
        for name, role in layout.attention_map(cfg, layer, s).items():
            roles[name] = (layer, role)
    by_name = {t.name: t for _, tensors in source.shards for t in tensors}
    missing = [n for n in roles if n not in by_name]
    if missing:
        raise ValueError(
            f"checkpoint lacks {len(missing)} attention tensors the {layout.NAME} layout expects, e.g. {missing[0]}"
        )
    for name in by_name:
        if ".self_attn." in name and name not in roles and not name.endswith("rotary_emb.inv_freq"):
            raise ValueError(
                f"{name} is not in the {layout.NAME} layout's weight map; the checkpoint has another layout"
            )
    for name, (_, role) in roles.items():
        _check_shape(by_name[name], role, s)

    def generator(name: str) -> torch.Generator:
        # Seeded per tensor name: the random merge does not depend on shard or tensor order.
        return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))

    def cast(t: torch.Tensor, like: SourceTensor) -> torch.Tensor:
        target = out_dtype if (out_dtype is not None and like.dtype.is_floating_point) else like.dtype
        return t.to(target)

    def out_dtype_of(t: SourceTensor) -> torch.dtype:
        return out_dtype if (out_dtype is not None and t.dtype.is_floating_point) else t.dtype

    def copied(t: SourceTensor, name: str | None = None) -> _Item:
        """An output tensor equal to input ``t`` (renamed to ``name``), cast if the dtype changes."""
        dt = out_dtype_of(t)
        op = None if dt == t.dtype else (lambda xs, t=t: cast(xs[0], t))
        return _Item(name or t.name, dt, t.shape, [t], op)

    shards_out = []
    done: set[str] = set()  # per-head tensors consumed by an earlier item
    for file_name, tensors in source.shards:
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

            def permute_rows(x: torch.Tensor, order=order) -> torch.Tensor:
                if order is None:
                    return x
                return x.reshape(s.n_heads, D, *x.shape[1:])[order].reshape(x.shape)  # (Hq, D, ...) reordered

            def merge_rows(x: torch.Tensor, kind: str, name: str, groups=groups) -> torch.Tensor:
                return merge_heads(x, groups, D, method=merge, kind=kind, generator=generator(name))

            kind = role.kind
            if kind == "shared" or (kind in ("q_rows", "o_cols") and order is None):
                items.append(copied(t))
            elif kind == "q_rows":
                op = lambda xs, t=t, f=permute_rows: cast(f(xs[0]), t)  # noqa: E731
                items.append(_Item(t.name, out_dtype_of(t), t.shape, [t], op))
            elif kind == "o_cols":

                def op(xs, t=t, order=order):
                    x = xs[0]
                    if order is not None:
                        x = x.reshape(x.shape[0], s.n_heads, D)[:, order].reshape(x.shape)  # (d, Hq, D) reordered
                    return cast(x, t)

                items.append(_Item(t.name, out_dtype_of(t), t.shape, [t], op))
            elif kind in ("kv_rows", "kv_norm"):
                mkind = "norm" if kind == "kv_norm" else ("bias" if t.name.endswith(".bias") else "weight")
                op = lambda xs, t=t, mk=mkind, f=merge_rows: cast(f(xs[0], mk, t.name), t)  # noqa: E731
                new_shape = (n_new * D, *t.shape[1:])
                items.append(_Item(t.name, out_dtype_of(t), new_shape, [t], op))
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
                    name = role.template.format(h=p)
                    items.append(copied(src_t, name))
                    done.add(src_t.name)
            elif kind == "kv_head":
                for j, group in enumerate(groups):
                    ins = [by_name[role.template.format(h=k)] for k in group]
                    name = role.template.format(h=j)

                    def op(xs, t=ins[0], name=name):
                        stacked = torch.stack(xs)  # (r, D): one group's per-head scales
                        return cast(
                            merge_heads(
                                stacked.reshape(-1),
                                [list(range(len(xs)))],
                                D,
                                method=merge,
                                kind="norm",
                                generator=generator(name),
                            ),
                            t,
                        )

                    items.append(_Item(name, out_dtype_of(ins[0]), (D,), ins, op))
                done.update(role.template.format(h=k) for k in range(s.n_kv_heads))
            else:
                raise AssertionError(f"unknown role {kind!r}")
        shards_out.append((file_name, items))
    return shards_out


# ---------------------------------------------------------------------------------------------


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in OUTPUT_DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; choose one of {', '.join(OUTPUT_DTYPES)}")
        return dtype
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(OUTPUT_DTYPES)}")
    return OUTPUT_DTYPES[dtype]


def _check_paths(src: Path, out: Path, force: bool) -> None:
    s, o = src.resolve(), out.resolve()
    if s == o or s.is_relative_to(o) or (src.is_dir() and o.is_relative_to(s)):
        raise ValueError(f"OUT {out} must lie outside SRC {src}: the source is never modified")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose another OUT or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; remove it or choose another OUT")


def _versions() -> dict:
    import transformers

    from gqa import __version__

    return {"gqa": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    kv_heads: int,
    *,
    merge: str = "mean",
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    groups: list[list[int]] | list[list[list[int]]] | None = None,
    seed: int = 0,
    progress: bool = True,
    fsync: bool = False,
) -> ConversionReport:
    """Convert the checkpoint at ``src`` to ``kv_heads`` KV heads and write it to ``out``.

    Args:
        src: a transformers model folder (``config.json`` + safetensors, sharded or not) or a GGUF file.
        out: the output folder; written under a temporary name beside it and renamed at the end.
        kv_heads: N, the new number of KV heads; must divide the checkpoint's Hkv (each new group
            is a union of whole old groups). N = Hkv with ``merge="mean"`` or ``"first"`` copies
            every tensor bit for bit.
        merge: how a group's K/V heads are pooled: ``"mean"`` (the GQA paper), ``"first"`` or
            ``"random"`` (see :mod:`gqa.convert.merge`).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the output's float tensors; None
            keeps each tensor's dtype (GGUF input is dequantized to float32 by transformers).
        force: replace ``out`` if it exists.
        groups: which old KV heads form each new one: ``[[0, 1], [2, 3]]`` for every layer, or one
            such list per layer; default :func:`~gqa.convert.grouping.contiguous_groups` (new head j
            pools old heads j*r .. j*r+r-1). A non-contiguous grouping permutes the q projection's
            rows and the o projection's columns so query head h still uses KV head h // (Hq // N).
        seed: seeds ``merge="random"`` (per tensor name, so independent of shard order).
        progress: show a progress bar (bytes read, rate, ETA).
        fsync: flush output files to disk before renaming (used by the benchmark).

    Returns:
        The :class:`ConversionReport`, also written to ``out/conversion_report.json``.
    """
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    if merge not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {merge!r}; choose one of {', '.join(MERGE_METHODS)}")
    out_dtype = _resolve_dtype(dtype)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist; pass a transformers model folder or a .gguf file")
    _check_paths(src, out, force)
    if src.is_dir():  # cheap checks before reading any weights (GGUF configs come from the file itself)
        cfg = _read_json(src / "config.json") if (src / "config.json").is_file() else None
        if cfg is not None:
            layout_for(cfg.get("model_type"))
            s = attention_shape(cfg)
            check_kv_heads(s.n_kv_heads, s.n_heads, kv_heads)
    source = _open_source(src)
    try:
        config = source.config
        layout = layout_for(config.get("model_type"))
        shape = attention_shape(config)
        check_kv_heads(shape.n_kv_heads, shape.n_heads, kv_heads)
        if groups is None:
            groups_per_layer = [contiguous_groups(shape.n_kv_heads, kv_heads)] * shape.n_layers
            grouping = "contiguous"
        else:
            per_layer = groups if (groups and isinstance(groups[0][0], (list, tuple))) else [groups] * shape.n_layers
            if len(per_layer) != shape.n_layers:
                raise ValueError(
                    f"groups has {len(per_layer)} per-layer entries; the model has {shape.n_layers} layers"
                )
            groups_per_layer = [validate_groups(g, shape.n_kv_heads) for g in per_layer]
            if any(len(g) != kv_heads for g in groups_per_layer):
                raise ValueError(f"every layer's groups must form kv_heads={kv_heads} new heads")
            grouping = "custom"
        plan = _plan(source, layout, shape, groups_per_layer, merge, out_dtype, seed)
        report = _write(source, plan, src, out, force, fsync, progress)
    finally:
        source.close()
    n_before = sum(_numel(t.shape) for _, ts in source.shards for t in ts)
    n_after = sum(_numel(i.shape) for _, items in plan for i in items)
    kv_dtype = _kv_dtype(plan, layout, config, shape)
    elsize = torch.empty((), dtype=kv_dtype).element_size()
    before = [shape.n_kv_heads] * shape.n_layers
    after = [len(g) for g in groups_per_layer]
    result = ConversionReport(
        source=str(src),
        output=str(out),
        model_type=config["model_type"],
        layout=layout.NAME,
        merge=merge,
        grouping=grouping,
        n_layers=shape.n_layers,
        n_heads=shape.n_heads,
        head_dim=shape.head_dim,
        kv_heads_before=before,
        kv_heads_after=after,
        groups=groups_per_layer,
        kv_cache_dtype=str(kv_dtype).replace("torch.", ""),
        kv_cache_bytes_per_token_before=2 * sum(before) * shape.head_dim * elsize,
        kv_cache_bytes_per_token_after=2 * sum(after) * shape.head_dim * elsize,
        parameters_before=n_before,
        parameters_after=n_after,
        parameters_removed=n_before - n_after,
        output_dtype=str(out_dtype).replace("torch.", "") if out_dtype else "as source",
        seconds=round(time.perf_counter() - t0, 3),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions=_versions(),
    )
    report(result)
    return result


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _kv_dtype(plan, layout, config, shape) -> torch.dtype:
    """The dtype of layer 0's K projection in the output: what a KV cache would be computed in."""
    names = layout.attention_map(config, 0, shape)
    k_name = next(n for n, r in names.items() if r.kind in ("kv_rows", "qkv_rows"))
    return next(i.dtype for _, items in plan for i in items if i.name == k_name)


def _write(source: Source, plan, src: Path, out: Path, force: bool, fsync: bool, progress: bool):
    """Write ``plan`` into a temporary folder beside ``out``; returns a callback that adds the report
    and renames the folder into place (so a failure at any point leaves ``out`` untouched)."""
    from tqdm.auto import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; OUT gets ordinary folder permissions
    try:
        total = sum(t.nbytes for _, ts in source.shards for t in ts)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert", disable=not progress)
        weight_map, total_size = {}, 0
        for file_name, items in plan:
            writer = SafetensorsWriter(tmp / file_name, [(i.name, i.dtype, i.shape) for i in items])
            for item in items:
                if item.op is None and item.inputs[0].info is not None:
                    writer.copy_from(item.name, item.inputs[0].info, item.dtype, item.shape)
                else:
                    x = item.op([t.read() for t in item.inputs]) if item.op else item.inputs[0].read()
                    writer.write(item.name, x)
                weight_map[item.name] = file_name
                total_size += _numel(item.shape) * item.dtype.itemsize
                bar.update(sum(t.nbytes for t in item.inputs))
            writer.close(fsync=fsync)
        bar.close()
        if len(plan) > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / _INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        for path in source.side_files:
            shutil.copy2(path, tmp / path.name)
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(str(tmp))
        if source.generation_config is not None:
            source.generation_config.save_pretrained(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    def finish(report: ConversionReport) -> None:
        try:
            cfg = dict(source.config)
            cfg["num_key_value_heads"] = report.kv_heads_after[0]
            if report.output_dtype != "as source":
                cfg["dtype"] = report.output_dtype
                if "torch_dtype" in cfg:
                    cfg["torch_dtype"] = report.output_dtype
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            (tmp / REPORT_NAME).write_text(report.to_json())
            if fsync:
                for p in tmp.iterdir():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            if out.exists():  # --force: swap, then delete the old folder
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return finish
