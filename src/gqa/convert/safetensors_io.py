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

import errno
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from gqa.errors import GQAUserError, first_line
from gqa.units import element_size

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
# copy_file_range cannot copy between filesystems (EXDEV, before Linux 5.19 / on some filesystems) or is
# missing (ENOSYS, EOPNOTSUPP, EINVAL on special files): fall back to plain chunked reads and writes.
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTSUP}
_CHUNK = 64 * 1024 * 1024


def _copy_chunk(src, dst, offset: int, remaining: int) -> int:
    """Copy up to one chunk of ``src`` from ``offset`` to the end of ``dst``; returns the bytes copied."""
    src.seek(offset)
    data = src.read(min(_CHUNK, remaining))
    _write_all(dst, memoryview(data))
    return len(data)


def _write_all(f, data: memoryview) -> None:
    """Write all of ``data`` to an unbuffered file (a raw write may take only part of it)."""
    data = data.cast("B")
    while len(data):
        n = f.write(data)
        data = data[n:]


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


def _entry(name, entry, bad: str, dtype_names) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """One header entry -> (dtype, shape, begin, end) relative to the data section, all checked."""
    if not isinstance(entry, dict):
        raise GQAUserError(f"{bad} (header entry {name!r} is a {type(entry).__name__}, not an object)")
    dt = entry.get("dtype")
    if not isinstance(dt, str) or dt not in DTYPES:
        raise GQAUserError(
            f"{bad} (tensor {name!r} has dtype {dt!r}; gqa reads {', '.join(dtype_names)}): dequantize or re-save it"
        )
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(s) is int and 0 <= s < 2**53 for s in shape):
        raise GQAUserError(f"{bad} (tensor {name!r} has shape {shape!r}; dims must be non-negative integers)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and 0 <= o < 2**63 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise GQAUserError(
            f"{bad} (tensor {name!r} has data_offsets {offsets!r}; expected [begin, end], 0 <= begin <= end)"
        )
    return DTYPES[dt], tuple(shape), offsets[0], offsets[1]


def read_header(path: str | Path) -> tuple[list[TensorInfo], dict]:
    """Parse a safetensors file's header -> (tensors in file order, ``__metadata__``).

    Checks every entry before anything is written: an object with a known dtype, non-negative integer
    dims, ``data_offsets`` whose length matches dtype x shape, inside the file, and not overlapping
    another tensor. A truncated or corrupt file fails here with a one-line :class:`GQAUserError`.
    """
    path = Path(path)
    size = path.stat().st_size
    bad = f"cannot read {path.name}: the file is truncated or not safetensors"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise GQAUserError(f"{bad} (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise GQAUserError(f"{bad} (header of {n} bytes in a file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise GQAUserError(f"{bad} (header is not JSON: {first_line(e)})") from None
    if not isinstance(header, dict):
        raise GQAUserError(f"{bad} (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise GQAUserError(f"{bad} (__metadata__ is not an object)")
    data_start = 8 + n
    infos = []
    for name, entry in header.items():
        dtype, shape, begin, end = _entry(name, entry, bad, list(DTYPES))
        itemsize = element_size(dtype)
        if end - begin != math.prod(shape) * itemsize:
            raise GQAUserError(
                f"{bad} (tensor {name!r} has {end - begin} bytes for shape {shape} of {DTYPE_NAMES[dtype]})"
            )
        if data_start + end > size:
            raise GQAUserError(f"{bad} (tensor {name!r} ends at byte {data_start + end} of {size})")
        infos.append(TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end))
    infos.sort(key=lambda t: (t.begin, t.end))  # file order: reads stream sequentially
    for prev, cur in zip(infos, infos[1:], strict=False):
        if cur.begin < prev.end:
            raise GQAUserError(f"{bad} (tensors {prev.name!r} and {cur.name!r} overlap)")
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
        raise GQAUserError(f"cannot read {info.file.name}: tensor {info.name!r} is truncated; the file is incomplete")
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
            nbytes = math.prod(shape) * element_size(dtype)
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
        _write_all(self._f, memoryview(struct.pack("<Q", len(raw)) + raw))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``, which must be the next declared one, with its declared dtype and shape."""
        want_name, want_dtype, want_shape = self._expected[self._next]
        if name != want_name or tensor.dtype != want_dtype or tuple(tensor.shape) != tuple(want_shape):
            raise RuntimeError(
                f"writer expected {want_name} {want_dtype} {tuple(want_shape)}, got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        _write_all(self._f, memoryview(data.numpy()))
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
                try:
                    n = os.copy_file_range(src.fileno(), self._f.fileno(), info.nbytes - done, info.begin + done)
                except OSError as e:
                    if e.errno not in _NO_COPY_RANGE:
                        raise
                    n = _copy_chunk(
                        src, self._f, info.begin + done, info.nbytes - done
                    )  # e.g. OUT on another filesystem
                if n == 0:
                    raise GQAUserError(f"cannot read {info.file.name}: tensor {info.name!r} is truncated")
                done += n
        self._next += 1

    def abort(self) -> None:
        """Close the file after a failure (the caller removes the folder)."""
        self._f.close()

    def close(self, fsync: bool = False) -> None:
        if self._next != len(self._expected):
            self._f.close()
            raise RuntimeError(f"{self.path.name}: wrote {self._next} of {len(self._expected)} declared tensors")
        self._f.flush()
        if fsync:
            os.fsync(self._f.fileno())
        self._f.close()
