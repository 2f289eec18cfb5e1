"""Shared test helpers: the torch baseline whose error sets each tolerance, and seeding."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter. The variable is read when a kernel is decorated,
    # so it must be set before any test module (or gqa itself) imports one.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import settings  # noqa: E402

from gqa.masks import as_bool_mask  # noqa: E402
from gqa.reference import reference_attention, repeat_kv  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two workers on two cores: no oversubscription

settings.register_profile("ci", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("ci")

HEAD_CONFIGS = [(8, 8), (8, 4), (8, 2), (8, 1), (9, 3), (12, 3)]
HEAD_IDS = [f"Hq{hq}-Hkv{hkv}" for hq, hkv in HEAD_CONFIGS]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def torch_baseline(q, k, v, mask=None, scale=None):
    """What PyTorch itself computes at q's dtype: repeat K/V, then SDPA's math path. NaN rows -> 0."""
    b, hq, tq, d = q.shape
    g = hq // k.shape[1]
    m = as_bool_mask(mask, batch=b, n_heads=hq, q_len=tq, k_len=k.shape[2], device=q.device)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=m, scale=scale)
    return torch.nan_to_num(out, nan=0.0)


def assert_matches_reference(out, q, k, v, mask=None, scale=None, factor: float = 4.0):
    """|out - fp64 reference| <= factor x PyTorch's own error at this dtype (+ a floor of a few ulps)."""
    ref = reference_attention(q, k, v, mask=mask, scale=scale)
    assert out.shape == ref.shape
    assert out.dtype == q.dtype
    assert torch.isfinite(out).all(), "output has NaN/inf"
    err = (out.double() - ref).abs().max().item()
    base = (torch_baseline(q, k, v, mask, scale).double() - ref).abs().max().item()
    floor = 2 * torch.finfo(q.dtype).eps * max(1.0, ref.abs().max().item())
    tol = factor * base + floor
    assert err <= tol, f"max error {err:.3g} exceeds {tol:.3g} (torch's own error {base:.3g})"
