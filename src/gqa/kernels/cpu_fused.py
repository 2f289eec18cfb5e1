"""The fused CPU decode kernel (``cpu_decode.cpp``): built on first use, with a visible fallback.

The C++ source ships inside the package and is compiled the first time a CPU decode step needs it,
with ``torch.utils.cpp_extension.load`` (g++ or clang++ and ninja; ``-O3 -march=native -fopenmp``),
into a per-machine cache directory::

    $GQA_KERNEL_CACHE (default $XDG_CACHE_HOME/gqa/kernels, i.e. ~/.cache/gqa/kernels)
        cpu_decode-<hash of source, flags, torch version and CPU>/

An exclusive ``fcntl`` lock on ``<that directory>.lock`` serialises concurrent builds (parallel test
workers, several processes); the kernel calls no Python, so it needs no Python headers either.
Where the build cannot run (no compiler, no ninja, a read-only cache) :func:`available` is False,
:func:`status` says why, a ``RuntimeWarning`` says so once per process, and :mod:`gqa.kernels`
runs the torch split-KV path of :mod:`gqa.kernels.cpu` instead. ``GQA_CPU_KERNEL=torch`` turns the
fused kernel off on purpose (no warning).

Query head h uses KV head ``h // g``; the query tokens are the last Tq of each sequence.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import platform
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch

from gqa.atomic import write_text_atomic
from gqa.errors import GQAUserError

__all__ = ["available", "status", "fused_decode", "linears_op", "FUSED_DTYPES", "SOURCE"]

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
#: Cache dtypes the kernel reads directly (arithmetic is always fp32).
FUSED_DTYPES = (torch.float32, torch.bfloat16)
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-DNDEBUG"]
LDFLAGS = ["-fopenmp"]
#: Keys per split below which splitting the sequence further costs more than it balances.
MIN_KEYS_PER_SPLIT = 512
LOG2E = 1.4426950408889634
#: Part of the cache key: bumped when what a build folder holds changes (2: a verified SHA-256 manifest).
CACHE_LAYOUT = "2"
#: The SHA-256 of the library a finished build wrote, checked before every load.
MANIFEST = "gqa_cpu_decode.so.sha256"

_NO_START = torch.empty(0, dtype=torch.int32)  # kv_start not given: every sequence's keys start at 0
_state: dict = {"op": None, "reason": None, "tried": False}


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags (a cache shared by two machines must
    not hand one the other's instructions)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines) or platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def cache_dir() -> Path:
    """The build directory for this source, compiler flags, torch version and CPU."""
    # An empty variable means unset (never the current folder); a relative one is made absolute now, so
    # status() and later builds name the same folder wherever the process moves.
    root = os.environ.get("GQA_KERNEL_CACHE") or ""
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gqa" / "kernels"
    key = hashlib.sha256(CACHE_LAYOUT.encode())
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS + LDFLAGS).encode(), torch.__version__.encode()):
        key.update(part)
    key.update(_cpu_signature().encode())
    key.update(sys.version.encode())
    return Path(root).absolute() / f"cpu_decode-{key.hexdigest()[:16]}"


def _library(build_dir: Path) -> Path:
    return build_dir / "gqa_cpu_decode.so"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(build_dir: Path) -> bool:
    """Whether the cached library is the one a finished build recorded (same SHA-256): a truncated or
    overwritten ``.so`` would crash the process (SIGBUS) when loaded, and ninja, seeing it newer than the
    source, would never rebuild it."""
    so, manifest = _library(build_dir), build_dir / MANIFEST
    try:
        return so.is_file() and manifest.read_text().strip() == _digest(so)
    except OSError:
        return False


def _discard_damaged(build_dir: Path) -> None:
    """Empty a build folder whose library is not verified, so the build starts from nothing."""
    if not _library(build_dir).exists():
        return
    print(f"gqa: the cached CPU decode kernel in {build_dir} is damaged or unverified; rebuilding it", file=sys.stderr)
    for entry in build_dir.iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An flock held while building: released by the OS even if the holder is killed."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _ninja_on_path():
    """torch's builder runs ``ninja`` from PATH; the pip ``ninja`` package puts it in the venv's bin,
    which is not on PATH when the venv's python is run without activating it."""
    old = os.environ.get("PATH", "")
    try:
        if shutil.which("ninja") is None:
            with contextlib.suppress(ImportError):
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + old
        yield
    finally:
        os.environ["PATH"] = old


