"""KV-cache arithmetic from a config alone (no weights are read): what GQA buys in memory.

KV bytes per token of one sequence = sum over layers of 2 (K and V) x Hkv x head_dim x bytes per
element. Llama-2-7B (32 layers, 32 KV heads of 128, bf16) takes 512 KiB per token; Llama-3-8B
(8 KV heads) 128 KiB; Llama-2-70B (80 layers, 8 KV heads) 320 KiB. A cache of B sequences of N
tokens takes B x N times that, so with a fixed budget the largest batch grows by the group size g.

Reads transformers ``config.json`` files (nested ``text_config`` too), model folders, gqa
``GQAConfig`` files, per-layer KV heads (``per_layer_config``, DeciLM / Nemotron-NAS
``block_configs``) and GGUF metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KVShape", "DTYPE_BYTES", "load_kv_shape", "kv_shape_from_dict", "kv_bytes_per_token", "memory_report"]

GiB = 2**30
KiB = 2**10

#: Bytes per cached element for the dtypes a KV cache is commonly kept in.
DTYPE_BYTES = {
    "float32": 4,
    "fp32": 4,
    "float16": 2,
    "fp16": 2,
    "bfloat16": 2,
    "bf16": 2,
    "float8": 1,
    "fp8": 1,
    "int8": 1,
}


@dataclass(frozen=True)
class KVShape:
    """What sizes a KV cache: query heads, KV heads per layer (0 = no attention cache), head_dim."""

    name: str
    n_heads: int
    kv_heads_per_layer: tuple[int, ...]
    head_dim: int
    max_context: int | None = None

    @property
    def n_layers(self) -> int:
        return len(self.kv_heads_per_layer)

    def with_kv_heads(self, hkv: int, name: str) -> KVShape:
        """The same model with ``hkv`` KV heads in every layer that has attention."""
        heads = tuple(hkv if h else 0 for h in self.kv_heads_per_layer)
        return KVShape(name, self.n_heads, heads, self.head_dim, self.max_context)

    def describe_kv_heads(self) -> str:
        heads = [h for h in self.kv_heads_per_layer]
        if len(set(heads)) == 1:
            return str(heads[0])
        return "per layer " + ",".join(str(h) for h in heads)


def _dtype_bytes(dtype: str) -> int:
    key = str(dtype).replace("torch.", "").lower()
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown KV dtype {dtype!r}; choose one of {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[key]


def kv_bytes_per_token(shape: KVShape, dtype: str = "bfloat16") -> int:
    """KV bytes one token of one sequence takes: sum over layers of 2 x Hkv x head_dim x element size."""
    elem = _dtype_bytes(dtype)
    return sum(2 * h * shape.head_dim * elem for h in shape.kv_heads_per_layer)


def kv_shape_from_dict(cfg: dict, name: str = "model") -> KVShape:
    """A transformers ``config.json`` dict (or a gqa ``GQAConfig`` dict) -> :class:`KVShape`."""
    if "n_heads" in cfg and "d_model" in cfg:  # gqa's own GQAConfig
        n_heads, layers = int(cfg["n_heads"]), int(cfg["n_layers"])
        kv = cfg.get("n_kv_heads", n_heads)
        heads = list(kv) if isinstance(kv, list) else [int(kv)] * layers
        head_dim = cfg.get("head_dim") or cfg["d_model"] // n_heads
        return KVShape(name, n_heads, tuple(heads), int(head_dim), cfg.get("max_seq_len"))
    if "num_attention_heads" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]  # multimodal configs nest the language model's
    try:
        n_heads = int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
        hidden = int(cfg["hidden_size"])
    except KeyError as e:
        raise ValueError(
            f"config has no {e.args[0]!r}; give a transformers decoder config with num_attention_heads, "
            "num_hidden_layers and hidden_size"
        ) from None
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    heads = [n_kv] * layers
    if isinstance(cfg.get("num_key_value_heads"), list):  # some configs list one entry per layer
        heads = [int(h) for h in cfg["num_key_value_heads"]]
    per_layer = cfg.get("per_layer_config")
    if isinstance(per_layer, dict):
        heads = [
            int(per_layer.get(str(i), per_layer.get(i, {})).get("num_key_value_heads", heads[i])) for i in range(layers)
        ]
    blocks = cfg.get("block_configs")
    if isinstance(blocks, list) and blocks:  # DeciLM / Nemotron-NAS
        heads = []
        for block in blocks:
            attn = block.get("attention", {})
            if attn.get("no_op") or attn.get("replace_with_linear"):
                heads.append(0)  # no attention in this block, so no cache
            else:
                heads.append(n_heads // int(attn.get("n_heads_in_group") or 1))
    if len(heads) != layers:
        raise ValueError(f"config lists KV heads for {len(heads)} layers but num_hidden_layers is {layers}")
    max_ctx = cfg.get("max_position_embeddings") or cfg.get("seq_length")
    return KVShape(name, n_heads, tuple(heads), head_dim, int(max_ctx) if max_ctx else None)


def _kv_shape_from_gguf(path: Path) -> KVShape:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key):
        f = reader.fields.get(key)
        if f is None:
            return None
        val = f.parts[f.data[0]]
        return val.tolist() if len(val) > 1 else val[0].item()

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    n_heads = field(f"{arch}.attention.head_count")
    layers = field(f"{arch}.block_count")
    hidden = field(f"{arch}.embedding_length")
    if n_heads is None or layers is None or hidden is None:
        raise ValueError(f"{path} lacks {arch}.attention.head_count / block_count metadata; is it a decoder model?")
    kv = field(f"{arch}.attention.head_count_kv") or n_heads
    heads = [int(h) for h in kv] if isinstance(kv, list) else [int(kv)] * int(layers)
    head_dim = field(f"{arch}.attention.key_length") or int(hidden) // int(n_heads)
    ctx = field(f"{arch}.context_length")
    return KVShape(path.name, int(n_heads), tuple(heads), int(head_dim), int(ctx) if ctx else None)


def load_kv_shape(source: str | Path | dict) -> KVShape:
    """Read a config.json, a model folder (its config.json), a gqa config file or a GGUF file's metadata."""
    if isinstance(source, dict):
        return kv_shape_from_dict(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a config.json, a model folder or a .gguf file")
    if path.is_dir():
        for name in ("config.json", "gqa_config.json"):
            if (path / name).is_file():
                return kv_shape_from_dict(_read_json(path / name), path.name)
        raise FileNotFoundError(f"{path} has no config.json; pass a model folder or the config file itself")
    if path.suffix == ".gguf":
        return _kv_shape_from_gguf(path)
    return kv_shape_from_dict(_read_json(path), path.parent.name if path.name == "config.json" else path.stem)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a JSON config ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a config object")
    return data


def _gqa_kv_heads(n_heads: int, target_group: int = 4) -> int:
    """KV heads of the GQA variant: the divisor of n_heads closest to a group size of 4."""
    divisors = [d for d in range(1, n_heads + 1) if n_heads % d == 0]
    return min(divisors, key=lambda d: (abs(n_heads // d - target_group), -d))


def memory_report(
    source: str | Path | dict | KVShape,
    *,
    context: int | None = None,
    batch: int = 1,
    budget_gib: float | None = None,
    dtype: str = "bfloat16",
) -> dict:
    """KV-cache figures for a model and its MHA / GQA / MQA variants.

    Args:
        source: config.json / model folder / gqa config / .gguf path, a config dict, or a :class:`KVShape`.
        context: tokens per sequence (default: the model's max context, else 4096).
        batch: sequences held at once.
        budget_gib: a KV memory budget in GiB: adds the largest batch at ``context`` and the longest
            context at ``batch`` that fit.
        dtype: element type of the cache (bfloat16, float16, float32, float8/int8).

    Returns a JSON-ready dict; ``variants`` lists rows with ``kv_heads``, ``kv_bytes_per_token``,
    ``kv_bytes_per_sequence`` (at ``context``), ``kv_bytes_total`` (x ``batch``) and, with a budget,
    ``max_batch`` / ``max_context``. The model's own row is ``model``.
    """
    shape = source if isinstance(source, KVShape) else load_kv_shape(source)
    elem = _dtype_bytes(dtype)
    if context is None:
        context = shape.max_context or 4096
    for name, val in (("context", context), ("batch", batch)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    if budget_gib is not None and not (isinstance(budget_gib, (int, float)) and budget_gib > 0):
        raise ValueError(f"budget must be a positive number of GiB, got {budget_gib!r}")
    hq = shape.n_heads
    variants = [("model", shape)]
    variants += [
        ("MHA", shape.with_kv_heads(hq, "MHA")),
        ("GQA", shape.with_kv_heads(_gqa_kv_heads(hq), "GQA")),
        ("MQA", shape.with_kv_heads(1, "MQA")),
    ]
    rows = []
    budget = None if budget_gib is None else int(budget_gib * GiB)
    for label, v in variants:
        per_token = kv_bytes_per_token(v, dtype)
        active = [h for h in v.kv_heads_per_layer if h]
        row = {
            "variant": label,
            "kv_heads": v.describe_kv_heads(),
            "group_size": (hq / (sum(active) / len(active))) if active else None,
            "kv_bytes_per_token": per_token,
            "kv_bytes_per_sequence": per_token * context,
            "kv_bytes_total": per_token * context * batch,
        }
        if budget is not None:
            row["max_batch"] = budget // (per_token * context) if per_token else None
            row["max_context"] = budget // (per_token * batch) if per_token else None
        rows.append(row)
    model_row = rows[0]
    if budget is not None and model_row["max_batch"] == 0:
        need = model_row["kv_bytes_per_sequence"] / GiB
        raise ValueError(
            f"a budget of {budget_gib} GiB is too small for one sequence of {context} tokens "
            f"({need:.3g} GiB in {dtype}); raise --budget or lower --context"
        )
    return {
        "model": shape.name,
        "n_layers": shape.n_layers,
        "n_heads": hq,
        "head_dim": shape.head_dim,
        "dtype": dtype,
        "bytes_per_element": elem,
        "context": context,
        "batch": batch,
        "budget_bytes": budget,
        "kv_bytes_per_token": model_row["kv_bytes_per_token"],
        "kv_bytes_per_sequence": model_row["kv_bytes_per_sequence"],
        "kv_bytes_total": model_row["kv_bytes_total"],
        "variants": rows,
    }
