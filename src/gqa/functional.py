"""The one functional entry point, ``gqa.attention``, and its backend dispatch.

Backends (chosen by :func:`select_backend`, overridable with ``backend=``):

* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention(..., enable_gqa=True)``, used only
  where PyTorch runs a fused kernel that reads each KV head without copying it: no mask (or a
  causal mask with Tq == Tk, where top-left and bottom-right alignment agree), head_dim <= 256, and
  on CUDA only fp16/bf16. With an explicit mask, fp32 on CUDA or head_dim > 256, SDPA silently
  falls back to its math path, which repeats K/V into a copy. On CPU it is used for prefill
  (Tq >= ``SDPA_MIN_CPU_QUERIES``); for decode the grouped path is faster there.
* ``"grouped"``: folds the g query heads of a group into the rows of one matmul per KV head
  (q viewed as ``[B, Hkv, g*Tq, D]``), so K/V are read once and never repeated. Any mask.
  Softmax in fp32. Fully masked rows give zeros.
* ``"kernel"``: the decode kernels of :mod:`gqa.kernels`, chosen first wherever
  :func:`gqa.kernels.supports` says they apply (and no weights are asked for): Tq <= 16 and Tq <= Tk;
  on CUDA the Triton split-KV kernel (fp16/bf16/fp32, head_dim <= 256, masks made of causal,
  sliding-window, chunked and key-padding-lengths parts; it skips tiles outside a window or chunk);
  on CPU the split-KV path for fp32/bf16 with at least ``gqa.kernels.CPU_MIN_KEYS`` keys and any
  mask. Neither runs when autograd must record the call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gqa.masks import Causal, Mask, as_bool_mask

__all__ = ["attention", "select_backend", "grouped_attention", "check_qkv", "BACKENDS"]

BACKENDS = ("auto", "sdpa", "grouped", "kernel")

#: On CPU, SDPA's fused (flash) kernel beats the grouped matmul only for longer query blocks.
SDPA_MIN_CPU_QUERIES = 16


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int]:
    """Validate shapes/dtypes/devices; return (Hq, Hkv, g). Raises a one-line error naming the fix."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims [B, H, T, D], got shape {tuple(t.shape)}; "
                "add a batch dim with .unsqueeze(0) or transpose [B, T, H, D] with .transpose(1, 2)"
            )
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device}); move them to one")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}; use one batch size")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k has {k.shape[1]} heads but v has {v.shape[1]}; k and v must share Hkv")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k has {k.shape[2]} keys but v has {v.shape[2]} values; k and v lengths must match")
    if not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise ValueError(
            f"head_dim differs: q {q.shape[3]}, k {k.shape[3]}, v {v.shape[3]}; q, k and v need the same head_dim"
        )
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"Hq={hq} query heads is not divisible by Hkv={hkv} KV heads; choose Hkv among the divisors of {hq}"
        )
    return hq, hkv, hq // hkv


def _is_plain_causal(mask) -> bool:
    return isinstance(mask, Causal)


def select_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Mask | torch.Tensor | None = None,
    return_weights: bool = False,
) -> str:
    """The backend ``attention`` would use for these inputs (see the module docstring)."""
    if return_weights:
        return "grouped"  # the only path that exposes probabilities
    from gqa import kernels

    if kernels.supports(q, k, v, mask):
        return "kernel"
    tq, tk, d = q.shape[2], k.shape[2], q.shape[3]
    mask_ok = mask is None or (_is_plain_causal(mask) and tq == tk) or (_is_plain_causal(mask) and tq == 1)
    if not mask_ok or d > 256:
        return "grouped"
    if q.is_cuda:
        return "sdpa" if q.dtype in (torch.float16, torch.bfloat16) else "grouped"
    if q.device.type == "cpu" and tq >= SDPA_MIN_CPU_QUERIES:
        return "sdpa"
    return "grouped"


