"""Attention masks that compose: causal, sliding window, chunked, key padding, custom.

A mask answers "may query i attend to key j?" (True = attend). Masks are described by
positions, not by tensors, so the same object works for a prefill, for one decode step with a
cache, and for kernels that want to skip whole tiles (they inspect ``Causal``/``SlidingWindow``/
``Chunked`` directly).

Alignment is **bottom-right**: with Tq queries and Tk keys, query i sits at absolute position
``p = Tk - Tq + i`` (the last query is the last key). With a KV cache holding 10 tokens and one
new token (Tq = 1, Tk = 11), the new query is at position 10 and sees keys 0..10. PyTorch SDPA's
``is_causal=True`` is aligned top-left instead, which is wrong whenever Tq < Tk.

Compose with ``&`` (both must allow), ``|`` (either allows) and ``~`` (negation)::

    m = masks.causal() & masks.sliding_window(4096) & masks.key_padding(lengths)
    bool_mask = m.materialize(q_len=1, k_len=11)      # shape broadcastable to [B, Hq, Tq, Tk]

A plain boolean tensor broadcastable to ``[B, Hq, Tq, Tk]`` is accepted wherever a mask is, and
``masks.custom(tensor_or_fn)`` wraps one so it composes with the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gqa.errors import GQAUserError

__all__ = [
    "Mask",
    "Causal",
    "SlidingWindow",
    "Chunked",
    "KeyPadding",
    "Custom",
    "And",
    "Or",
    "Not",
    "causal",
    "sliding_window",
    "chunked",
    "key_padding",
    "custom",
    "as_bool_mask",
]


def _positions(q_len: int, k_len: int, device, q_positions: torch.Tensor | None):
    """Absolute positions: q_pos [Tq, 1] (or [B, 1, Tq, 1]) and k_pos [1, Tk], bottom-right aligned."""
    k_pos = torch.arange(k_len, device=device)
    if q_positions is None:
        q_pos = torch.arange(k_len - q_len, k_len, device=device)
    else:
        q_pos = q_positions.to(device)
    if q_pos.dim() == 2:  # per-sequence positions (B, Tq) -> (B, 1, Tq, 1)
        return q_pos[:, None, :, None], k_pos
    return q_pos[:, None], k_pos[None, :]


class Mask:
    """Base class. Subclasses implement ``materialize``; ``&``, ``|`` and ``~`` compose them."""

    def materialize(
        self,
        q_len: int,
        k_len: int,
        *,
        device: torch.device | str | None = None,
        q_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Boolean tensor broadcastable to ``[B, Hq, q_len, k_len]``; True = may attend.

        ``q_positions`` overrides the bottom-right query positions (``[Tq]`` or ``[B, Tq]``);
        keys are always at positions ``0..k_len-1``.
        """
        raise NotImplementedError

    def __and__(self, other: Mask) -> Mask:
        return And(_as_mask(self), _as_mask(other))

    def __rand__(self, other) -> Mask:
        return And(_as_mask(other), self)

    def __or__(self, other: Mask) -> Mask:
        return Or(_as_mask(self), _as_mask(other))

    def __ror__(self, other) -> Mask:
        return Or(_as_mask(other), self)

    def __invert__(self) -> Mask:
        return Not(self)

    def parts(self) -> list[Mask]:
        """The conjuncts of this mask (itself unless it is an ``And``); kernels use it to find
        window/chunk structure they can exploit."""
        return [self]


@dataclass(frozen=True, eq=False)
class Causal(Mask):
    """Query at absolute position p sees keys 0..p (bottom-right aligned)."""

    def materialize(self, q_len, k_len, *, device=None, q_positions=None):
        q_pos, k_pos = _positions(q_len, k_len, device, q_positions)
        return k_pos <= q_pos  # (Tq, Tk) or (B, 1, Tq, Tk)


@dataclass(frozen=True, eq=False)
class SlidingWindow(Mask):
    """Query at position p sees keys p - window + 1 .. p: the last ``window`` tokens, itself
    included (Mistral's convention). It implies causality."""

    window: int

    def __post_init__(self):
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise GQAUserError(f"sliding window must be an integer >= 1, got {self.window!r}; pass e.g. 4096")

    def materialize(self, q_len, k_len, *, device=None, q_positions=None):
        q_pos, k_pos = _positions(q_len, k_len, device, q_positions)
        return (k_pos <= q_pos) & (k_pos > q_pos - self.window)


