"""GGUF export (for llama.cpp, Ollama, LM Studio) and gqa's own GGUF reader, through the ``gguf`` package.

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
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gqa.errors import GQAUserError
from gqa.model.config import GQAConfig
from gqa.model.decoder import GQAForCausalLM
from gqa.model.files import read_gguf

__all__ = ["export_gguf", "load_gguf", "gguf_architecture", "GGUF_DTYPES"]

# dtype names accepted by export_gguf -> (torch dtype, GGML type name, llama.cpp file type)
GGUF_DTYPES = {"f32": (torch.float32, "F32", 0), "f16": (torch.float16, "F16", 1), "bf16": (torch.bfloat16, "BF16", 32)}


def _gguf():
    from gqa.optional import require

    return require("gguf")


def gguf_architecture(config: GQAConfig) -> str:
    """``"llama"`` for uniform KV heads, ``"deci"`` when layers differ (see the module docstring)."""
    return "deci" if config.is_variable else "llama"


def _check_exportable(config: GQAConfig) -> None:
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


def _rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[n_heads * D, d_in] rows per head: halves layout -> interleaved pairs (llama.cpp's RoPE order)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`_rope_permute`."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_tensors(model: GQAForCausalLM):
    """Yield (gguf name, tensor) in file order; q/k already permuted for llama.cpp's RoPE."""
    config = model.config
    yield "token_embd.weight", model.embed.weight
    for i, layer in enumerate(model.layers):
        attn, mlp, n_kv = layer.attn, layer.mlp, config.kv_heads_per_layer[i]
        p = f"blk.{i}."
        yield p + "attn_norm.weight", layer.attn_norm.weight
        yield p + "attn_q.weight", _rope_permute(attn.q_proj.weight, config.n_heads)  # (Hq*D, d_model)
        yield p + "attn_k.weight", _rope_permute(attn.k_proj.weight, n_kv)  # (Hkv*D, d_model)
        yield p + "attn_v.weight", attn.v_proj.weight  # (Hkv*D, d_model)
        yield p + "attn_output.weight", attn.o_proj.weight
        yield p + "ffn_norm.weight", layer.mlp_norm.weight
        yield p + "ffn_gate.weight", mlp.gate_proj.weight
        yield p + "ffn_up.weight", mlp.up_proj.weight
        yield p + "ffn_down.weight", mlp.down_proj.weight
    yield "output_norm.weight", model.norm.weight
    if not config.tie_embeddings:  # absent output.weight = tied, for llama.cpp and transformers alike
        yield "output.weight", model.lm_head.weight


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

    Returns the path written. Uniform KV heads use architecture ``llama``, per-layer ones ``deci``.
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
    _check_exportable(config)
    arch = gguf_architecture(config)
    heads_kv = config.kv_heads_per_layer
    head_dim = config.resolved_head_dim

    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name or path.stem)
        writer.add_file_type(GGUF_DTYPES[dtype][2])
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
        if tokenizer_dir is not None:
            _add_tokenizer(writer, Path(tokenizer_dir), config.vocab_size, gguf)
        # Tensor infos first, then the data one tensor at a time: peak memory is one tensor, not a copy of the model.
        with torch.no_grad():
            for tname, t in _gguf_tensors(model):
                arr, raw = _to_numpy(t, dtype, gguf)
                writer.add_tensor_info(tname, arr.shape, arr.dtype, arr.nbytes, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, t in _gguf_tensors(model):
                writer.write_tensor_data(_to_numpy(t, dtype, gguf)[0])
        writer.close()  # atomic_file gives the result ordinary permissions (not the temp file's 0600)
    return path


# ------------------------------------------------------------------------------------------------
# reading


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32) -> GQAForCausalLM:
    """Read a ``llama`` or ``deci`` GGUF (any tensor type the ``gguf`` package dequantizes) into a gqa model.

    Handles per-layer ``head_count_kv`` arrays, which transformers' GGUF loader does not. The q/k RoPE
    permutation is undone, so ``load_gguf(export_gguf(m, ...))`` reproduces ``m``'s weights (exactly at f32).
    """
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise GQAUserError(f"{path} does not exist; pass a .gguf file")
    reader = read_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "deci"):
        raise GQAUserError(f"{path.name} has architecture {arch!r}; gqa reads llama and deci GGUF files")

    def key(k, default=None):
        return _field(reader, f"{arch}.{k}", default)

    n_layers = int(key("block_count"))
    n_heads = key("attention.head_count")
    heads_kv = key("attention.head_count_kv", n_heads)
    ffn = key("feed_forward_length")
    for what, v in (("attention.head_count", n_heads), ("feed_forward_length", ffn)):
        if isinstance(v, list) and len(set(v)) > 1:
            raise GQAUserError(f"{path.name} varies {what} per layer; gqa models vary only the KV heads")
    n_heads = int(n_heads[0] if isinstance(n_heads, list) else n_heads)
    ffn = int(ffn[0] if isinstance(ffn, list) else ffn)
    heads_kv = [int(h) for h in heads_kv] if isinstance(heads_kv, list) else int(heads_kv)
    if isinstance(heads_kv, list) and 0 in heads_kv:
        raise GQAUserError(f"{path.name} has attention-free layers (head_count_kv 0); gqa cannot load them")
    tensors = {t.name: t for t in reader.tensors}
    d_model = int(key("embedding_length"))
    head_dim = int(key("attention.key_length", key("rope.dimension_count", d_model // n_heads)))
    vocab = key("vocab_size") or int(tensors["token_embd.weight"].shape[-1])
    config = GQAConfig(
        vocab_size=int(vocab),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=heads_kv if isinstance(heads_kv, int) or len(set(heads_kv)) > 1 else heads_kv[0],
        head_dim=head_dim,
        ffn_dim=ffn,
        rope_theta=float(key("rope.freq_base", 10000.0)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=int(key("context_length", 4096)),
        tie_embeddings="output.weight" not in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise GQAUserError(f"{path.name} lacks tensor {name}; it is not a complete {arch} model")
        t = tensors[name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy, shape (rows, cols) in PyTorch order
        # copy: the reader's arrays are read-only memmaps
        return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)).to(dtype)

    with torch.device("meta"):
        model = GQAForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    state = {"embed.weight": get("token_embd.weight"), "norm.weight": get("output_norm.weight")}
    state["lm_head.weight"] = state["embed.weight"] if config.tie_embeddings else get("output.weight")
    for i in range(n_layers):
        p, ours, n_kv = f"blk.{i}.", f"layers.{i}.", config.kv_heads_per_layer[i]
        state[ours + "attn_norm.weight"] = get(p + "attn_norm.weight")
        state[ours + "attn.q_proj.weight"] = _rope_unpermute(get(p + "attn_q.weight"), n_heads)
        state[ours + "attn.k_proj.weight"] = _rope_unpermute(get(p + "attn_k.weight"), n_kv)
        state[ours + "attn.v_proj.weight"] = get(p + "attn_v.weight")
        state[ours + "attn.o_proj.weight"] = get(p + "attn_output.weight")
        state[ours + "mlp_norm.weight"] = get(p + "ffn_norm.weight")
        state[ours + "mlp.gate_proj.weight"] = get(p + "ffn_gate.weight")
        state[ours + "mlp.up_proj.weight"] = get(p + "ffn_up.weight")
        state[ours + "mlp.down_proj.weight"] = get(p + "ffn_down.weight")
    own = model.state_dict()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise GQAUserError(f"{path.name}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=True, assign=False)
    for layer in model.layers:  # buffers were created on meta
        attn = layer.attn
        if getattr(attn, "rope_theta", None) is not None:
            from gqa.rope import rope_frequencies

            attn.inv_freq = rope_frequencies(attn.head_dim, attn.rope_theta, device=attn.q_proj.weight.device)
    return model.eval()
