"""Pieces the integrations share: the walk in state_dict order, the flat shadow copies and their
fused update, and the decay rule diffusers and torch-ema have in common.

The originals keep their averages as separate tensors (a deep copy's parameters, a list of
`shadow_params`) and update them per tensor or with `torch._foreach_*`. Here those tensors stay
where the original keeps them, so users and checkpoints see the same objects, but their storage
is a view of one flat buffer per (device, dtype): the update is one `swa_fast.lerp_` per buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import Module

from .. import checks, ops
from ..flat import FlatBuffer
from ..model_tensors import _each_once


def state_tensors(module: Module) -> list[Tensor]:
    """The tensors of `module.state_dict(keep_vars=True)`, in its order (each module's parameters,
    then its persistent buffers, then its children's), each tensor once. Read from the modules' own
    dicts: the originals walk `state_dict()` on every update, which costs more than the update on a
    model of many small layers."""
    found: list[Tensor] = []

    def visit(m: Module) -> None:
        found.extend(p for p in m._parameters.values() if p is not None)
        skip = m._non_persistent_buffers_set
        found.extend(b for name, b in m._buffers.items() if b is not None and name not in skip)
        for child in m._modules.values():
            if child is not None:
                visit(child)

    visit(module)
    return _each_once(found)


def capped_decay(decay: float, t: int) -> float:
    """min(decay, (1 + t) / (10 + t)): the decay of diffusers' EMAModel without warmup and of
    torch-ema with `use_num_updates`, for their t-th step, in their Python float arithmetic."""
    return min(decay, (1 + t) / (10 + t))


def check_count(owner: str, what: str, expected: int, got: int) -> None:
    """The originals zip their lists and silently average fewer tensors when a list is short."""
    if expected != got:
        raise ValueError(f"{owner}: expected {expected} {what}, got {got}")


class FlatShadow:
    """`tensors` re-pointed into flat buffers: each keeps its identity (a model's parameter, an
    entry of `shadow_params`) and its values, but its storage becomes a view of one buffer per
    (device, dtype), so that they are all updated by one fused op per buffer.

    Args:
        tensors: floating tensors, re-pointed in place (`t.data = view`).
        dtype: when given, their new dtype (an fp32 average of a bf16 model).
        pin_memory: pin the CPU buffers (asynchronous copies to and from a GPU).
    """

    def __init__(self, tensors: Sequence[Tensor], dtype: torch.dtype | None = None, pin_memory: bool = False):
        self.buffer = FlatBuffer(tensors, dtype=dtype, pin_memory=pin_memory)
        for t, view in zip(tensors, self.buffer.views):
            t.data = view
        self.ptrs = [view.data_ptr() for view in self.buffer.views]

    def holds(self, tensors: Sequence[Tensor]) -> bool:
        """Whether `tensors` still live in the buffers (a `.to()`, a `load_state_dict(assign=True)`
        or `p.data = ...` gives them new storage)."""
        return len(tensors) == len(self.ptrs) and list(map(Tensor.data_ptr, tensors)) == self.ptrs

    def lerp_(self, sources: Sequence[Tensor], weight: float, other_device: bool = False) -> None:
        """avg += weight * (source - avg) for every stored tensor, one fused op per buffer. With
        `other_device`, sources that live elsewhere are copied over first (the originals' `device=`)."""
        calls = []
        for group, views, src in self.buffer.pairs(sources):
            if other_device:
                src = [s if s.device == group.device else s.to(group.device) for s in src]
            calls.append((views, src))
        if len(calls) > 1:  # each op checks its own group; check all first so a mismatch writes nothing
            for views, src in calls:
                checks.check_lerp(views, src, weight)
        for views, src in calls:
            ops.lerp_(views, src, weight)
