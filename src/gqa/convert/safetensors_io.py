"""Streaming safetensors I/O: read one tensor at a time, write tensors as they are produced.

Why not ``safetensors.safe_open`` / ``save_file``: ``safe_open`` memory-maps the whole shard, and
every page it touches stays in the process's resident set until the file is closed (a 10 GB shard
of Llama-2-7B ends up fully resident), and ``save_file`` needs every tensor of a shard in memory at
once. Here a shard's header is parsed up front (so a truncated file is refused before anything is
written), each tensor is read with a plain positioned read into a fresh buffer, and an output
shard's header is written first (shapes are known before conversion starts) followed by each
tensor's bytes as soon as it is converted. Peak memory is then about the largest tensor.

The file format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length, a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {}}``
padded with spaces to a multiple of 8 bytes, then the tensor bytes back to back.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DTYPES", "DTYPE_NAMES", "TensorInfo", "read_header", "read_tensor", "SafetensorsWriter"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file`` and absolute byte range ``[begin, end)``, with dtype and shape."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | Path) -> tuple[list[TensorInfo], dict]:
    """Parse a safetensors file's header -> (tensors in file order, ``__metadata__``).

    Checks that every tensor's byte range matches its dtype and shape and lies inside the file, so a
    truncated or corrupt file fails here, with a one-line ValueError, rather than halfway through.
    """
    path = Path(path)
    size = path.stat().st_size
    bad = f"cannot read {path.name}: the file is truncated or not safetensors"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{bad} (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{bad} (header of {n} bytes in a file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{bad} (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{bad} (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    infos = []
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{bad} (tensor {name!r} has dtype {entry.get('dtype')!r} or a malformed entry)") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != math.prod(shape) * itemsize:
            raise ValueError(f"{bad} (tensor {name!r} has {end - begin} bytes for shape {shape})")
        if data_start + end > size:
            raise ValueError(f"{bad} (tensor {name!r} ends at byte {data_start + end} of {size})")
        infos.append(TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end))
    infos.sort(key=lambda t: t.begin)  # file order: reads stream sequentially
    return infos, metadata


def read_tensor(info: TensorInfo, handle=None) -> torch.Tensor:
    """Read one tensor into fresh memory (no memory map). ``handle``: an open binary file to reuse."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    own = handle is None
    f = open(info.file, "rb") if own else handle
    try:
        f.seek(info.begin)
        got = f.readinto(buf.numpy()) if info.nbytes else 0
    finally:
        if own:
            f.close()
    if got != info.nbytes:
        raise ValueError(f"cannot read {info.file.name}: tensor {info.name!r} is truncated; the file is incomplete")
    return buf.view(info.dtype).reshape(info.shape)  # safetensors is little-endian, like every torch host


class SafetensorsWriter:
    """Write one safetensors file whose tensors (names, dtypes, shapes, order) are declared up front.

    ``specs``: ``[(name, dtype, shape), ...]`` in the order :meth:`write` will be called.
    """

    def __init__(self, path: str | Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata=None):
        self.path = Path(path)
        self._expected = list(specs)
        self._next = 0
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in specs:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned
        self.nbytes = 8 + len(raw) + offset
        self._f = open(self.path, "wb", buffering=0)  # unbuffered: raw copies below go through the same fd
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``, which must be the next declared one, with its declared dtype and shape."""
        want_name, want_dtype, want_shape = self._expected[self._next]
        if name != want_name or tensor.dtype != want_dtype or tuple(tensor.shape) != tuple(want_shape):
            raise RuntimeError(
                f"writer expected {want_name} {want_dtype} {tuple(want_shape)}, got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        self._f.write(memoryview(data.numpy()))
        self._next += 1

    def copy_from(self, name: str, info: TensorInfo, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """Append the bytes of source tensor ``info`` unchanged, copied inside the kernel
        (``copy_file_range``, no trip through user memory); it must be the next declared tensor."""
        want_name, want_dtype, want_shape = self._expected[self._next]
        if (name, dtype, tuple(shape)) != (want_name, want_dtype, tuple(want_shape)) or info.dtype != dtype:
            raise RuntimeError(f"writer expected {want_name} {want_dtype} {tuple(want_shape)}, got {name}")
        with open(info.file, "rb") as src:
            done = 0
            while done < info.nbytes:
                n = os.copy_file_range(src.fileno(), self._f.fileno(), info.nbytes - done, info.begin + done)
                if n == 0:
                    raise ValueError(f"cannot read {info.file.name}: tensor {info.name!r} is truncated")
                done += n
        self._next += 1

    def close(self, fsync: bool = False) -> None:
        if self._next != len(self._expected):
            self._f.close()
            raise RuntimeError(f"{self.path.name}: wrote {self._next} of {len(self._expected)} declared tensors")
        self._f.flush()
        if fsync:
            os.fsync(self._f.fileno())
        self._f.close()
