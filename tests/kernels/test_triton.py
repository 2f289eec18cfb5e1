"""The Triton split-KV decode kernel against the fp64 reference.

Without a GPU the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set below before
Triton builds the kernels); with one, the same tests run on the device. Shapes are tiny so the
interpreter stays fast. Tolerances are relative to PyTorch's own error at the same dtype (SDPA on
repeated K/V against the same fp64 reference). Without triton the module skips; under ``CI=true``
(where the project's CI installs triton) a missing triton is an error instead.
"""

from __future__ import annotations

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, i.e. at first import

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if os.environ.get("CI", "").lower() == "true":
    # CI installs triton: a skip there would hide a broken install, so a missing triton fails here.
    import triton  # noqa: E402, F401
pytest.importorskip("triton", reason="triton is not installed (pip install 'gqa[triton]')")

import gqa  # noqa: E402
from gqa import masks  # noqa: E402
from gqa.kernels import gather_pages  # noqa: E402
from gqa.kernels import triton_decode as td  # noqa: E402
from gqa.reference import repeat_kv  # noqa: E402
from helpers import decode_mask, poison_invisible  # noqa: E402

HEAD_CONFIGS = [(8, 8), (8, 4), (8, 2), (8, 1), (9, 3), (12, 3)]


def run_kernel(q, k, v, lengths, *, causal=True, window=None, chunk=None, block_table=None, num_splits=None):
    """The kernel itself, never a fallback: query token t of sequence b sits at lengths[b] - Tq + t."""
    lengths = lengths.to(device=q.device, dtype=torch.int32)
    return td.split_kv_decode(
        q,
        k,
        v,
        lengths,
        lengths - q.shape[2],
        scale=q.shape[3] ** -0.5,
        causal=causal,
        window=window,
        chunk=chunk,
        block_table=block_table,
        num_splits=num_splits,
    )


def check(out, q, k, v, bool_mask, factor=None):
    """Kernel error vs fp64 <= factor x SDPA's error at q's dtype (plus a few fp32 ulps).

    fp16/bf16 get a factor of 4, fp32 3: like FlashAttention, the kernel rounds the probabilities
    to the cache dtype before the P @ V product, which PyTorch's CPU SDPA does not.
    """
    if factor is None:
        factor = 3.0 if q.dtype == torch.float32 else 4.0
    cpu = [t.cpu() for t in (q, k, v)]
    ref = gqa.reference_attention(*cpu, mask=bool_mask)
    g = q.shape[1] // k.shape[1]
    qs, ks, vs = (t.to(DEVICE) for t in cpu)
    sdpa = F.scaled_dot_product_attention(qs, repeat_kv(ks, g), repeat_kv(vs, g), attn_mask=bool_mask.to(DEVICE))
    rows = bool_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).any(-1)
    torch_err = (sdpa.cpu().double() - ref).abs()[rows].max().item()
    err = (out.cpu().double() - ref).abs().max().item()
    tol = factor * torch_err + 8 * torch.finfo(torch.float32).eps
    assert err <= tol, f"kernel error {err:.3g} > tolerance {tol:.3g} (SDPA's error {torch_err:.3g})"
    assert torch.equal(out.cpu()[~rows], torch.zeros_like(out.cpu()[~rows]))


def make(b, hq, hkv, tq, t_max, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, t_max, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, t_max, d, generator=gen).to(dtype)
    return q, k, v


class LaunchSpy:
    """Stands in for a kernel: records each launch, then launches the real kernel."""

    def __init__(self, kernel, name, calls):
        self.kernel, self.name, self.calls = kernel, name, calls

    def __getitem__(self, grid):
        self.calls.append(self.name)
        return self.kernel[grid]


