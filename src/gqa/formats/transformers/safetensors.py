"""Safetensors files and folders: the one reader (a folder's shards and their headers, one tensor at a
time) and the streaming writer.

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

:func:`read_folder` lists a model folder's shards (``model.safetensors``, ``*.safetensors`` or the ones a
``model.safetensors.index.json`` names: bare file names inside the folder only) with their checked
headers; the folder loader (:func:`gqa.formats.transformers.load_weights`) and the streaming converter
both read through it.
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
from gqa.formats.dtypes import TABLE
from gqa.model.files import read_json_object, safe_member
from gqa.units import element_size

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "INDEX_NAME",
    "TensorInfo",
    "read_header",
    "read_tensor",
    "read_folder",
    "SafetensorsWriter",
]

INDEX_NAME = "model.safetensors.index.json"
#: safetensors header code -> torch dtype, from the one dtype table.
DTYPES: dict[str, torch.dtype] = {d.safetensors: d.torch for d in TABLE if d.safetensors}
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


def _shard_names(folder: Path) -> tuple[list[str], dict | None]:
    """The shard file names of ``folder`` (index order, else sorted) and the index's weight_map (or None)."""
    index = folder / INDEX_NAME
    if index.is_file():
        safe_member(folder, INDEX_NAME, INDEX_NAME)
        weight_map = read_json_object(index, fix="re-save the checkpoint").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise GQAUserError(f"{index} has no weight_map; re-save the checkpoint")
        files = list(dict.fromkeys(weight_map.values()))  # shard order as listed
        for name in files:
            path = safe_member(folder, name, f"{INDEX_NAME} weight_map")
            if not path.is_file():
                raise GQAUserError(f"shard {name} listed in {INDEX_NAME} is missing from {folder}; re-download it")
        return files, weight_map
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if other:
            raise GQAUserError(
                f"{folder} holds {other[0]} (pickle) but no *.safetensors; gqa reads only safetensors "
                "folders and GGUF files (pickles can run code): re-save it with safe_serialization=True"
            )
        raise GQAUserError(f"no *.safetensors files in {folder}; save the model with safe_serialization=True")
    for name in files:
        safe_member(folder, name, "safetensors file")  # not a symlink leading out of the folder
    return files, None


def read_folder(folder: str | Path) -> list[list[TensorInfo]]:
    """The tensors of a model folder, one list per shard (in file order), every header checked
    (:func:`read_header`): an index's shards hold exactly what it lists for them, and no tensor appears
    in two shards. Only bare file names inside ``folder`` are read (see :func:`gqa.model.files.safe_member`).
    """
    folder = Path(folder)
    files, weight_map = _shard_names(folder)
    shards, seen = [], set()
    for name in files:
        infos, _ = read_header(folder / name)
        names = {i.name for i in infos}
        if weight_map is not None and names != {k for k, v in weight_map.items() if v == name}:
            raise GQAUserError(f"{name} does not hold the tensors {INDEX_NAME} lists for it; re-save the checkpoint")
        dup = seen & names
        if dup:
            raise GQAUserError(f"tensor {sorted(dup)[0]!r} appears in more than one shard; re-save the checkpoint")
        seen |= names
        shards.append(infos)
    return shards