#: The grouped path materialises fp32 scores [B, Hq, Tq_block, Tk]; long prefills are cut into query
#: blocks so that buffer stays under this many bytes.
GROUPED_SCORES_BYTES = 64 * 2**20


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    return_weights: bool = False,
):
    """Grouped path: the g query heads of KV head j (heads j*g .. j*g+g-1) become rows of one matmul.

    q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], mask bool broadcastable to [B, Hq, Tq, Tk] or None.
    Returns out [B, Hq, Tq, D] (and probabilities [B, Hq, Tq, Tk] when asked). Long query blocks are
    processed in slices so the fp32 score buffer stays under ``GROUPED_SCORES_BYTES``.
    """
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    block = max(1, GROUPED_SCORES_BYTES // (4 * b * hq * max(tk, 1)))
    if return_weights or tq <= block:
        return _grouped_block(q, k, v, mask, scale, return_weights)
    outs = []
    for s in range(0, tq, block):
        m = mask if mask is None or mask.shape[2] == 1 else mask[:, :, s : s + block]
        outs.append(_grouped_block(q[:, :, s : s + block], k, v, m, scale, False))
    return torch.cat(outs, dim=2)  # (B, Hq, Tq, D)


def _grouped_block(q, k, v, mask, scale, return_weights):
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, hkv, g * tq, d)  # (B, Hkv, g*Tq, D): head h = j*g + i -> row i*Tq + t of KV head j
    scores = torch.matmul(qg, k.transpose(-1, -2))  # (B, Hkv, g*Tq, Tk), K read once per group
    scores = scores.view(b, hkv, g, tq, tk).float().mul_(scale)  # (B, Hkv, g, Tq, Tk), fp32 softmax
    if mask is not None:
        if mask.shape[1] == 1:
            m5 = mask.unsqueeze(2)  # (B|1, 1, 1, Tq|1, Tk|1)
        else:
            m5 = mask.reshape(mask.shape[0], hkv, g, mask.shape[2], mask.shape[3])  # (B|1, Hkv, g, Tq|1, Tk|1)
        scores.masked_fill_(~m5, float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
        probs = torch.exp(scores - row_max)
        denom = probs.sum(dim=-1, keepdim=True)
        probs = probs / torch.where(denom == 0, torch.ones_like(denom), denom)  # fully masked -> 0
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(v.dtype).view(b, hkv, g * tq, tk), v)  # (B, Hkv, g*Tq, D)
    out = out.view(b, hq, tq, d)  # (B, Hq, Tq, D)
    if return_weights:
        return out, probs.view(b, hq, tq, tk)
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: Mask | torch.Tensor | None = None,
    scale: float | None = None,
    return_weights: bool = False,
    backend: str = "auto",
):
    """Grouped-query attention.

    Args:
        q: queries ``[B, Hq, Tq, D]``.
        k: keys ``[B, Hkv, Tk, D]`` with Hq divisible by Hkv (g = Hq // Hkv).
        v: values ``[B, Hkv, Tk, D]``.
        mask: None (attend everywhere), a :mod:`gqa.masks` mask, or a bool tensor broadcastable to
            ``[B, Hq, Tq, Tk]`` (True = attend). Causal masks are aligned **bottom-right**: query i is
            at absolute position ``Tk - Tq + i`` and sees keys ``0 .. Tk - Tq + i``.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_weights: also return the attention probabilities ``[B, Hq, Tq, Tk]`` (fp32).
        backend: ``"auto"`` (see :func:`select_backend`), ``"sdpa"``, ``"grouped"`` or ``"kernel"``.

    Returns:
        ``[B, Hq, Tq, D]`` in q's dtype, or ``(out, weights)`` when ``return_weights``.

    Head mapping: query head h uses KV head ``h // g``. With Hq = 8 and Hkv = 2 (g = 4), query heads
    0-3 read KV head 0 and heads 4-7 read KV head 1 (the transformers ``repeat_kv`` and FlashAttention
    convention, never ``h % Hkv``). K/V are never repeated into a copy. Rows whose keys are all
    masked out return zeros.
    """
    hq, hkv, g = check_qkv(q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    b, _, tq, d = q.shape
    tk = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if backend == "auto":
        backend = select_backend(q, k, v, mask, return_weights)
    if return_weights and backend != "grouped":
        raise ValueError("return_weights=True needs the grouped backend; drop backend= or set backend='grouped'")

    if backend == "kernel":
        from gqa import kernels

        return kernels.attention(q, k, v, mask=mask, scale=scale)

    if backend == "sdpa":
        # Only fused SDPA kernels are selected automatically; a forced "sdpa" with a general mask
        # is allowed (for benchmarks) and runs PyTorch's math path.
        if mask is None or (_is_plain_causal(mask) and tq == 1):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=g > 1)
        if _is_plain_causal(mask) and tq == tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=g > 1)
        bool_mask = as_bool_mask(mask, batch=b, n_heads=hq, q_len=tq, k_len=tk, device=q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, scale=scale, enable_gqa=g > 1)
        # SDPA returns NaN for fully masked rows; the contract is zeros.
        return out.masked_fill(~bool_mask.any(dim=-1, keepdim=True), 0.0)

    bool_mask = as_bool_mask(mask, batch=b, n_heads=hq, q_len=tq, k_len=tk, device=q.device)
    return grouped_attention(q, k, v, bool_mask, scale, return_weights)
