"""Decode kernels behind ``gqa.attention`` (Triton on CUDA, a split-KV CPU path).

Nothing outside this package imports a kernel directly: :func:`supports` tells the dispatcher in
:mod:`gqa.functional` whether a kernel applies, and :func:`attention` runs it.
"""

from __future__ import annotations

import torch

__all__ = ["supports", "attention"]


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> bool:
    """Whether a kernel in this package handles these inputs. None is registered yet."""
    return False


def attention(q, k, v, *, mask=None, scale=None):
    raise NotImplementedError("no decode kernel is available for these inputs; use backend='grouped'")