def test_kernel_really_runs_in_this_mode(monkeypatch):
    if DEVICE == "cpu":
        assert td.is_interpreted(), "TRITON_INTERPRET was set too late: the kernels were built for a GPU"
    calls = []
    for name in ("_split_kv_stage1", "_split_kv_stage2"):
        monkeypatch.setattr(td, name, LaunchSpy(getattr(td, name), name, calls))
    q, k, v = (t.to(DEVICE) for t in make(1, 8, 2, 1, 80, 32))
    out = run_kernel(q, k, v, torch.tensor([80]), num_splits=2)
    assert calls == ["_split_kv_stage1", "_split_kv_stage2"]
    check(out, q, k, v, decode_mask(torch.tensor([80]), 1, 80))


@pytest.mark.parametrize("hq,hkv", HEAD_CONFIGS)
@pytest.mark.parametrize("tq", [1, 5, 16])
def test_heads_query_tokens_lengths(hq, hkv, tq):
    q, k, v = make(2, hq, hkv, tq, 90, 32, seed=hq * 100 + hkv * 10 + tq)
    lengths = torch.tensor([90, max(tq, 41)])
    m = decode_mask(lengths, tq, 90)
    out = run_kernel(
        *(t.to(DEVICE) for t in (q, poison_invisible(k, m), poison_invisible(v, m))), lengths, num_splits=2
    )
    check(out, q, k, v, m)


@pytest.mark.parametrize(
    "causal,window,chunk,tq",
    [
        (True, 30, None, 1),
        (True, 30, None, 6),
        (True, None, 48, 1),
        (True, None, 48, 9),
        (True, 40, 64, 3),
        (False, None, 48, 4),
        (False, None, None, 4),
    ],
)
def test_masks_skip_whole_tiles(causal, window, chunk, tq):
    q, k, v = make(2, 8, 2, tq, 200, 32, seed=tq)
    lengths = torch.tensor([200, 150])
    m = decode_mask(lengths, tq, 200, causal or window is not None, window, chunk)
    # Keys outside every window/chunk are NaN: the kernel must never load them.
    kp, vp = (poison_invisible(t, m).to(DEVICE) for t in (k, v))
    out = run_kernel(q.to(DEVICE), kp, vp, lengths, causal=causal, window=window, chunk=chunk, num_splits=3)
    check(out, q, k, v, m)


@pytest.mark.parametrize("hq,hkv,tq,page_size,num_splits", [(8, 2, 1, 16, 1), (8, 2, 4, 16, 3), (12, 3, 2, 32, 2)])
def test_paged_cache(hq, hkv, tq, page_size, num_splits):
    gen = torch.Generator().manual_seed(page_size + tq)
    b, d, max_pages = 3, 32, 6
    n_pages = b * max_pages + 4
    k_pages = torch.randn(n_pages, hkv, page_size, d, generator=gen)
    v_pages = torch.randn(n_pages, hkv, page_size, d, generator=gen)
    block_table = torch.randperm(n_pages, generator=gen)[: b * max_pages].view(b, max_pages).to(torch.int32)
    lengths = torch.tensor([max_pages * page_size, 19, page_size + 3])
    block_table[1, 2:] = -1  # entries past a sequence's last page are never read
    q = torch.randn(b, hq, tq, d, generator=gen)
    k = gather_pages(k_pages, block_table.clamp(min=0))  # (B, Hkv, T, D)
    v = gather_pages(v_pages, block_table.clamp(min=0))
    m = decode_mask(lengths, tq, k.shape[2])
    unused = torch.ones(n_pages, dtype=torch.bool)
    unused[block_table[block_table >= 0].long()] = False
    k_pages[unused] = float("nan")
    v_pages[unused] = float("nan")
    out = run_kernel(
        *(t.to(DEVICE) for t in (q, k_pages, v_pages)),
        lengths,
        block_table=block_table.to(DEVICE),
        num_splits=num_splits,
    )
    check(out, q, k, v, m)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (9, 3)])
def test_dtypes(dtype, hq, hkv):
    q, k, v = make(2, hq, hkv, 3, 100, 64, dtype=dtype, seed=7)
    lengths = torch.tensor([100, 64])
    m = decode_mask(lengths, 3, 100)
    out = run_kernel(*(t.to(DEVICE) for t in (q, k, v)), lengths, num_splits=2)
    assert out.dtype == dtype
    check(out, q, k, v, m)


