"""Triton split-KV GQA decode kernel (FlashDecoding with the query group packed into the tile rows).

Stage 1 runs one program per (batch, KV head, row block, KV split). Its tile rows are the g query
heads of KV head j times the Tq query tokens: row ``m = i * Tq + t`` is query head ``h = j * g + i``
(the ``h // g`` mapping) at token t, padded to a power of two >= 16. Each program streams its share
of the visible keys once, BLOCK_N at a time (online softmax in fp32, base-2 exponentials), so every
KV byte is read once per row block instead of once per query head. Tiles outside a sliding window
or a chunk are never visited. Stage 2 merges the splits by their log-sum-exp; with one split,
stage 1 writes the output directly.

Keys may be contiguous (``[B, Hkv, T_max, D]``, a view of a static cache is fine) or paged
(``[num_pages, Hkv, page_size, D]`` with a ``[B, max_pages]`` int32 block table). Values have the same
layout with their own width Dv (usually D; a prefix view of the keys is fine). Every tensor is addressed
through its strides, so nothing is copied.

Importing this module decorates the kernels; with ``TRITON_INTERPRET=1`` set beforehand they run in
Triton's CPU interpreter (how CI tests them), on CPU tensors.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["split_kv_decode", "is_interpreted"]

LOG2E = 1.4426950408889634


def is_interpreted() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _INTERPRETED


@triton.jit
def _split_kv_stage1(
    Q,
    K,
    V,
    BlockTable,
    KvLens,
    QPos0,
    Out,
    PartialOut,
    PartialLse,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,  # batch stride (contiguous) or page stride (paged)
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_bt_b,
    stride_ob,
    stride_oh,
    stride_ot,
    scale_log2,
    n_kv_heads,
    n_row_blocks,
    q_len,
    group,
    window,
    chunk,
    page_size,
    rows_padded,
    HEAD_DIM: tl.constexpr,
    VALUE_DIM: tl.constexpr,
    N_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    PAGED: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // (n_kv_heads * n_row_blocks)
    j = (pid // n_row_blocks) % n_kv_heads
    row_block = pid % n_row_blocks

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)  # row m = i * Tq + t
    row_ok = rows < group * q_len
    head = j * group + rows // q_len  # query head h = j * g + i uses KV head j = h // g
    tok = rows % q_len
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    vdims = tl.arange(0, BLOCK_DV)
    vdim_ok = vdims < VALUE_DIM

    kv_len = tl.load(KvLens + b)
    q_pos0 = tl.load(QPos0 + b)  # absolute position of query token 0 (>= 0)
    q_pos = q_pos0 + tok
    last_pos = q_pos0 + q_len - 1

    # Keys any row of this program may see: [lo, hi). Whole tiles outside it are skipped.
    lo = 0
    hi = kv_len
    if CAUSAL:
        hi = tl.minimum(hi, last_pos + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, q_pos0 - window + 1)
    if HAS_CHUNK:
        lo = tl.maximum(lo, (q_pos0 // chunk) * chunk)
        hi = tl.minimum(hi, (last_pos // chunk + 1) * chunk)
    n_tiles = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    tiles_per_split = tl.cdiv(n_tiles, N_SPLITS)
    start = lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(hi, start + tiles_per_split * BLOCK_N)

    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qt + dims[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    for start_n in range(start, end, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        if PAGED:
            page = tl.load(BlockTable + b * stride_bt_b + keys // page_size, mask=key_ok, other=0).to(tl.int64)
            slot = keys % page_size
            k_base = K + page * stride_kb + j * stride_kh + slot * stride_kt  # (BLOCK_N,)
            v_base = V + page * stride_vb + j * stride_vh + slot * stride_vt
        else:
            k_base = K + b.to(tl.int64) * stride_kb + j * stride_kh + keys.to(tl.int64) * stride_kt
            v_base = V + b.to(tl.int64) * stride_vb + j * stride_vh + keys.to(tl.int64) * stride_vt
        k = tl.load(k_base[:, None] + dims[None, :], mask=key_ok[:, None] & dim_ok[None, :], other=0.0)  # (N, D)
        v = tl.load(v_base[:, None] + vdims[None, :], mask=key_ok[:, None] & vdim_ok[None, :], other=0.0)  # (N, Dv)
        if UPCAST_DOT:
            k = k.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
        allowed = key_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            allowed = allowed & (keys[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            allowed = allowed & (keys[None, :] > q_pos[:, None] - window)
        if HAS_CHUNK:
            allowed = allowed & ((keys[None, :] // chunk) == (q_pos[:, None] // chunk))
        s = tl.where(allowed, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v.dtype)  # the PV product runs at the cache precision, accumulated in fp32
        if UPCAST_DOT:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]  # rows with no visible key give zeros
    if N_SPLITS == 1:
        o_ptrs = Out + b * stride_ob + head[:, None] * stride_oh + tok[:, None] * stride_ot + vdims[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & vdim_ok[None, :])
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        bh = b * n_kv_heads + j
        part_rows = (bh * N_SPLITS + split) * rows_padded + rows  # PartialOut (B*Hkv, splits, rows_padded, Dv)
        tl.store(PartialOut + part_rows[:, None] * BLOCK_DV + vdims[None, :], out)
        tl.store(PartialLse + part_rows, lse)


@triton.jit
def _split_kv_stage2(
    PartialOut,
    PartialLse,
    Out,
    stride_ob,
    stride_oh,
    stride_ot,
    n_kv_heads,
    n_row_blocks,
    q_len,
    group,
    rows_padded,
    VALUE_DIM: tl.constexpr,
    N_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = pid // n_row_blocks
    b = bh // n_kv_heads
    j = bh % n_kv_heads
    rows = (pid % n_row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_DV)

    lse_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(N_SPLITS):
        lse_max = tl.maximum(lse_max, tl.load(PartialLse + (bh * N_SPLITS + s) * rows_padded + rows))
    lse_safe = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for s in range(N_SPLITS):
        part_rows = (bh * N_SPLITS + s) * rows_padded + rows
        w = tl.exp2(tl.load(PartialLse + part_rows) - lse_safe)  # 0 for a split that saw no key
        acc += w[:, None] * tl.load(PartialOut + part_rows[:, None] * BLOCK_DV + dims[None, :])
        total += w
    out = acc / tl.where(total > 0.0, total, 1.0)[:, None]

    row_ok = rows < group * q_len
    head = j * group + rows // q_len
    tok = rows % q_len
    o_ptrs = Out + b * stride_ob + head[:, None] * stride_oh + tok[:, None] * stride_ot + dims[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (dims < VALUE_DIM)[None, :])


def _built_for_interpreter() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_split_kv_stage1, InterpretedFunction)


_INTERPRETED = _built_for_interpreter()


def _block_sizes(rows: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): rows padded to a power of two >= 16 (tl.dot's minimum), capped so the
    fp32 accumulator fits in registers; key tiles of 64 (32 for head_dim 256). ``head_dim``: the wider of
    the key and value widths."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    cap = 128 if block_d <= 128 else 64
    if dtype == torch.float32:
        cap //= 2
    block_m = min(max(16, triton.next_power_of_2(rows)), cap)
    block_n = 64 if block_d <= 128 else 32
    return block_m, block_n, block_d


def _default_splits(device: torch.device, programs: int, max_visible: int, block_n: int) -> int:
    """Enough KV splits for about two programs per SM (CPU interpreter: up to 4), never more than tiles."""
    tiles = max(1, math.ceil(max_visible / block_n))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = math.ceil(2 * sms / programs)
    else:
        want = 4
    return max(1, min(want, tiles, 256))


def split_kv_decode(
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
    max_visible: int | None = None,
) -> torch.Tensor:
    """Launch the kernel. Inputs are validated by :mod:`gqa.kernels`; this only launches.

    q ``[B, Hq, Tq, D]``; k ``[B, Hkv, T_max, D]`` (contiguous cache, ``block_table`` None) or
    ``[num_pages, Hkv, page_size, D]`` with ``block_table`` ``[B, max_pages]`` int32; v the same with its own
    width Dv. ``kv_lens`` ``[B]`` int32: keys ``0 .. kv_lens[b]-1`` exist. ``q_pos0`` ``[B]`` int32: absolute
    position of query token 0. Query head h uses KV head ``h // g``. Returns ``[B, Hq, Tq, Dv]`` in q's dtype.
    """
    b, hq, tq, d = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    group = hq // hkv
    paged = block_table is not None
    for name, t in (("k", k), ("v", v)):
        if t.stride(3) != 1:
            raise ValueError(f"{name} must have a contiguous last (head_dim) dim; call .contiguous() on it")
    if q.stride(3) != 1:
        q = q.contiguous()
    out = torch.empty(b, hq, tq, dv, device=q.device, dtype=q.dtype)

    rows = group * tq
    block_m, block_n, _ = _block_sizes(rows, max(d, dv), q.dtype)
    block_d, block_dv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    n_row_blocks = triton.cdiv(rows, block_m)
    rows_padded = n_row_blocks * block_m
    if max_visible is None:
        max_visible = block_table.shape[1] * k.shape[2] if paged else k.shape[2]
    if num_splits is None:
        num_splits = _default_splits(q.device, b * hkv * n_row_blocks, max_visible, block_n)
    if num_splits > 1:
        partial_out = torch.empty(b * hkv, num_splits, rows_padded, block_dv, device=q.device, dtype=torch.float32)
        partial_lse = torch.empty(b * hkv, num_splits, rows_padded, device=q.device, dtype=torch.float32)
    else:
        partial_out = partial_lse = out  # unused
    if block_table is None:
        block_table = kv_lens  # unused placeholder pointer
        stride_bt_b = 0
    else:
        block_table = block_table.contiguous()  # the kernel steps along a row with stride 1
        stride_bt_b = block_table.stride(0)

    interpreted = is_interpreted()
    fp32 = q.dtype == torch.float32
    grid = (b * hkv * n_row_blocks, num_splits)
    _split_kv_stage1[grid](
        q,
        k,
        v,
        block_table,
        kv_lens,
        q_pos0,
        out,
        partial_out,
        partial_lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        stride_bt_b,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        scale * LOG2E,
        hkv,
        n_row_blocks,
        tq,
        group,
        window or 1,
        chunk or 1,
        k.shape[2] if paged else 1,
        rows_padded,
        HEAD_DIM=d,
        VALUE_DIM=dv,
        N_SPLITS=num_splits,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        CAUSAL=causal or window is not None,
        HAS_WINDOW=window is not None,
        HAS_CHUNK=chunk is not None,
        PAGED=paged,
        # The interpreter multiplies with numpy, which has no bf16: there the tiles are widened to fp32
        # after loading (values identical; the products are then exact instead of tensor-core rounded).
        UPCAST_DOT=interpreted and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if fp32 else None,  # fp32 stays fp32 (no tf32 rounding)
        num_warps=4 if block_m * max(block_d, block_dv) <= 64 * 128 else 8,
        num_stages=2,
    )
    if num_splits > 1:
        _split_kv_stage2[(b * hkv * n_row_blocks,)](
            partial_out,
            partial_lse,
            out,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            hkv,
            n_row_blocks,
            tq,
            group,
            rows_padded,
            VALUE_DIM=dv,
            N_SPLITS=num_splits,
            BLOCK_M=block_m,
            BLOCK_DV=block_dv,
            num_warps=4,
        )
    return out