@dataclass(frozen=True, eq=False)
class Chunked(Mask):
    """The sequence is cut into blocks of ``chunk`` tokens; a token attends only to keys in its own
    block (Llama 4 chunked attention; the "token groups" of some GQA write-ups). Not causal by itself:
    compose with ``causal()`` for a decoder."""

    chunk: int

    def __post_init__(self):
        if not isinstance(self.chunk, int) or isinstance(self.chunk, bool) or self.chunk < 1:
            raise GQAUserError(f"chunk size must be an integer >= 1, got {self.chunk!r}; pass e.g. 8192")

    def materialize(self, q_len, k_len, *, device=None, q_positions=None):
        q_pos, k_pos = _positions(q_len, k_len, device, q_positions)
        return torch.div(k_pos, self.chunk, rounding_mode="floor") == torch.div(
            q_pos, self.chunk, rounding_mode="floor"
        )


class KeyPadding(Mask):
    """Per-sequence key validity.

    ``lengths`` (int tensor ``[B]``): keys ``0..lengths[b]-1`` are valid (right padding).
    ``valid`` (bool tensor ``[B, Tk]``): True where the key is a real token (any padding side).
    ``start`` (int tensor ``[B]``): keys ``0..start[b]-1`` are padding, the rest valid (left padding, as
    :func:`gqa.generate` pads a batch); the CPU decode kernel takes it as an argument, so a decode step
    needs no ``[B, Tk]`` tensor that grows with the context.
    """

    def __init__(
        self,
        lengths: torch.Tensor | None = None,
        *,
        valid: torch.Tensor | None = None,
        start: torch.Tensor | None = None,
    ):
        if sum(x is not None for x in (lengths, valid, start)) != 1:
            raise GQAUserError(
                "key_padding needs exactly one of lengths=[B] ints, valid=[B, Tk] bools or start=[B] ints"
            )
        for name, val in (("lengths", lengths), ("start", start)):
            if val is None:
                continue
            val = torch.as_tensor(val)
            if val.dim() != 1 or val.dtype.is_floating_point or val.dtype == torch.bool:
                raise GQAUserError(
                    f"key_padding {name} must be a 1-D integer tensor [B], got {tuple(val.shape)} {val.dtype}"
                )
            if val.numel() and int(val.min()) < 0:
                raise GQAUserError(f"key_padding {name} must be >= 0, got {val.tolist()[:8]}")
            if name == "lengths":
                lengths = val
            else:
                start = val
        if valid is not None and (valid.dtype != torch.bool or valid.dim() != 2):
            raise GQAUserError(
                f"key_padding valid must be a bool tensor [B, Tk], got {tuple(valid.shape)} {valid.dtype}"
            )
        self.start = start
        self.lengths = lengths
        self.valid = valid

    def materialize(self, q_len, k_len, *, device=None, q_positions=None):
        if self.valid is not None:
            if self.valid.shape[1] != k_len:
                raise GQAUserError(
                    f"key_padding valid has {self.valid.shape[1]} keys but attention has {k_len}; "
                    "pass a [B, Tk] mask that matches the keys"
                )
            return self.valid.to(device)[:, None, None, :]  # (B, 1, 1, Tk)
        k_pos = torch.arange(k_len, device=device)
        if self.start is not None:
            return (k_pos[None, :] >= self.start.to(device)[:, None])[:, None, None, :]  # (B, 1, 1, Tk)
        return (k_pos[None, :] < self.lengths.to(device)[:, None])[:, None, None, :]  # (B, 1, 1, Tk)


