"""GGUF files (llama.cpp, Ollama, LM Studio): the one header reader, gqa's weight reader and the export,
through the ``gguf`` package. What differs per architecture (tensor names, extra tensors, the Q/K RoPE
permutation, the config mapping) comes from the family records (:mod:`gqa.families`).

Layout written (what llama.cpp's loaders read):

* uniform KV heads -> architecture ``llama``; ``llama.attention.head_count_kv`` is one integer.
* per-layer KV heads -> architecture ``deci`` (the DeciLM / Nemotron-NAS family): llama.cpp's ``llama``
  loader sizes every layer's ``attn_k``/``attn_v`` from layer 0, while its ``deci`` loader reads
  ``deci.attention.head_count_kv`` as an array with one entry per layer and sizes each layer from it.
  The blocks are the same Llama blocks (RMSNorm, RoPE, SwiGLU), so nothing else changes.

Tensors use llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ...). ``attn_q``/``attn_k`` rows are
permuted the way llama.cpp's HF converter does: transformers' RoPE rotates the two halves of each head
(``rotate_half``) while llama.cpp's "normal" RoPE rotates adjacent pairs, so within each head the rows
are reordered from ``[x0..x(D/2-1), y0..y(D/2-1)]`` to ``[x0, y0, x1, y1, ...]``. transformers' GGUF
loader and :func:`load_gguf` undo it, so a round trip is exact (bit-exact at fp32).

1-D tensors (norm weights) stay fp32 as llama.cpp expects; matrices are written in ``dtype``.
The tokenizer (a byte-level BPE ``tokenizer.json``, as SmolLM2, GPT-2 and Llama-3 use) is written as
llama.cpp's ``gpt2`` tokenizer model with its merges and special tokens.

Query head h uses KV head h // g (g = Hq // Hkv of that layer) in both directions; the permutation is
within a head, so the head order is untouched.

Every read of a GGUF model goes through :func:`read_gguf_header` (:func:`read_gguf` too):
metadata through the limits table and, for Llama blocks, every tensor the metadata implies present with
its shape, before anything is allocated or handed to transformers. ``gqa memory`` reads the same header.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gqa import families
from gqa.errors import GQAUserError, first_line
from gqa.formats.dtypes import gguf_export_names
from gqa.formats.spec import CheckpointSpec
from gqa.model.config import LIMITS, GQAConfig, check_int
from gqa.model.decoder import GQAForCausalLM

__all__ = [
    "export_gguf",
    "load_gguf",
    "read_gguf_header",
    "read_gguf",
    "parse_gguf",
    "spec_from_gguf",
    "gguf_file_architecture",
    "GGUFHeader",
    "LLAMA_BLOCK_ARCHS",
    "gguf_architecture",
    "GGUF_DTYPES",
]

# dtype names accepted by export_gguf -> (torch dtype, GGML type name, llama.cpp file type): the one dtype table's
GGUF_DTYPES = {name: (d.torch, d.gguf, d.gguf_file_type) for name, d in gguf_export_names().items()}


def _gguf():
    from gqa.optional import require

    return require("gguf")


def gguf_architecture(config: GQAConfig) -> str:
    """The GGUF architecture ``config`` exports as: the one of the family that claims it on save, else
    ``"llama"`` for uniform KV heads and ``"deci"`` when layers differ (see the module docstring)."""
    for f in families.FAMILIES:
        if f.saves is not None and f.gguf_arch is not None and f.saves(config):
            return f.gguf_arch
    return "deci" if config.is_variable else "llama"


def _export_family(config: GQAConfig) -> families.Family:
    return families.by_gguf_arch(gguf_architecture(config))


def _check_exportable(config: GQAConfig) -> dict:
    """A one-line error for what the export cannot write; else the family's extra metadata keys."""
    family = _export_family(config)
    if family.saves is not None:  # a family of its own: its record says what it writes
        return family.gguf_metadata(config) if family.gguf_metadata is not None else {}
    unsupported = [
        (config.qkv_bias or config.o_bias, "q/k/v/o biases (Qwen2-style)"),
        (config.mlp_bias, "MLP biases"),
        (config.qk_norm, "q/k norms (Qwen3/OLMo2-style)"),
        (config.sliding_window is not None, f"a sliding window ({config.sliding_window})"),
    ]
    for bad, what in unsupported:
        if bad:
            raise GQAUserError(
                f"GGUF export writes plain Llama blocks but this model has {what}; "
                "export an HF folder (--export hf) and use llama.cpp's converter for this family"
            )
    return {}


