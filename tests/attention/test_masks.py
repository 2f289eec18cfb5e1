"""Masks: positions, bottom-right alignment, composition, bad input; hypothesis properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gqa
from gqa import masks
from gqa.errors import GQAUserError
from helpers import assert_matches_reference


def brute(q_len, k_len, rule):
    """Mask from an explicit per-(query, key) rule on absolute positions (bottom-right)."""
    out = torch.zeros(q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        p = k_len - q_len + i
        for j in range(k_len):
            out[i, j] = rule(p, j)
    return out


@pytest.mark.parametrize("q_len,k_len", [(1, 1), (1, 9), (4, 9), (9, 9)])
def test_causal_bottom_right(q_len, k_len):
    got = masks.causal().materialize(q_len, k_len)
    assert torch.equal(got, brute(q_len, k_len, lambda p, j: j <= p))
    # With a cache holding k_len - 1 tokens, the single new query sees every key.
    assert masks.causal().materialize(1, k_len).all()


@pytest.mark.parametrize("w", [1, 3, 20])
def test_sliding_window(w):
    got = masks.sliding_window(w).materialize(5, 12)
    assert torch.equal(got, brute(5, 12, lambda p, j: p - w < j <= p))


@pytest.mark.parametrize("c", [1, 4, 16])
def test_chunked(c):
    got = masks.chunked(c).materialize(6, 12)
    assert torch.equal(got, brute(6, 12, lambda p, j: p // c == j // c))
    both = (masks.chunked(c) & masks.causal()).materialize(6, 12)
    assert torch.equal(both, brute(6, 12, lambda p, j: p // c == j // c and j <= p))


def test_key_padding_lengths_and_valid():
    m = masks.key_padding(torch.tensor([3, 5])).materialize(2, 5)
    assert m.shape == (2, 1, 1, 5)
    assert m[0, 0, 0].tolist() == [True] * 3 + [False] * 2 and m[1].all()
    valid = torch.tensor([[False, True, True], [True, True, True]])
    assert torch.equal(masks.key_padding(valid=valid).materialize(1, 3)[:, 0, 0], valid)


def test_composition_operators():
    c, w = masks.causal(), masks.sliding_window(2)
    a = c.materialize(4, 6)
    b = w.materialize(4, 6)
    assert torch.equal((c & w).materialize(4, 6), a & b)
    assert torch.equal((c | w).materialize(4, 6), a | b)
    assert torch.equal((~c).materialize(4, 6), ~a)
    t = torch.rand(4, 6) > 0.5
    assert torch.equal((c & t).materialize(4, 6), a & t)
    assert torch.equal((t & c).materialize(4, 6), a & t)
    assert len((c & w & masks.chunked(3)).parts()) == 3  # flattened for kernels


def test_explicit_query_positions():
    # Per-sequence positions [B, Tq]: sequence 1 is two steps behind.
    qp = torch.tensor([[4, 5], [2, 3]])
    m = masks.causal().materialize(2, 6, q_positions=qp)
    assert m.shape == (2, 1, 2, 6)
    assert m[1, 0, 0].tolist() == [True, True, True, False, False, False]


@pytest.mark.parametrize(
    "make",
    [
        lambda: masks.sliding_window(0),
        lambda: masks.sliding_window(-3),
        lambda: masks.chunked(0),
        lambda: masks.custom(torch.ones(2, 2)),
        lambda: masks.key_padding(torch.tensor([1.5])),
        lambda: masks.key_padding(torch.tensor([4, -1])),
        lambda: masks.key_padding(),
        lambda: masks.causal() & 3,
    ],
    ids=["window0", "window-3", "chunk0", "custom-float", "lengths-float", "lengths-negative", "none", "and-int"],
)
def test_bad_mask_arguments(make):
    with pytest.raises(GQAUserError, match=r".+") as info:
        make()
    assert "\n" not in str(info.value)


def test_mask_wrong_shape_or_dtype_is_rejected():
    q, k, v = torch.randn(2, 8, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    with pytest.raises(GQAUserError, match="does not broadcast"):
        gqa.attention(q, k, v, mask=torch.ones(2, 8, 3, 4, dtype=torch.bool))
    with pytest.raises(GQAUserError, match="does not broadcast"):
        gqa.attention(q, k, v, mask=torch.ones(3, 1, 3, 5, dtype=torch.bool))
    with pytest.raises(GQAUserError, match="bool"):
        gqa.attention(q, k, v, mask=torch.zeros(2, 8, 3, 5))
    with pytest.raises(GQAUserError, match="gqa.masks"):
        gqa.attention(q, k, v, mask="causal")
    with pytest.raises(GQAUserError, match="keys"):
        gqa.attention(q, k, v, mask=masks.key_padding(valid=torch.ones(2, 4, dtype=torch.bool)))


def test_zero_length_padding_gives_zero_rows():
    """A sequence with no real key (length 0) attends to nothing: zeros, on every backend."""
    q, k, v = torch.randn(2, 8, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = masks.key_padding(torch.tensor([5, 0]))
    for backend in ("auto", "grouped", "sdpa"):
        out = gqa.attention(q, k, v, mask=mask, backend=backend)
        assert torch.equal(out[1], torch.zeros_like(out[1])), backend
        assert_matches_reference(out, q, k, v, mask)


# ---- hypothesis: random shapes, head configs and mask compositions against the reference ----

mask_atoms = st.sampled_from(["causal", "window", "chunk", "padding", "random"])


@st.composite
def attention_case(draw):
    hkv = draw(st.integers(1, 4))
    g = draw(st.integers(1, 4))
    b = draw(st.integers(1, 3))
    tk = draw(st.integers(1, 24))
    tq = draw(st.integers(1, tk))
    d = draw(st.sampled_from([4, 8, 16, 32]))
    atoms = draw(st.lists(mask_atoms, min_size=0, max_size=3))
    mask = None
    for a in atoms:
        if a == "causal":
            m = masks.causal()
        elif a == "window":
            m = masks.sliding_window(draw(st.integers(1, 8)))
        elif a == "chunk":
            m = masks.chunked(draw(st.integers(1, 8)))
        elif a == "padding":
            m = masks.key_padding(torch.tensor(draw(st.lists(st.integers(0, tk), min_size=b, max_size=b))))
        else:
            seed = draw(st.integers(0, 2**16))
            m = masks.custom(torch.rand(b, 1, tq, tk, generator=torch.Generator().manual_seed(seed)) > 0.4)
        mask = m if mask is None else mask & m
    return b, hkv * g, hkv, tq, tk, d, mask


@given(attention_case(), st.sampled_from(["auto", "grouped", "sdpa"]))
def test_property_matches_reference(case, backend):
    b, hq, hkv, tq, tk, d, mask = case
    q, k, v = torch.randn(b, hq, tq, d), torch.randn(b, hkv, tk, d), torch.randn(b, hkv, tk, d)
    out = gqa.attention(q, k, v, mask=mask, backend=backend)
    assert_matches_reference(out, q, k, v, mask)


@given(attention_case())
def test_property_weights_rows_sum_to_one_or_zero(case):
    b, hq, hkv, tq, tk, d, mask = case
    q, k, v = torch.randn(b, hq, tq, d), torch.randn(b, hkv, tk, d), torch.randn(b, hkv, tk, d)
    _, w = gqa.attention(q, k, v, mask=mask, return_weights=True)
    s = w.sum(-1)
    assert torch.all(((s - 1).abs() < 1e-5) | (s == 0))
    if mask is not None:
        allowed = masks.as_bool_mask(mask, batch=b, n_heads=hq, q_len=tq, k_len=tk, device="cpu")
        assert (w.masked_fill(allowed, 0) == 0).all()  # no weight on a masked key
