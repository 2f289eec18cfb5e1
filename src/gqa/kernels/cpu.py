"""CPU decode fallback (torch ops): the grouped layout with the KV sequence split across threads.

The fused C++ kernel of :mod:`gqa.kernels.cpu_fused` replaces this path wherever it builds; this one
runs where no compiler is present, for masks the fused kernel does not take (arbitrary bool tensors,
custom functions), and for fp64 (computed in fp64).

For a decode step (Tq small) the grouped path's two matmuls are badly shaped for CPU BLAS: ``q @ K^T``
with g*Tq rows and ``P @ V`` with a reduction over all S keys run on one or two threads at a fraction
of the memory bandwidth. Here the scores are computed as ``K @ q^T`` (S rows, which BLAS splits across
threads), the softmax runs in fp32 over the whole visible range, and ``P @ V`` is cut into chunks of
``PV_CHUNK`` keys batched over (batch, KV head, chunk), so each thread reduces its own chunks and the
partial sums are added at the end. Each K and V byte is still read once per KV head: query head h
uses KV head h // g and no copy of K/V is made.

bf16 caches are computed in fp32 (fp64 in fp64): K and V are widened CONVERT_BYTES at a time into a reused fp32
buffer that stays in cache, so DRAM still sees each bf16 byte once and the scores are never rounded
to bf16 (rounding them tripled the error of SDPA in bf16).

Why these shapes (2 EPYC cores, fp32, 32 q / 8 kv heads, D = 128, S = 4096, warm caches, light load):
``K @ q^T`` took 0.8 ms against 8-10 ms for ``q @ K^T``, and the chunked ``P @ V`` 1.2 ms against
12 ms unchunked. Recorded end-to-end runs are in ``benchmarks/results``.
"""

from __future__ import annotations

import torch

__all__ = ["split_kv_decode_cpu", "PV_CHUNK"]

#: Keys per P @ V chunk; 256-1024 measured within 15% of each other, 512 best on 2 EPYC cores.
PV_CHUNK = 512
#: Bytes of bf16 keys/values widened to fp32 per step (inside a typical L3; at least 256 keys).
CONVERT_BYTES = 8 * 2**20


