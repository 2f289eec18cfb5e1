"""A decode step's per-token work on CPU, in the C++ library of ``cpu_decode.cpp``: linear layers (GEMV),
RMSNorm and RoPE for the few rows of a step.

**Linear layers.** A decode step is a chain of matrix-vector products, one per weight matrix, and they read nearly every byte
the step reads (SmolLM2-135M: 540 MB of fp32 weights against about 2 MB of KV cache at 512 tokens). torch's
CPU matmul reads a [1, K] x [K, N] product at 15 GB/s on the 2 EPYC cores the project measures on; the
kernel streams each weight row once for all the step's input rows with fp32 accumulators in registers and
measures 1.4-4.1x torch in fp32 at every shape and 1-16 rows, and 1.1-2.8x in bf16 except on the 49152-row LM
head at 8-16 rows (0.82-0.92x; one call a step against 210 it wins, so bf16 keeps the kernel up to 16 rows).
bf16 rows are summed by the CPU's bf16 dot-product instruction where it has one (AVX-512 BF16), and
widened to fp32 in registers otherwise. Measured per shape in ``benchmarks/decode_linear.py``
(benchmarks/results/decode-linear-cpu.md).

**RMSNorm and RoPE.** Eagerly each is 6-10 torch ops (casts, a mean, a concatenation of rotated halves) of a
few microseconds each, 61 norms and 60 rotations a SmolLM2 step; here each is one call, computed in fp32 and
rounded where the eager code rounds (:class:`gqa.layer.RMSNorm`, :func:`gqa.rope.apply_rope`).

Everything else (gradients, other devices and dtypes, more rows, ``GQA_CPU_KERNEL=torch``, no compiler)
runs the torch code: the kernels are only taken where nothing needs an autograd graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gqa.kernels import cpu_fused

__all__ = ["linear", "linears", "uses_kernel", "rms_norm", "rope", "MAX_ROWS", "MAX_TOKENS"]

#: Rows (batch x tokens) up to which the kernel takes a decode step's linear layers, per weight dtype.
MAX_ROWS = {torch.float32: 16, torch.bfloat16: 16}
#: Tokens (batch x new tokens) up to which RMSNorm and RoPE take their one-call kernels (unthreaded).
MAX_TOKENS = 16
_NO_BIAS = torch.empty(0)
_DTYPES = (torch.float32, torch.bfloat16)


def _no_graph(*tensors: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def uses_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` runs the C++ kernel for this input and weight."""
    rows = x.numel() // max(1, x.shape[-1])
    return (
        x.device.type == "cpu"
        and rows <= MAX_ROWS.get(weight.dtype, 0)
        and x.dtype == weight.dtype
        and weight.is_contiguous()
        and _no_graph(x, weight)
        and cpu_fused.available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``: x ``[..., K]``, weight ``[N, K]``, bias ``[N]`` -> ``[..., N]``, on the kernel where it pays."""
    if not uses_kernel(x, weight):
        return F.linear(x, weight, bias)
    return _run_linears(x, [weight], [bias])[0]


def linears(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """``[F.linear(x, w, b) for w, b in zip(weights, biases)]``: x ``[..., K]``, weights ``[N_i, K]``.

    On the kernel (every weight as :func:`uses_kernel` requires) all the products run in one parallel loop
    (one fork/join for a decode step's Q, K and V instead of three) into one ``[..., sum N_i]`` buffer; the
    results are column views of it ``[..., N_i]``.
    """
    if not all(uses_kernel(x, w) for w in weights):
        return [F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]
    return _run_linears(x, weights, biases)


def _run_linears(x, weights, biases) -> list[torch.Tensor]:
    """The kernel call behind :func:`linears` (inputs already checked by :func:`uses_kernel`)."""
    op = cpu_fused.linears_op()
    flat = x.reshape(-1, x.shape[-1]).contiguous()  # (rows, K)
    out = op(flat, list(weights), [_NO_BIAS if b is None else b for b in biases])  # (rows, sum N_i)
    out = out.view(*x.shape[:-1], out.shape[-1])
    return list(out.split([w.shape[0] for w in weights], dim=-1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, scale_fp32: bool) -> torch.Tensor | None:
    """:class:`gqa.layer.RMSNorm` of x ``[..., D]`` (weight ``[D]``) in one call, or None where the kernel does
    not take these inputs (the caller runs the torch code)."""
    rows = x.numel() // max(1, x.shape[-1])
    if not (
        x.device.type == "cpu"
        and rows <= MAX_TOKENS
        and x.dtype in _DTYPES
        and weight.dtype == x.dtype
        and _no_graph(x, weight)
        and cpu_fused.available()
    ):
        return None
    flat = x.reshape(-1, x.shape[-1]).contiguous()  # (rows, D)
    return torch.ops.gqa_cpu_decode.rms_norm(flat, weight.contiguous(), float(eps), bool(scale_fp32)).view(x.shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """:func:`gqa.rope.apply_rope` of x ``[B, H, T, D]`` with cos/sin ``[T, D]`` or ``[B, T, D]`` fp32 in one call
    (contiguous output), or None where the kernel does not take these inputs."""
    if not (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.shape[0] * x.shape[2] <= MAX_TOKENS
        and x.dtype in _DTYPES
        and x.stride(-1) == 1
        and cos.dtype == torch.float32
        and cos.shape == sin.shape
        and cos.shape[-2:] == x.shape[-2:]
        and (cos.dim() == 2 or (cos.dim() == 3 and cos.shape[0] == x.shape[0]))
        and _no_graph(x)
        and cpu_fused.available()
    ):
        return None
    return torch.ops.gqa_cpu_decode.rope(x, cos.contiguous(), sin.contiguous())