@pytest.mark.parametrize("d", [64, 128, 256, 80])
def test_head_dims(d):
    q, k, v = make(1, 8, 2, 2, 40, d, seed=d)
    lengths = torch.tensor([40])
    m = decode_mask(lengths, 2, 40)
    out = run_kernel(*(t.to(DEVICE) for t in (q, k, v)), lengths, num_splits=2)
    check(out, q, k, v, m)


@pytest.mark.parametrize("d,dv,prefix", [(128, 80, True), (64, 96, False)], ids=["values-a-key-prefix", "wider-values"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_value_width_other_than_the_key_width(d, dv, prefix, num_splits):
    """Values of width Dv != D: the output is [B, Hq, Tq, Dv]; values may be a view of the keys' first Dv
    columns (the absorbed latent attention), with one split and with the merge stage."""
    q, k, _ = make(2, 9, 3, 2, 70, d, seed=dv + num_splits)
    v = k[..., :dv] if prefix else torch.randn(2, 3, 70, dv, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([70, 23])
    m = decode_mask(lengths, 2, 70)
    out = run_kernel(*(t.to(DEVICE) for t in (q, k, v)), lengths, num_splits=num_splits)
    assert out.shape == (2, 9, 2, dv)
    check(out, q, k, v, m)


def test_more_splits_than_tiles_and_rows_over_one_block():
    # MQA with 16 query tokens: 8 x 16 = 128 rows need several row blocks in fp32; 8 splits of a
    # 50-key cache leave most splits empty, which the merge must ignore.
    q, k, v = make(1, 8, 1, 16, 50, 32, seed=3)
    lengths = torch.tensor([50])
    m = decode_mask(lengths, 16, 50)
    out = run_kernel(*(t.to(DEVICE) for t in (q, k, v)), lengths, num_splits=8)
    check(out, q, k, v, m)


def test_rows_with_no_visible_key_give_zeros():
    # As gqa.attention calls it: 4 queries at positions 28..31 of 32 keys, but only 10 keys exist
    # (key padding) and a window of 4 hides them all from every query.
    q, k, v = (t.to(DEVICE) for t in make(1, 8, 2, 4, 32, 32, seed=5))
    kv_lens = torch.tensor([10], dtype=torch.int32, device=DEVICE)
    q_pos0 = torch.tensor([28], dtype=torch.int32, device=DEVICE)
    out = td.split_kv_decode(q, k, v, kv_lens, q_pos0, scale=0.2, causal=True, window=4, chunk=None, num_splits=2)
    assert torch.equal(out, torch.zeros_like(out))
    # A window of 20 lets the query at 28 see key 9 (keys 9..28, of which only 9 exists); the rest see none.
    out = td.split_kv_decode(q, k, v, kv_lens, q_pos0, scale=0.2, causal=True, window=20, chunk=None, num_splits=2)
    m = masks.key_padding(torch.tensor([10])) & masks.sliding_window(20)
    torch.testing.assert_close(
        out[:, :, :2].cpu().double(), gqa.reference_attention(q, k, v, mask=m, scale=0.2)[:, :, :2].cpu()
    )
    assert torch.equal(out[:, :, 2:], torch.zeros_like(out[:, :, 2:]))


@pytest.mark.skipif(DEVICE != "cuda", reason="gqa.attention routes to Triton only for CUDA tensors")
def test_gqa_attention_dispatches_to_triton_on_cuda():
    q, k, v = (t.cuda() for t in make(2, 32, 8, 1, 4096, 128, dtype=torch.bfloat16))
    mask = masks.causal() & masks.sliding_window(1024)
    assert gqa.select_backend(q, k, v, mask) == "kernel"
    out = gqa.attention(q, k, v, mask=mask)
    check(out, q, k, v, mask.materialize(1, 4096).view(1, 1, 1, 4096).expand(2, 1, 1, 4096))
