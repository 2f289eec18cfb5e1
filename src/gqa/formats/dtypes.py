"""The one dtype table: name <-> torch dtype <-> safetensors code <-> GGUF type <-> bytes per element.

Every other dtype table derives from :data:`TABLE`: the names users may pass (:data:`gqa.units.DTYPES`),
the safetensors codes the streaming reader and the folder loader accept, the GGUF export types and the
element types of a KV cache (:data:`gqa.memory.KV_DTYPES`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DType", "TABLE", "by_name", "by_torch", "by_safetensors", "user_names", "kv_names", "gguf_export_names"]


@dataclass(frozen=True)
class DType:
    """One element type.

    name: the canonical name (``torch.<name>``); aliases: other names users may write (``bf16``).
    safetensors: the header code gqa reads and writes (``BF16``); gguf: the GGML type name (``BF16``) and gguf_file_type
    llama.cpp's ``general.file_type`` for a file of mostly this type, where GGUF export writes it.
    user: a name the CLI and configs accept for model weights; kv: a KV-cache element type;
    loads: a safetensors code :func:`gqa.formats.transformers.load_weights` reads as model weights.
    """

    name: str
    torch: torch.dtype
    safetensors: str | None = None
    gguf: str | None = None
    gguf_file_type: int | None = None
    aliases: tuple[str, ...] = ()
    user: bool = False
    kv: bool = False
    loads: bool = False

    @property
    def nbytes(self) -> int:
        return self.torch.itemsize


TABLE: tuple[DType, ...] = (
    DType("float32", torch.float32, "F32", "F32", 0, ("fp32", "float"), user=True, kv=True, loads=True),
    DType("float16", torch.float16, "F16", "F16", 1, ("fp16", "half"), user=True, kv=True, loads=True),
    DType("bfloat16", torch.bfloat16, "BF16", "BF16", 32, ("bf16",), user=True, kv=True, loads=True),
    DType("float64", torch.float64, "F64", "F64", None, ("fp64",), user=True, loads=True),
    DType("float8_e4m3fn", torch.float8_e4m3fn, None, None, None, ("float8", "fp8"), kv=True),
    DType("int64", torch.int64, "I64", "I64"),
    DType("int32", torch.int32, "I32", "I32"),
    DType("int16", torch.int16, "I16", "I16"),
    DType("int8", torch.int8, "I8", "I8", kv=True),
    DType("uint8", torch.uint8, "U8"),
    DType("bool", torch.bool, "BOOL"),
)

_BY_NAME = {n: d for d in TABLE for n in (d.name, *d.aliases)}


def by_name(name: str) -> DType | None:
    """The row of a canonical name or alias (``"bf16"``, ``"torch.bfloat16"``), else None."""
    return _BY_NAME.get(name.strip().lower().removeprefix("torch."))


def by_torch(dtype: torch.dtype) -> DType | None:
    return next((d for d in TABLE if d.torch == dtype), None)


def by_safetensors(code: str) -> DType | None:
    return next((d for d in TABLE if d.safetensors == code), None)


def user_names() -> dict[str, torch.dtype]:
    """Every name (canonical and alias) of a user dtype -> torch dtype."""
    return {n: d.torch for d in TABLE if d.user for n in (d.name, *d.aliases)}


def kv_names() -> dict[str, torch.dtype]:
    """Names of KV-cache element types (canonical and aliases) -> torch dtype."""
    return {n: d.torch for d in TABLE if d.kv for n in (d.name, *d.aliases)}


def gguf_export_names() -> dict[str, DType]:
    """``f32`` / ``f16`` / ``bf16`` -> row: the types GGUF export writes matrices in."""
    return {d.gguf.lower(): d for d in TABLE if d.gguf_file_type is not None}
