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
  fp16/bf16 are computed in fp32 (q scaled before the dot product, probabilities never rounded to
  16 bits before ``P @ V``), fp64 in fp64. Fully masked rows give zeros.
* ``"kernel"``: the decode kernels of :mod:`gqa.kernels`, chosen first wherever
  :func:`gqa.kernels.supports` says they apply (and no weights are asked for): Tq <= 16 and Tq <= Tk;
  on CUDA the Triton split-KV kernel (fp16/bf16/fp32, head_dim <= 256, masks made of causal,
  sliding-window, chunked and key-padding-lengths parts; it skips tiles outside a window or chunk);
  on CPU (fp32/bf16) the fused C++ split-KV kernel for those masks from ``gqa.kernels.FUSED_MIN_KEYS``
  keys, and the torch split-KV path for any other mask (or where the C++ kernel cannot be built)
  from ``gqa.kernels.CPU_MIN_KEYS`` keys. Neither runs when autograd must record the call.

Every entry point (``gqa.attention``, ``gqa.kernels.decode_attention``,
``gqa.kernels.paged_decode_attention``) masks nothing unless asked: ``mask=None`` / ``causal=False``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gqa.errors import GQAUserError
from gqa.kernels.checks import check_scale, check_tensors
from gqa.masks import Causal, Mask, as_bool_mask

__all__ = ["attention", "select_backend", "grouped_attention", "check_qkv", "BACKENDS"]

BACKENDS = ("auto", "sdpa", "grouped", "kernel")