def _visible_range(
    kv_lens: torch.Tensor, q_pos0: torch.Tensor, tq: int, causal: bool, window: int | None, chunk: int | None
) -> tuple[int, int]:
    """[lo, hi): the keys any query of any sequence may see (tiles outside are never read)."""
    first = int(q_pos0.min())
    last = int(q_pos0.max()) + tq - 1
    hi = int(kv_lens.max())
    lo = 0
    if causal:
        hi = min(hi, last + 1)
    if window is not None:
        lo = max(lo, first - window + 1)
    if chunk is not None:
        lo = max(lo, (first // chunk) * chunk)
        hi = min(hi, (last // chunk + 1) * chunk)
    return lo, max(lo, hi)


def split_kv_decode_cpu(
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
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention on CPU.

    q ``[B, Hq, Tq, D]``; k ``[B, Hkv, T, D]``, v ``[B, Hkv, T, Dv]`` (views of a larger cache are fine; Dv is
    usually D). ``kv_lens`` ``[B]``:
    keys ``0 .. kv_lens[b]-1`` exist; ``q_pos0`` ``[B]``: absolute position of query token 0 (token t is
    at ``q_pos0[b] + t``). ``causal``/``window``/``chunk`` as in :mod:`gqa.masks`; ``extra_mask`` an
    optional bool tensor broadcastable to ``[B, Hq, Tq, T]`` (True = attend) for anything else.
    Query head h uses KV head ``h // g``. Rows with no visible key give zeros. Returns ``[B, Hq, Tq, Dv]`` in q's
    dtype.
    """
    causal = causal or window is not None
    ragged = bool((kv_lens != kv_lens[0]).any() or (q_pos0 != q_pos0[0]).any())
    if ragged and q.shape[0] > 1:
        # One sequence at a time, so no sequence reads (possibly uninitialised) slots past its own length.
        outs = []
        for i in range(q.shape[0]):
            m = None
            if extra_mask is not None:
                m = extra_mask[i : i + 1] if extra_mask.shape[0] > 1 else extra_mask
            one = slice(i, i + 1)
            outs.append(_uniform(q[one], k[one], v[one], kv_lens[one], q_pos0[one], scale, causal, window, chunk, m))
        return torch.cat(outs, dim=0)  # (B, Hq, Tq, Dv)
    return _uniform(q, k, v, kv_lens, q_pos0, scale, causal, window, chunk, extra_mask)


def _uniform(q, k, v, kv_lens, q_pos0, scale, causal, window, chunk, extra_mask):
    """The batched path for sequences that share their length and query positions."""
    b, hq, tq, d = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    g = hq // hkv
    lo, hi = _visible_range(kv_lens, q_pos0, tq, causal, window, chunk)
    n = hi - lo
    if n == 0:
        return q.new_zeros(b, hq, tq, dv)
    k_vis, v_vis = k[:, :, lo:hi], v[:, :, lo:hi]  # (B, Hkv, N, D) and (B, Hkv, N, Dv) views

    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # (B, Hkv, g*Tq, D): head h = j*g + i -> row i*Tq + t of KV head j; fp32 (fp64), scale folded in
    qg = q.reshape(b, hkv, g * tq, d).to(acc) * scale
    widen = k.dtype != acc
    if widen:  # bf16: widen a few MiB at a time into a reused fp32 buffer (cache-resident)
        width = max(d, dv)  # one buffer for K's and then V's chunks
        step = min(n, max(256, CONVERT_BYTES // (4 * b * hkv * width)))  # keys per widening step
        buf = torch.empty(b, hkv, step, width, dtype=acc)
        scores = torch.empty(b, hkv, n, g * tq, dtype=acc)
        for s in range(0, n, step):
            c = min(step, n - s)
            k_c = buf[:, :, :c, :d].copy_(k_vis[:, :, s : s + c])
            scores[:, :, s : s + c] = torch.matmul(k_c, qg.transpose(-1, -2))
    else:
        scores = torch.matmul(k_vis, qg.transpose(-1, -2))  # (B, Hkv, N, g*Tq): S rows split across threads

    if extra_mask is None and _all_visible(lo, hi, int(kv_lens[0]), int(q_pos0[0]), tq, causal, window, chunk):
        # The common decode step: every key in range is visible to every row. Fewer ops matter on
        # CPU: each is a parallel region whose threads must all be scheduled.
        probs = torch.softmax(scores, dim=2)  # (B, Hkv, N, g*Tq)
        dead = None
    else:
        probs, allowed = _masked_softmax(
            scores.view(b, hkv, n, g, tq), lo, hi, kv_lens, q_pos0, causal, window, chunk, extra_mask
        )
        probs = probs.view(b, hkv, n, g * tq)  # (B, Hkv, N, g*Tq) fp32
        # Keys no row may see get V = 0: their probability is 0, but 0 * NaN (an unused slot) is NaN.
        dead = ~allowed.flatten(3).any(dim=3)  # (B, Hkv|1, N)
        dead = dead[..., None] if bool(dead.any()) else None  # (B, Hkv|1, N, 1)

    if not widen:
        out = _chunked_pv(probs, v_vis if dead is None else v_vis.masked_fill(dead, 0.0))
    else:
        out = torch.zeros(b, hkv, g * tq, dv, dtype=acc)
        for s in range(0, n, step):
            c = min(step, n - s)
            v_c = buf[:, :, :c, :dv].copy_(v_vis[:, :, s : s + c])
            if dead is not None:
                v_c.masked_fill_(dead[:, :, s : s + c], 0.0)
            out += _chunked_pv(probs[:, :, s : s + c], v_c)
    return out.view(b, hq, tq, dv).to(q.dtype)  # (B, Hq, Tq, Dv)


def _all_visible(lo, hi, kv_len, q_pos0, tq, causal, window, chunk) -> bool:
    """Whether every key in [lo, hi) is visible to every query token (positions q_pos0 .. +Tq-1)."""
    first, last = q_pos0, q_pos0 + tq - 1
    if hi > kv_len or (causal and hi - 1 > first) or (window is not None and lo <= last - window):
        return False
    return chunk is None or lo // chunk == (hi - 1) // chunk == first // chunk == last // chunk


def _masked_softmax(scores, lo, hi, kv_lens, q_pos0, causal, window, chunk, extra_mask):
    """Softmax over keys (dim 2) of scores [B, Hkv, N, g, Tq] for keys lo..hi-1, in their dtype; rows with
    no visible key give zeros. Returns (probs, allowed [B, Hkv|1, N, g|1, Tq|1] bool)."""
    b, hkv, n, g, tq = scores.shape
    keys = torch.arange(lo, hi).view(1, n, 1)  # absolute key positions
    q_pos = (q_pos0.view(b, 1) + torch.arange(tq).view(1, tq)).view(b, 1, tq)  # (B, 1, Tq)
    allowed = keys < kv_lens.view(b, 1, 1)  # (B, N, 1)
    if causal:
        allowed = allowed & (keys <= q_pos)
    if window is not None:
        allowed = allowed & (keys > q_pos - window)
    if chunk is not None:
        allowed = allowed & (keys // chunk == q_pos // chunk)
    allowed = allowed.view(b, 1, n, 1, -1)  # (B, 1, N, 1, Tq|1)
    if extra_mask is not None:
        m = extra_mask[..., lo:hi] if extra_mask.shape[-1] != 1 else extra_mask  # (B|1, Hq|1, Tq|1, N|1)
        mb, mh, mt, mn = m.shape
        m = m.reshape(mb, hkv, g, mt, mn) if mh != 1 else m.reshape(mb, 1, 1, mt, mn)
        allowed = allowed & m.permute(0, 1, 4, 2, 3)  # (B|1, Hkv|1, N|1, g|1, Tq|1)
    scores.masked_fill_(~allowed, float("-inf"))
    row_max = scores.amax(dim=2, keepdim=True)  # (B, Hkv, 1, g, Tq)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    probs = scores.sub_(row_max).exp_()
    denom = probs.sum(dim=2, keepdim=True)
    probs = probs.div_(torch.where(denom == 0, torch.ones_like(denom), denom))  # no visible key -> 0
    return probs, allowed


def _chunked_pv(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs [B, Hkv, N, R] fp32, v [B, Hkv, N, Dv] fp32 -> P^T V [B, Hkv, R, Dv]: the N keys are cut into
    PV_CHUNK-key chunks batched over (B, Hkv, chunk), one reduction per thread, then summed."""
    b, hkv, n, r = probs.shape
    d = v.shape[-1]
    full = (n // PV_CHUNK) * PV_CHUNK
    out = None
    if full:
        nc = full // PV_CHUNK
        p_chunks = probs[:, :, :full].reshape(b, hkv, nc, PV_CHUNK, r).transpose(-1, -2)  # (B, Hkv, nc, R, C)
        v_chunks = v[:, :, :full].reshape(b, hkv, nc, PV_CHUNK, d)  # (B, Hkv, nc, C, D), a view
        out = torch.matmul(p_chunks, v_chunks).sum(dim=2)  # (B, Hkv, R, D)
    if full < n:
        tail = torch.matmul(probs[:, :, full:].transpose(-1, -2), v[:, :, full:])  # (B, Hkv, R, D)
        out = tail if out is None else out.add_(tail)
    return out