def _build():
    from torch.utils import cpp_extension

    build_dir = cache_dir()
    with _exclusive(build_dir.with_suffix(".lock")):
        build_dir.mkdir(parents=True, exist_ok=True)
        # torch's own build baton is a plain file: a build killed midway leaves it behind and the next
        # build would wait on it forever. Our flock is held, so no other gqa build is running.
        with contextlib.suppress(FileNotFoundError):
            (build_dir / "lock").unlink()
        verified = _verified(build_dir)
        if not verified:
            _discard_damaged(build_dir)
        if not _library(build_dir).exists():
            print("gqa: building the fused CPU decode kernel (once per machine, about a minute)...", file=sys.stderr)
        with _ninja_on_path():
            cpp_extension.load(
                name="gqa_cpu_decode",
                sources=[str(SOURCE)],
                extra_cflags=CFLAGS,
                extra_ldflags=LDFLAGS,
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
        if not verified:  # a build that loaded: record what it wrote
            write_text_atomic(build_dir / MANIFEST, _digest(_library(build_dir)) + "\n")
    _state["dir"] = build_dir
    return torch.ops.gqa_cpu_decode.decode


def _load():
    if _state["tried"]:
        return _state["op"]
    _state["tried"] = True
    choice = os.environ.get("GQA_CPU_KERNEL", "auto").lower()
    if choice in ("torch", "0", "off", "none"):
        _state["reason"] = f"turned off by GQA_CPU_KERNEL={choice}"
        return None
    try:
        _state["op"] = _build()
    except Exception as e:  # noqa: BLE001 - any build failure means the fallback, stated loudly below
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        first_error = next((ln for ln in lines if "error" in ln.lower() and "build stopped" not in ln), None)
        _state["reason"] = f"{type(e).__name__}: {(first_error or (lines[-1] if lines else ''))[:200]}"
        warnings.warn(
            f"gqa: the fused CPU decode kernel could not be built ({_state['reason']}); CPU decode runs the "
            "slower torch path. Install a C++ compiler (g++) and ninja, or set GQA_CPU_KERNEL=torch to "
            "silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _state["op"]


def linears_op():
    """The kernel library's small-batch linear layers (``x [M, K]``, weights ``[N_i, K]``, biases ``[N_i]`` or
    empty, fp32 or bf16 -> ``[M, sum N_i]``), or None where the library is not built (see :func:`status`)."""
    return None if _load() is None else torch.ops.gqa_cpu_decode.linears


def available() -> bool:
    """Whether the fused kernel is built and loaded (builds it on the first call)."""
    return _load() is not None


def status() -> str:
    """One line: the fused kernel is in use, or why not."""
    if available():
        return f"fused C++ kernel loaded (built in {_state.get('dir')})"
    return f"torch fallback: {_state['reason']}"


def default_splits(batch: int, n_kv_heads: int, max_keys: int) -> int:
    """KV splits per (sequence, KV head): about 8 work items per thread (handed out dynamically, so a
    descheduled thread's share moves to the others on a shared machine), never under
    ``MIN_KEYS_PER_SPLIT`` keys per split."""
    want = math.ceil(8 * torch.get_num_threads() / max(1, batch * n_kv_heads))
    return max(1, min(want, max_keys // MIN_KEYS_PER_SPLIT))


def fused_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: torch.Tensor,
    q_pos0: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    window: int | None,
    chunk: int | None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
    kv_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the fused kernel (call :func:`available` first).

    q ``[B, Hq, Tq, D]``; k/v ``[B, Hkv, T, D]`` (views of a larger cache are fine) or, with
    ``block_table`` ``[B, max_pages]`` int, pages ``[num_pages, Hkv, page_size, D]``; fp32 or bf16. v may have
    its own width Dv (a view of k's first Dv columns reads each row once), the output's.
    ``kv_lens`` ``[B]``: keys ``0 .. kv_lens[b]-1`` exist; ``q_pos0`` ``[B]``: position of query token 0;
    ``kv_start`` ``[B]`` (optional): keys ``0 .. kv_start[b]-1`` are left padding, never read.
    ``causal``/``window``/``chunk`` as in :mod:`gqa.masks`. Page ids must be valid (checked by the
    caller, or here: the kernel refuses any id it would read outside the pages, a GQAUserError). Returns ``[B, Hq, Tq, Dv]`` in q's dtype;
    rows with no visible key are zeros.
    """
    op = _load()
    if op is None:
        raise RuntimeError(f"the fused CPU decode kernel is not available ({_state['reason']})")
    if k.dtype not in FUSED_DTYPES or v.dtype != k.dtype:
        raise RuntimeError(f"the fused CPU decode kernel reads fp32 or bf16 caches, got {k.dtype}")
    b, hq, tq, d = q.shape
    if q.dtype == torch.bfloat16 and k.dtype == torch.bfloat16:
        # Unscaled and unrounded: the kernel scales the fp32 scores, so bf16 dot products add no error.
        qs, q_scale = q.contiguous(), scale * LOG2E
    else:
        qs, q_scale = (q.float() * (scale * LOG2E)).contiguous(), 1.0  # (B, Hq, Tq, D) fp32, scale folded in
    k = k if k.stride(3) == 1 else k.contiguous()
    v = v if v.stride(3) == 1 else v.contiguous()
    table = torch.empty(0, 0, dtype=torch.int32) if block_table is None else block_table.to(torch.int32).contiguous()
    kv_lens = kv_lens.to(torch.int32).contiguous()
    q_pos0 = q_pos0.to(torch.int32).contiguous()
    start = _NO_START if kv_start is None else kv_start.to(torch.int32).contiguous()
    if num_splits is None:
        max_keys = int(kv_lens.max()) if kv_lens.numel() else 0
        if window is not None:
            max_keys = min(max_keys, window + tq - 1)
        if chunk is not None:
            max_keys = min(max_keys, chunk + tq - 1)
        num_splits = default_splits(b, k.shape[1], max_keys)
    causal = bool(causal) or window is not None  # a sliding window is causal (gqa.masks.sliding_window)
    try:
        out = op(qs, k, v, table, kv_lens, q_pos0, start, causal, int(window or 0), int(chunk or 0), int(num_splits),
                 float(q_scale))
    except RuntimeError as e:  # the kernel checks every page id it reads (free there): a bad table is the user's
        found = re.search(r"gqa cpu decode: page id (-?\d+) outside 0\.\.(-?\d+)", str(e))
        if found is None:
            raise
        raise GQAUserError(
            f"block_table holds page ids outside 0..{found.group(2)} for pages in use (got {found.group(1)}); "
            "fix the table"
        ) from None
    return out.to(q.dtype)  # (B, Hq, Tq, Dv)