#: On CPU, SDPA's fused (flash) kernel beats the grouped matmul only for longer query blocks.
SDPA_MIN_CPU_QUERIES = 16


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int]:
    """Validate shapes/dtypes/devices; return (Hq, Hkv, g). Raises a one-line GQAUserError naming the fix."""
    check_tensors(q, k, v)
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise GQAUserError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}; use one batch size")
    if k.shape[1] != v.shape[1]:
        raise GQAUserError(f"k has {k.shape[1]} heads but v has {v.shape[1]}; k and v must share Hkv")
    if k.shape[2] != v.shape[2]:
        raise GQAUserError(f"k has {k.shape[2]} keys but v has {v.shape[2]} values; k and v lengths must match")
    hq, hkv = q.shape[1], k.shape[1]
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
    if tk == 0 or q.shape[0] == 0:
        return "grouped"  # no keys (rows of zeros) or no sequences: nothing for SDPA to do
    mask_ok = mask is None or (_is_plain_causal(mask) and tq == tk) or (_is_plain_causal(mask) and tq == 1)
    if not mask_ok or max(d, v.shape[3]) > 256:
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

    q [B, Hq, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv], mask bool broadcastable to [B, Hq, Tq, Tk] or None.
    Returns out [B, Hq, Tq, Dv] in q's dtype (and probabilities [B, Hq, Tq, Tk], fp32 or fp64, when asked).
    Long query blocks are processed in slices so the score buffer stays under ``GROUPED_SCORES_BYTES``.
    """
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    # fp16/bf16 are computed in fp32 (fp64 in fp64): scores never overflow or round to 8 bits, and
    # P @ V accumulates unrounded probabilities. The widened K/V copy is made once per call.
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = k.to(compute), v.to(compute)
    block = max(1, GROUPED_SCORES_BYTES // (4 * max(b * hq * tk, 1)))
    if return_weights or tq <= block:
        return _grouped_block(q, k, v, mask, scale, return_weights)
    outs = []
    for s in range(0, tq, block):
        m = mask if mask is None or mask.shape[2] == 1 else mask[:, :, s : s + block]
        outs.append(_grouped_block(q[:, :, s : s + block], k, v, m, scale, False))
    return torch.cat(outs, dim=2)  # (B, Hq, Tq, D)


def _grouped_block(q, k, v, mask, scale, return_weights):
    """One query block of the grouped path; k/v already in the compute dtype (fp32, or fp64)."""
    b, hq, tq, d = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    # (B, Hkv, g*Tq, D): head h = j*g + i -> row i*Tq + t of KV head j; scaled BEFORE the dot product,
    # in the compute dtype, so no raw q.k overflows (fp16 raw dots pass 65,504 at q = k = 30, D = 128)
    qg = q.reshape(b, hkv, g * tq, d).to(k.dtype) * scale
    scores = torch.matmul(qg, k.transpose(-1, -2))  # (B, Hkv, g*Tq, Tk), K read once per group
    scores = scores.view(b, hkv, g, tq, tk)  # (B, Hkv, g, Tq, Tk)
    dead = None
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
        # Keys no row of a group may see (padding) get V = 0: their probability is 0, but 0 * NaN is NaN.
        dead = _dead_keys(mask, hkv, tk)
    else:
        probs = torch.softmax(scores, dim=-1)
    if dead is not None:
        v = v.masked_fill(dead, 0.0)  # (B, Hkv, Tk, D)
    # P @ V in the compute dtype: rounding P to bf16 first tripled the error of SDPA in bf16
    out = torch.matmul(probs.view(b, hkv, g * tq, tk), v)  # (B, Hkv, g*Tq, Dv)
    out = out.view(b, hq, tq, dv).to(q.dtype)  # (B, Hq, Tq, Dv)
    if return_weights:
        return out, probs.view(b, hq, tq, tk)
    return out


def _dead_keys(bool_mask: torch.Tensor, hkv: int, tk: int) -> torch.Tensor | None:
    """Keys no query row of a KV head's group may see, as a bool ``[B|1, Hkv|1, Tk, 1]`` (None if none):
    padding, or slots outside every query's window. Zeroing them keeps NaN there out of the output."""
    m = bool_mask
    if m.shape[-1] != tk:
        return None  # the mask does not vary over keys: no key is hidden from every row
    if m.shape[1] == 1:
        dead = ~m.any(dim=2)  # (B|1, 1, Tk)
    else:
        dead = ~m.reshape(m.shape[0], hkv, -1, m.shape[2], tk).any(dim=(2, 3))  # (B|1, Hkv, Tk)
    return dead[..., None] if bool(dead.any()) else None


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
        v: values ``[B, Hkv, Tk, Dv]``, usually Dv = D (a different value width, as in DeepSeek-V2's heads or
            the absorbed latent attention that reads a prefix of each key as its value, is fine).
        mask: None (attend everywhere), a :mod:`gqa.masks` mask, or a bool tensor broadcastable to
            ``[B, Hq, Tq, Tk]`` (True = attend). Causal masks are aligned **bottom-right**: query i is
            at absolute position ``Tk - Tq + i`` and sees keys ``0 .. Tk - Tq + i``.
        scale: softmax scale, default ``1 / sqrt(D)``; a finite number > 0.
        return_weights: also return the attention probabilities ``[B, Hq, Tq, Tk]`` (fp32; fp64 for fp64).
        backend: ``"auto"`` (see :func:`select_backend`), ``"sdpa"``, ``"grouped"`` or ``"kernel"``.

    Returns:
        ``[B, Hq, Tq, Dv]`` in q's dtype, or ``(out, weights)`` when ``return_weights``.

    Head mapping: query head h uses KV head ``h // g``. With Hq = 8 and Hkv = 2 (g = 4), query heads
    0-3 read KV head 0 and heads 4-7 read KV head 1 (the transformers ``repeat_kv`` and FlashAttention
    convention, never ``h % Hkv``). K/V are never repeated into a copy. Rows whose keys are all
    masked out return zeros; keys masked out for every query never reach the output (NaN there is
    ignored). B = 0 or Tq = 0 gives an empty result; head_dim 0, a scale <= 0 or NaN are GQAUserErrors.

    Precision: fp16/bf16 are computed with fp32 scores, softmax and accumulation (every backend), and
    float64 in float64 (so ``torch.autograd.gradcheck`` holds on the grouped path).
    """
    hq, hkv, g = check_qkv(q, k, v)
    if backend not in BACKENDS:
        raise GQAUserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    b, _, tq, d = q.shape
    tk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else check_scale(scale)
    if backend == "auto":
        backend = select_backend(q, k, v, mask, return_weights)
    if return_weights and backend != "grouped":
        raise GQAUserError("return_weights=True needs the grouped backend; drop backend= or set backend='grouped'")
    if b == 0 or tq == 0 or tk == 0:  # nothing to attend from or to: zeros (the mask is still checked)
        as_bool_mask(mask, batch=b, n_heads=hq, q_len=tq, k_len=tk, device=q.device)
        out = q.new_zeros(b, hq, tq, v.shape[3])  # (B, Hq, Tq, Dv); with Tk = 0 every row sees no key, so zeros
        return (
            (out, out.new_zeros(b, hq, tq, tk, dtype=torch.promote_types(q.dtype, torch.float32)))
            if (return_weights)
            else out
        )

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
        dead = _dead_keys(bool_mask, hkv, tk)
        if dead is not None:  # SDPA adds -inf to a masked score: NaN + -inf is NaN, and 0 * NaN too
            k, v = k.masked_fill(dead, 0.0), v.masked_fill(dead, 0.0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, scale=scale, enable_gqa=g > 1)
        # SDPA returns NaN for fully masked rows; the contract is zeros.
        return out.masked_fill(~bool_mask.any(dim=-1, keepdim=True), 0.0)

    bool_mask = as_bool_mask(mask, batch=b, n_heads=hq, q_len=tq, k_len=tk, device=q.device)
    return grouped_attention(q, k, v, bool_mask, scale, return_weights)