def _rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[n_heads * D, d_in] rows per head: halves layout -> interleaved pairs (llama.cpp's RoPE order)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`_rope_permute`."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_heads(config: GQAConfig, name: str) -> int | None:
    """The head count whose rows a GGUF file RoPE-permutes in tensor ``name`` (gqa's name), else None."""
    parts = name.split(".")
    if len(parts) == 5 and parts[0] == "layers" and parts[2] == "attn" and parts[4] == "weight":
        if parts[3] == "q_proj":
            return config.n_heads
        if parts[3] == "k_proj":
            return config.kv_heads_per_layer[int(parts[1])]
    return None


def _gguf_tensors(model: GQAForCausalLM):
    """Yield (gguf name, tensor) in file order, as the family writes them (q/k permuted for llama.cpp's
    RoPE where the family's files are)."""
    config = model.config
    family = _export_family(config)
    state = model.state_dict()
    for ours, theirs in family.gguf_tensor_map(config).items():
        t = state[ours]
        heads = _rope_heads(config, ours) if family.gguf_rope_permuted else None
        if heads is not None:
            t = _rope_permute(t, heads)  # (H*D, d_model)
        yield theirs, t


def _to_numpy(t: torch.Tensor, dtype_name: str, gguf) -> tuple[np.ndarray, object | None]:
    """A tensor as the array GGUFWriter stores, and its raw GGML type (None: inferred from the numpy dtype)."""
    t = t.detach().to("cpu")
    if t.dim() == 1 or dtype_name == "f32":
        return t.to(torch.float32).contiguous().numpy(), None
    if dtype_name == "f16":
        return t.to(torch.float16).contiguous().numpy(), None
    # bf16: numpy has no bfloat16; store the raw 16-bit patterns with an explicit GGML type
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16


# ------------------------------------------------------------------------------------------------
# tokenizer


def _pre_tokenizer_name(tok: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE ``tokenizer.json``.

    ``smollm`` (SmolLM/SmolLM2, StarCoder-style: digits split one by one before byte-level) or
    ``gpt-2`` (plain byte-level). Other pre-tokenizers are refused rather than guessed.
    """
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"]:
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    raise GQAUserError(
        f"GGUF export knows the byte-level BPE pre-tokenizers of GPT-2 and SmolLM2, not {types}; "
        "export without a tokenizer (tokenizer_dir=None) and add it with llama.cpp's converter"
    )


def _copy_gguf_tokenizer(writer, src: Path, vocab_size: int, gguf) -> None:
    """Copy every ``tokenizer.*`` field of the GGUF ``src`` as it is (the model came from that file).

    Exact where rebuilding from a transformers folder would not be: transformers' tokenizer made from a
    GGUF drops details such as SmolLM2's ``smollm`` pre-tokenizer (digits split one by one).
    """
    reader = read_gguf(src)
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in fields:
        raise GQAUserError(f"{src.name} has no tokenizer to copy; pass a folder with tokenizer.json")
    n = len(fields["tokenizer.ggml.tokens"].data)
    if n != vocab_size:
        raise GQAUserError(f"{src.name}'s tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    for key, f in fields.items():
        main = f.types[0]
        sub = f.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), main, sub_type=sub)


def _add_tokenizer(writer, source: Path, vocab_size: int, gguf) -> None:
    if source.is_file() and source.suffix == ".gguf":
        _copy_gguf_tokenizer(writer, source, vocab_size, gguf)
        return
    folder = source
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise GQAUserError(f"{folder} has no tokenizer.json; pass the folder the model was converted from")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise GQAUserError(
            f"GGUF export writes byte-level BPE tokenizers; {path} is {model.get('type')!r}: "
            "export without a tokenizer and add it with llama.cpp's converter"
        )
    pre = _pre_tokenizer_name(tok)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    for content, a in added.items():
        vocab[content] = a["id"]
    if max(vocab.values()) >= vocab_size:
        raise GQAUserError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}; "
            "pass the tokenizer of this model"
        )
    T = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows past the tokenizer (padded embeddings)
    types = [T.UNUSED] * vocab_size
    for text, idx in vocab.items():
        tokens[idx] = text
        a = added.get(text)
        types[idx] = T.NORMAL if a is None else (T.CONTROL if a.get("special") else T.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # merges, bos/eos/pad ids, add_bos/add_eos and the chat template, read the way llama.cpp's converter does
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise GQAUserError(f"{path} has no BPE merges; the tokenizer file is incomplete")
    special.add_to_gguf(writer, quiet=True)


# ------------------------------------------------------------------------------------------------
# export


def export_gguf(
    model: GQAForCausalLM,
    path: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    dtype: str | torch.dtype = "f16",
    name: str | None = None,
    force: bool = False,
) -> Path:
    """Write ``model`` as one GGUF file for llama.cpp (atomically: temp file, then rename).

    Args:
        model: a gqa decoder (uniform or per-layer KV heads; plain Llama blocks).
        path: the ``.gguf`` file to write.
        tokenizer_dir: a folder with ``tokenizer.json`` (byte-level BPE) and optionally
            ``tokenizer_config.json``, or the ``.gguf`` file the model came from (its tokenizer fields are
            copied as they are: exact, including llama.cpp's pre-tokenizer name); ``None`` writes no
            tokenizer (llama.cpp then cannot run the file).
        dtype: ``"f16"`` (default, what llama.cpp's converter writes), ``"bf16"`` or ``"f32"``
            (or the torch dtype); norm weights are always fp32.
        name: ``general.name`` (default: the file name without ``.gguf``).
        force: replace an existing file.

    Returns the path written. Uniform KV heads use architecture ``llama``, per-layer ones ``deci``, a latent
    model (one shared rotated key head) ``deepseek2`` (:mod:`gqa.formats.deepseek2`).
    """
    gguf = _gguf()
    from gqa.atomic import atomic_file

    path = Path(path)
    if path.suffix != ".gguf":
        raise GQAUserError(f"{path} should end in .gguf")
    if path.exists() and not force:
        raise GQAUserError(f"{path} exists; choose another path or pass --force / force=True")
    if isinstance(dtype, torch.dtype):
        by_torch = {v[0]: k for k, v in GGUF_DTYPES.items()}
        if dtype not in by_torch:
            raise GQAUserError(f"GGUF export writes f32, f16 or bf16, not {dtype}")
        dtype = by_torch[dtype]
    if dtype not in GGUF_DTYPES:
        raise GQAUserError(f"GGUF export writes {', '.join(GGUF_DTYPES)}, not {dtype!r}")
    config = model.config
    if config.latent_rank is not None:  # DeepSeek-V2's MLA layout (gqa.formats.deepseek2)
        from gqa.formats import deepseek2

        deepseek2.check_deepseek2(model)
        if config.latent_norm and deepseek2.latent_norm_eps(config) != config.norm_eps:
            raise GQAUserError(
                f"llama.cpp's deepseek2 normalises the latent with the model's epsilon ({config.norm_eps}), this "
                f"model's latent norm uses {deepseek2.latent_norm_eps(config)}; export it with --export hf or gqa"
            )
        arch, tensors = "deepseek2", lambda: deepseek2.gguf_tensors(model)
    else:
        extra = _check_exportable(config)
        arch, tensors = gguf_architecture(config), lambda: ((n, t, False) for n, t in _gguf_tensors(model))

    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name or path.stem)
        writer.add_file_type(GGUF_DTYPES[dtype][2])
        if arch == "deepseek2":
            deepseek2.write_gguf_fields(writer, model)
        else:
            _add_llama_fields(writer, config, arch, extra)
        if tokenizer_dir is not None:
            _add_tokenizer(writer, Path(tokenizer_dir), config.vocab_size, gguf)
        # Tensor infos first, then the data one tensor at a time: peak memory is one tensor, not a copy of the model.
        with torch.no_grad():
            for tname, t, f32 in tensors():
                arr, raw = _to_numpy(t, "f32" if f32 else dtype, gguf)
                writer.add_tensor_info(tname, arr.shape, arr.dtype, arr.nbytes, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, t, f32 in tensors():
                writer.write_tensor_data(_to_numpy(t, "f32" if f32 else dtype, gguf)[0])
        writer.close()  # atomic_file gives the result ordinary permissions (not the temp file's 0600)
    return path


def _add_llama_fields(writer, config: GQAConfig, arch: str, extra: dict) -> None:
    """A Llama block's ``{arch}.*`` metadata (per-layer KV heads as an array) and the family's extra keys."""
    heads_kv = config.kv_heads_per_layer
    head_dim = config.resolved_head_dim
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(heads_kv if config.is_variable else heads_kv[0])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.norm_eps))
    writer.add_vocab_size(config.vocab_size)
    for key, value in extra.items():
        writer.add_uint32(f"{arch}.{key}", value)


# ------------------------------------------------------------------------------------------------
# the checked header: the one read of a GGUF model's metadata and tensor table

#: Architectures whose tensor table gqa checks against the metadata: those of the families with
#: ``gguf_layer_extras`` (Llama blocks under llama.cpp's tensor names, plus each family's extra tensors;
#: transformers reads all but deci, gqa's own reader those with a ``config_from_gguf``).
LLAMA_BLOCK_ARCHS = tuple(f.gguf_arch for f in families.FAMILIES if f.gguf_layer_extras is not None)

#: ``{arch}.`` keys -> the :data:`gqa.model.config.LIMITS` entry their values are checked against.
_SIZE_KEYS = {
    "block_count": "n_layers",
    "embedding_length": "d_model",
    "context_length": "max_seq_len",
    "vocab_size": "vocab_size",
    "attention.key_length": "head_dim",
    "attention.value_length": "head_dim",
    "rope.dimension_count": "head_dim",
}
#: Keys holding one integer, or an array with one entry per layer (0: a ``deci`` layer without it).
_LAYER_KEYS = {
    "attention.head_count": "n_heads",
    "attention.head_count_kv": "n_kv_heads",
    "feed_forward_length": "ffn_dim",
}
#: What a file of Llama blocks must say (the rest has defaults).
_REQUIRED = ("block_count", "embedding_length", "attention.head_count", "feed_forward_length")
_POSITIVE_FLOATS = ("rope.freq_base", "attention.layer_norm_rms_epsilon")
#: Any other integer under ``{arch}.`` (an expert count, a window, ...) is a size too: 0 .. the largest limit.
_OTHER_LIMIT = max(LIMITS.values())
_FIX = "the file's metadata is wrong: re-export or re-download it"
_INCOMPLETE = "the file is incomplete: re-export or re-download it"


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says about its model, every value checked by :func:`read_gguf_header`.

    Per-layer fields have one entry per layer. Fields are None where the file does not say, which only
    architectures outside :data:`LLAMA_BLOCK_ARCHS` may do (gqa hands those to transformers).
    """

    path: Path
    reader: object  # the gguf.GGUFReader
    arch: str
    n_layers: int | None
    heads: tuple[int, ...] | None  # query heads of each layer
    kv_heads: tuple[int, ...] | None
    ffn_dims: tuple[int, ...] | None
    d_model: int | None
    head_dim: int | None
    vocab_size: int | None
    context: int | None
    rope_theta: float | None
    norm_eps: float | None
    tensors: dict  # name -> gguf ReaderTensor

    def field(self, key: str, default=None):
        """The value of metadata ``key`` (any key, e.g. ``tokenizer.ggml.bos_token_id``), or ``default``."""
        return _field(self.reader, key, default)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except (UnicodeDecodeError, ValueError, IndexError):
        raise GQAUserError(f"GGUF metadata {key} cannot be read (garbled value); {_FIX}") from None


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The one read of a GGUF model's header, before anything is allocated or handed to transformers.

    Parsed once per file version (path, size, modification time): the ``gguf`` package takes seconds over
    a large token list (16 s for Gemma-3's 262k tokens on 2 cores), and loading, ``gqa memory`` and the
    export's tokenizer copy all read the same header.

    Every ``{arch}.*`` value passes the limits table (:func:`gqa.model.config.check_int`), per-layer arrays
    have ``block_count`` entries, KV heads divide the query heads, token ids lie in the vocabulary and,
    for :data:`LLAMA_BLOCK_ARCHS`, every tensor the metadata implies is present with its shape. Anything
    else is a one-line :class:`GQAUserError` naming the key or tensor.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return _read_header(path)  # its one-line error
    return _cached_header((str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino), path)


@functools.lru_cache(maxsize=2)
def _cached_header(version: tuple, path: Path) -> GGUFHeader:
    return _read_header(path)  # errors are raised, never cached


def _read_header(path: Path) -> GGUFHeader:
    reader = parse_gguf(path)
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GQAUserError(f"{path.name} has no general.architecture; the file is truncated or not a GGUF model")
    meta = _checked_metadata(reader, arch, path)
    tensors = {t.name: t for t in reader.tensors}
    n = meta.get("block_count")
    heads, kv, ffn = (_per_layer_values(meta, key, n) for key in _LAYER_KEYS)
    kv = kv or heads  # no head_count_kv: one KV head per query head
    if heads is not None:
        _check_heads(path, arch, heads, kv)
    vocab = _vocab_size(reader, meta, tensors, path)
    header = GGUFHeader(
        path=path,
        reader=reader,
        arch=arch,
        n_layers=n,
        heads=heads,
        kv_heads=kv,
        ffn_dims=ffn,
        d_model=meta.get("embedding_length"),
        head_dim=_head_dim(meta, heads, path, arch),
        vocab_size=vocab,
        context=meta.get("context_length"),
        rope_theta=meta.get("rope.freq_base"),
        norm_eps=meta.get("attention.layer_norm_rms_epsilon"),
        tensors=tensors,
    )
    if arch in LLAMA_BLOCK_ARCHS:
        _check_tensors(header)
    return header


def _size(path: Path, label: str, value, name: str, *, minimum: int = 1, limit: int | None = None) -> int:
    return check_int(name, value, minimum=minimum, limit=limit, field=f"{path.name}: {label}", fix=_FIX)


def _checked_metadata(reader, arch: str, path: Path) -> dict:
    """Every ``{arch}.*`` value by its key without the prefix, checked; per-layer arrays as tuples."""
    prefix = arch + "."
    meta = {k.removeprefix(prefix): _field(reader, k) for k in reader.fields if k.startswith(prefix)}
    for key in _REQUIRED if arch in LLAMA_BLOCK_ARCHS else ():
        if meta.get(key) is None:
            raise GQAUserError(f"{path.name} has no {prefix}{key}; {_INCOMPLETE}")
    if "block_count" in meta:  # first: the per-layer arrays are checked against it
        meta["block_count"] = _size(path, prefix + "block_count", meta["block_count"], "n_layers")
    for key, value in meta.items():
        label = prefix + key
        if key in _SIZE_KEYS:
            meta[key] = _size(path, label, value, _SIZE_KEYS[key])
        elif key in _LAYER_KEYS:
            meta[key] = _layer_value(path, label, value, _LAYER_KEYS[key], meta.get("block_count"))
        elif key in _POSITIVE_FLOATS:
            meta[key] = _positive(path, label, value)
        else:
            _bounded(path, label, value)
    _check_token_ids(reader, path)
    return meta


def _layer_value(path: Path, label: str, value, name: str, n_layers: int | None):
    """One integer for every layer, or an array with exactly one entry per layer."""
    if not isinstance(value, list):
        return _size(path, label, value, name)
    if n_layers is None:
        raise GQAUserError(f"{path.name}: {label} lists {len(value)} layers but the file has no block_count; {_FIX}")
    if len(value) != n_layers:
        raise GQAUserError(f"{path.name}: {label} lists {len(value)} layers but block_count is {n_layers}; {_FIX}")
    return tuple(_size(path, f"{label}[{i}]", v, name, minimum=0) for i, v in enumerate(value))


def _per_layer_values(meta: dict, key: str, n_layers: int | None) -> tuple[int, ...] | None:
    value = meta.get(key)
    if value is None or n_layers is None:
        return None
    return value if isinstance(value, tuple) else (value,) * n_layers


def _positive(path: Path, label: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise GQAUserError(f"{path.name}: {label} must be a positive number, got {value!r}; {_FIX}")
    return float(value)


def _bounded(path: Path, label: str, value) -> None:
    """Any other value: integers are sizes (0 .. the largest limit), floats finite; text and flags pass."""
    if isinstance(value, list):
        for v in value:
            _bounded(path, label, v)
    elif isinstance(value, float) and not math.isfinite(value):
        raise GQAUserError(f"{path.name}: {label} must be a finite number, got {value!r}; {_FIX}")
    elif isinstance(value, int) and not isinstance(value, bool):
        _size(path, label, value, label, minimum=0, limit=_OTHER_LIMIT)


def _check_token_ids(reader, path: Path) -> None:
    """Special token ids (``tokenizer.ggml.*_token_id``) are ids of the token list."""
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n = len(tokens.data) if tokens is not None else LIMITS["vocab_size"]
    for key in reader.fields:
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            _size(path, key, _field(reader, key), "vocab_size", minimum=0, limit=n - 1)


def _check_heads(path: Path, arch: str, heads: tuple[int, ...], kv: tuple[int, ...]) -> None:
    if not any(heads):
        raise GQAUserError(f"{path.name}: {arch}.attention.head_count is 0 in every layer; {_FIX}")
    for i, (hq, hkv) in enumerate(zip(heads, kv, strict=True)):
        if hkv and (hq == 0 or hq % hkv):
            raise GQAUserError(
                f"{path.name}: layer {i} has {hkv} KV heads for {hq} query heads (KV heads must divide them); {_FIX}"
            )


def _head_dim(meta: dict, heads: tuple[int, ...] | None, path: Path, arch: str) -> int | None:
    """``attention.key_length``, else (Llama blocks: RoPE spans the head) ``rope.dimension_count``, else
    ``embedding_length / head_count``; for Llama blocks every head size the file gives must agree."""
    keys = ("attention.key_length", "attention.value_length", "rope.dimension_count")
    given = {k: meta[k] for k in keys if meta.get(k) is not None}
    if arch in LLAMA_BLOCK_ARCHS:
        if len(set(given.values())) > 1:
            raise GQAUserError(
                f"{path.name} gives different head sizes ({', '.join(f'{k} {v}' for k, v in given.items())}); "
                f"Llama blocks use one, with RoPE over all of it ({_FIX})"
            )
        if given:
            return next(iter(given.values()))
    elif "attention.key_length" in given:
        return given["attention.key_length"]
    d_model = meta.get("embedding_length")
    if d_model is None or heads is None:
        return None
    if d_model % max(heads):
        raise GQAUserError(
            f"{path.name}: embedding_length {d_model} is not divisible by head_count {max(heads)} and there is "
            f"no attention.key_length; {_FIX}"
        )
    return d_model // max(heads)


def _vocab_size(reader, meta: dict, tensors: dict, path: Path) -> int | None:
    """``vocab_size``, else the token list's length, else the embedding's rows."""
    if meta.get("vocab_size") is not None:
        vocab = meta["vocab_size"]
    elif "tokenizer.ggml.tokens" in reader.fields:
        vocab = _size(path, "tokenizer.ggml.tokens", len(reader.fields["tokenizer.ggml.tokens"].data), "vocab_size")
    elif "token_embd.weight" in tensors:
        vocab = _size(path, "token_embd.weight rows", int(tensors["token_embd.weight"].shape[-1]), "vocab_size")
    else:
        return None
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) > vocab:
        raise GQAUserError(f"{path.name} lists {len(tokens.data)} tokens for a vocabulary of {vocab}; {_FIX}")
    return vocab


def _expected_tensors(h: GGUFHeader) -> dict[str, tuple[int, ...]]:
    """Every tensor the metadata implies, with its GGUF shape (innermost dimension first), as llama.cpp's
    loaders size them: a ``deci`` layer with no KV heads has a linear attention (or none without query
    heads), one with no FFN width no FFN."""
    d, dh, vocab = h.d_model, h.head_dim, h.vocab_size
    extras = families.by_gguf_arch(h.arch).gguf_layer_extras  # the family's tensors beyond a Llama block's
    want = {"token_embd.weight": (d, vocab), "output_norm.weight": (d,)}
    if "output.weight" in h.tensors:  # absent: tied to token_embd
        want["output.weight"] = (d, vocab)
    for i, (hq, hkv, ffn) in enumerate(zip(h.heads, h.kv_heads, h.ffn_dims, strict=True)):
        p = f"blk.{i}."
        if hkv:
            want |= {
                p + "attn_norm.weight": (d,),
                p + "attn_q.weight": (d, hq * dh),
                p + "attn_output.weight": (hq * dh, d),
            }
            want |= {p + "attn_k.weight": (d, hkv * dh), p + "attn_v.weight": (d, hkv * dh)}
            sizes = {"q": hq * dh, "kv": hkv * dh, "head": dh, "model": d}
            want |= {p + name: (sizes[kind],) for name, kind in extras}
        elif hq:
            want |= {p + "attn_norm.weight": (d,), p + "attn_output.weight": (d, d)}
        if ffn:
            want |= {p + "ffn_norm.weight": (d,), p + "ffn_gate.weight": (d, ffn), p + "ffn_up.weight": (d, ffn)}
            want[p + "ffn_down.weight"] = (ffn, d)
    return want


def _check_tensors(h: GGUFHeader) -> None:
    """Every tensor the metadata implies is in the tensor table with its shape (extra tensors may be)."""
    for name, shape in _expected_tensors(h).items():
        t = h.tensors.get(name)
        if t is None:
            raise GQAUserError(f"{h.path.name} lacks tensor {name}, which its metadata implies; {_INCOMPLETE}")
        got = tuple(int(x) for x in t.shape)
        if got != shape:
            raise GQAUserError(
                f"{h.path.name}: tensor {name} has shape {list(got)} but the metadata implies {list(shape)}; "
                f"{_INCOMPLETE}"
            )


# ------------------------------------------------------------------------------------------------
# reading


def spec_from_gguf(h: GGUFHeader) -> CheckpointSpec:
    """The :class:`~gqa.formats.spec.CheckpointSpec` of a checked header (its family by GGUF architecture);
    ``model_config()`` works for the architectures whose family has a ``config_from_gguf``."""
    if h.heads is None or h.head_dim is None:
        raise GQAUserError(
            f"{h.path.name} lacks {h.arch}.attention.head_count / block_count / embedding_length metadata; "
            "is it a decoder model?"
        )
    family = families.by_gguf_arch(h.arch)
    build = None
    if family is not None and family.config_from_gguf is not None:
        build = lambda spec: GQAConfig(**family.config_from_gguf(spec.raw, spec))  # noqa: E731
    # per-layer query heads: sized by the largest
    return CheckpointSpec(h.path.name, family.model_type if family else h.arch, h.n_layers, max(h.heads),
                          h.kv_heads, h.head_dim, h.context, h, build)  # fmt: skip


def _gqa_config(h: GGUFHeader) -> GQAConfig:
    """The gqa config of a checked header, or a one-line error naming the architectures gqa reads."""
    spec = spec_from_gguf(h)
    if spec.build is None:
        readable = [f.gguf_arch for f in families.FAMILIES if f.config_from_gguf is not None]
        raise GQAUserError(f"{h.path.name} has architecture {h.arch!r}; gqa reads {' and '.join(readable)} GGUF files")
    return spec.model_config()


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32) -> GQAForCausalLM:
    """Read a GGUF file of an architecture gqa reads (``llama``, ``deci``, ...: any tensor type the ``gguf``
    package dequantizes) into a gqa model.

    Handles per-layer ``head_count_kv`` arrays, which transformers' GGUF loader does not. The q/k RoPE
    permutation is undone where the family's files have it, so ``load_gguf(export_gguf(m, ...))`` reproduces
    ``m``'s weights (exactly at f32). The header is checked (:func:`read_gguf_header`) before any weight is read.
    """
    from gqa.formats.transformers.folder import _rope_buffers

    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise GQAUserError(f"{path} does not exist; pass a .gguf file")
    header = read_gguf_header(path)
    config = _gqa_config(header)
    family = families.by_gguf_arch(header.arch)
    tensors = header.tensors  # every tensor the config needs, with its shape (checked with the header)

    def get(ours: str, name: str) -> torch.Tensor:
        t = tensors[name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy, shape (rows, cols) in PyTorch order
        # copy: the reader's arrays are read-only memmaps
        x = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)).to(dtype)
        heads = _rope_heads(config, ours) if family.gguf_rope_permuted else None
        return _rope_unpermute(x, heads) if heads is not None else x

    with torch.device("meta"):
        model = GQAForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    state = {ours: get(ours, name) for ours, name in family.gguf_tensor_map(config).items()}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=False)
    _rope_buffers(model)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# the file: parsed once, unchecked, and through the checked header


def parse_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` over ``path``, unchecked (memory-mapped: header and tensor table parsed, no
    tensor data read). Readers of a model use :func:`read_gguf`, which also checks what the header says.

    A missing ``gguf`` package is the one :mod:`gqa.optional` message; a truncated or foreign file is a
    one-line :class:`GQAUserError`.
    """
    gguf = _gguf()
    path = Path(path)
    try:
        return gguf.GGUFReader(str(path))
    except FileNotFoundError:
        raise GQAUserError(f"{path} does not exist; pass a .gguf file") from None
    except Exception as e:  # the reader raises ValueError/KeyError/struct/numpy errors for cut or garbled files
        raise GQAUserError(
            f"cannot read {path.name} as GGUF ({first_line(e, 120)}); the file is truncated or not GGUF"
        ) from None


def read_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` over ``path`` whose metadata and tensor table have passed
    :func:`read_gguf_header` (every size within the limits table, every tensor the metadata implies
    present with its shape): nothing reads a GGUF model without that check.
    """
    return read_gguf_header(path).reader


def gguf_file_architecture(path: str | Path) -> str | None:
    """``general.architecture`` of a GGUF file, from its checked header (no tensor data is loaded)."""
    return read_gguf_header(path).arch
