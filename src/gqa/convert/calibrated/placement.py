"""Where, and in which dtype, a module's tensors live while one step of the calibrated path runs.

The calibrated path holds the source model (the teacher) in the checkpoint's dtype (bf16/fp16: half
the host memory of float32), and the converted model (the student) shares every tensor the
conversion does not change with it (see :func:`gqa.convert.calibrated.reduce_kv_heads`). Work is
done in float32, one module at a time:

* :func:`placed` moves a few modules to a device / dtype for the length of a ``with`` block and puts
  the original tensors back afterwards. A tensor is moved by pointing its parameter at a converted
  *copy* (never by converting it in place), so a tensor two models share is never written, and the
  sharing survives the move. Parameters listed in ``write_back`` (the student's own trained
  attention weights) get their final values copied into their original tensors on exit.
* :func:`upcast_forward` runs a whole model's forward with each top-level part (embedding, each
  block, final norm, LM head) upcast only while it runs: the numbers are those of a float32 copy of
  the model (bf16 -> float32 is exact), the memory one part's float32 copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["placed", "upcast_forward", "storage_key"]


def storage_key(t: torch.Tensor) -> tuple:
    """What identifies ``t``'s elements in memory: two tensors with the same key hold the same numbers."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


@contextlib.contextmanager
def placed(
    *modules: nn.Module,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    write_back: Iterable[nn.Parameter] = (),
) -> Iterator[None]:
    """Hold the floating parameters and buffers of ``modules`` on ``device`` in ``dtype`` (None: as they
    are) inside the ``with`` block; on exit every parameter and buffer gets its original tensor back.

    Nothing is converted in place: each moved parameter's ``.data`` points at a converted copy, so a
    tensor shared with a module outside ``modules`` is never touched. Tensors that the given modules
    share (the same storage) share one moved copy. A tensor already on ``device`` in ``dtype`` is used
    as it is (no copy): in-place updates inside the block then land in it directly.

    write_back: parameters whose values inside the block are copied into their original tensors on
        exit (``original.copy_(moved)``, rounding to the original dtype). They must not share storage
        with anything the caller wants unchanged.
    """
    device = torch.device(device) if device is not None else None
    write = {id(p) for p in write_back}
    copies: dict[tuple, torch.Tensor] = {}  # storage key of an original -> its moved copy
    params: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []  # (param, original, moved)
    buffers: list[tuple[nn.Module, str, torch.Tensor]] = []  # (owner, name, original)
    seen: set[int] = set()

    def move(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point() and not t.is_complex():
            return t if device is None else t.to(device)
        key = storage_key(t)
        if key not in copies:
            copies[key] = t.to(device=device, dtype=dtype) if dtype is not None else t.to(device=device)
        return copies[key]

    try:
        for module in modules:
            for p in module.parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                original = p.data
                moved = original if device is None and dtype is None else move(original)
                params.append((p, original, moved))
                if moved is not original:
                    p.data = moved
            for owner in module.modules():
                for name, b in list(owner._buffers.items()):
                    if b is None or (device is None and dtype is None):
                        continue
                    moved = move(b)
                    if moved is not b:
                        buffers.append((owner, name, b))
                        owner._buffers[name] = moved
        yield
    finally:
        with torch.no_grad():
            for p, original, moved in params:
                if id(p) in write and moved is not original:
                    original.copy_(p.data)
                p.data = original
        for owner, name, original in buffers:
            owner._buffers[name] = original


@contextlib.contextmanager
def upcast_forward(model: nn.Module, dtype: torch.dtype | None = torch.float32) -> Iterator[None]:
    """Inside the block, ``model`` (a :class:`gqa.GQAForCausalLM`) computes in ``dtype``: each part
    (embedding, each decoder block, final norm, LM head) is upcast by :func:`placed` when it is called
    and given back its own tensors when it returns. No-op when ``dtype`` is None or every floating
    parameter already has it."""
    if dtype is None or all(p.dtype == dtype for p in model.parameters() if p.is_floating_point()):
        yield
        return
    parts = [model.embed, *model.layers, model.norm, model.lm_head]
    active: dict[int, contextlib.ExitStack] = {}

    def pre(module, _args):
        stack = contextlib.ExitStack()
        stack.enter_context(placed(module, dtype=dtype))
        active[id(module)] = stack

    def post(module, _args, _output):
        stack = active.pop(id(module), None)
        if stack is not None:
            stack.close()

    handles = []
    try:
        for part in parts:
            handles.append(part.register_forward_pre_hook(pre))
            handles.append(part.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()
        for stack in active.values():  # parts whose forward was cut short (an exception, a hook's stop)
            stack.close()
        active.clear()
