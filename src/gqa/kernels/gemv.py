"""Linear layers for the few rows of a decode step: the C++ GEMV of ``cpu_decode.cpp`` on CPU.

A decode step is a chain of matrix-vector products, one per weight matrix, and they read nearly every byte
the step reads (SmolLM2-135M: 540 MB of fp32 weights against about 2 MB of KV cache at 512 tokens). torch's
CPU matmul reads a [1, K] x [K, N] product at 15 GB/s on the 2 EPYC cores the project measures on; the
kernel streams each weight row once for all the step's input rows with fp32 accumulators in registers and
is faster at every shape and row count measured (1-16 rows: 1.7-6.1x torch in fp32, 1.0-3.1x in bf16).
bf16 rows are summed by the CPU's bf16 dot-product instruction where it has one (AVX-512 BF16), and
widened to fp32 in registers otherwise. Measured per shape in ``benchmarks/decode_linear.py``
(benchmarks/results/decode-linear-cpu.md).

Everything else (gradients, other devices and dtypes, more rows, ``GQA_CPU_KERNEL=torch``, no compiler)
runs ``torch.nn.functional.linear``: the kernel is only taken where nothing needs its autograd graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gqa.kernels import cpu_fused

__all__ = ["linear", "linears", "uses_kernel", "MAX_ROWS"]

#: Rows (batch x tokens) up to which the kernel is measured to beat torch's CPU matmul, per weight dtype.
MAX_ROWS = {torch.float32: 16, torch.bfloat16: 16}
_NO_BIAS = torch.empty(0)


def uses_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` runs the C++ kernel for this input and weight."""
    rows = x.numel() // max(1, x.shape[-1])
    return (
        x.device.type == "cpu"
        and rows <= MAX_ROWS.get(weight.dtype, 0)
        and x.dtype == weight.dtype
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and cpu_fused.linears_op() is not None
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``: x ``[..., K]``, weight ``[N, K]``, bias ``[N]`` -> ``[..., N]``, on the kernel where it pays."""
    if not uses_kernel(x, weight):
        return F.linear(x, weight, bias)
    return linears(x, [weight], [bias])[0]


def linears(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """``[F.linear(x, w, b) for w, b in zip(weights, biases)]``: x ``[..., K]``, weights ``[N_i, K]``.

    On the kernel (every weight as :func:`uses_kernel` requires) all the products run in one parallel loop
    (one fork/join for a decode step's Q, K and V instead of three) into one ``[..., sum N_i]`` buffer; the
    results are column views of it ``[..., N_i]``.
    """
    if not all(uses_kernel(x, w) for w in weights):
        return [F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]
    op = cpu_fused.linears_op()
    flat = x.reshape(-1, x.shape[-1]).contiguous()  # (rows, K)
    out = op(flat, list(weights), [_NO_BIAS if b is None else b for b in biases])  # (rows, sum N_i)
    out = out.view(*x.shape[:-1], out.shape[-1])
    return list(out.split([w.shape[0] for w in weights], dim=-1))