class Custom(Mask):
    """Any boolean mask: a tensor broadcastable to ``[B, Hq, Tq, Tk]`` (True = attend), or a function
    ``fn(q_pos, k_pos) -> bool tensor`` of broadcastable absolute positions (q_pos ``[Tq, 1]``,
    k_pos ``[1, Tk]``), in the style of FlexAttention's mask_mod."""

    def __init__(self, mask: torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
            raise GQAUserError(f"custom mask must be a bool tensor (True = attend), got {mask.dtype}; use mask.bool()")
        if not isinstance(mask, torch.Tensor) and not callable(mask):
            raise GQAUserError(f"custom mask must be a bool tensor or a callable, got {type(mask).__name__}")
        self.mask = mask

    def materialize(self, q_len, k_len, *, device=None, q_positions=None):
        if isinstance(self.mask, torch.Tensor):
            return self.mask.to(device)
        q_pos, k_pos = _positions(q_len, k_len, device, q_positions)
        out = self.mask(q_pos, k_pos)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
            raise GQAUserError("custom mask function must return a bool tensor")
        return out


class And(Mask):
    def __init__(self, *masks: Mask):
        self.masks = [m for part in masks for m in part.parts()]

    def materialize(self, q_len, k_len, *, device=None, q_positions=None):
        out = None
        for m in self.masks:
            b = m.materialize(q_len, k_len, device=device, q_positions=q_positions)
            out = b if out is None else out & b
        return out

    def parts(self) -> list[Mask]:
        return list(self.masks)


class Or(Mask):
    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b

    def materialize(self, q_len, k_len, *, device=None, q_positions=None):
        kw = dict(device=device, q_positions=q_positions)
        return self.a.materialize(q_len, k_len, **kw) | self.b.materialize(q_len, k_len, **kw)


class Not(Mask):
    def __init__(self, a: Mask):
        self.a = a

    def materialize(self, q_len, k_len, *, device=None, q_positions=None):
        return ~self.a.materialize(q_len, k_len, device=device, q_positions=q_positions)


def _as_mask(m) -> Mask:
    if isinstance(m, Mask):
        return m
    if isinstance(m, torch.Tensor):
        return Custom(m)
    raise GQAUserError(f"cannot compose a mask with {type(m).__name__}; use a gqa.masks mask or a bool tensor")


def causal() -> Causal:
    """Causal mask aligned bottom-right: query at absolute position p sees keys 0..p."""
    return Causal()


def sliding_window(window: int) -> SlidingWindow:
    """Causal sliding window: query at p sees keys max(0, p-window+1)..p."""
    return SlidingWindow(window)


def chunked(chunk: int) -> Chunked:
    """Attend only within fixed blocks of ``chunk`` tokens (compose with ``causal()`` for decoding)."""
    return Chunked(chunk)


def key_padding(
    lengths: torch.Tensor | None = None, *, valid: torch.Tensor | None = None, start: torch.Tensor | None = None
) -> KeyPadding:
    """Per-sequence key padding: ``lengths`` [B] (right padding), ``valid`` [B, Tk] bools, or ``start`` [B]
    (left padding: keys before ``start[b]`` are padding)."""
    return KeyPadding(lengths, valid=valid, start=start)


def custom(mask) -> Custom:
    """Wrap a bool tensor broadcastable to [B, Hq, Tq, Tk] or a ``fn(q_pos, k_pos)`` as a mask."""
    return Custom(mask)


def as_bool_mask(
    mask: Mask | torch.Tensor | None,
    *,
    batch: int,
    n_heads: int,
    q_len: int,
    k_len: int,
    device,
    q_positions: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Materialise ``mask`` and check it broadcasts to ``[batch, n_heads, q_len, k_len]``.

    Returns a 4-D bool tensor (dims may be 1 where the mask broadcasts) or None.
    """
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise GQAUserError(
                f"mask must be a bool tensor (True = attend) or a gqa.masks mask, got dtype {mask.dtype}; "
                "convert an additive float mask with mask == 0"
            )
        m = mask
    elif isinstance(mask, Mask):
        m = mask.materialize(q_len, k_len, device=device, q_positions=q_positions)
    else:
        raise GQAUserError(f"mask must be a bool tensor or a gqa.masks mask, got {type(mask).__name__}")
    m = m.to(device)  # no-op when already there
    if m.dim() > 4:
        raise GQAUserError(
            f"mask has {m.dim()} dims; it must broadcast to [B, Hq, Tq, Tk] = [{batch}, {n_heads}, {q_len}, {k_len}]"
        )
    while m.dim() < 4:
        m = m.unsqueeze(0)
    want = (batch, n_heads, q_len, k_len)
    for have, need in zip(m.shape, want, strict=True):
        if have not in (1, need):
            raise GQAUserError(
                f"mask shape {tuple(m.shape)} does not broadcast to [B, Hq, Tq, Tk] = {list(want)}; "
                "give each dim either its full size or 1"
            )
    return m
