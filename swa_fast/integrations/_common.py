"""Pieces the integrations share: the walk in state_dict order, and the flat shadow copies with
their fused update and their moves.

The originals keep their averages as separate tensors (a deep copy's parameters, a list of
`shadow_params`) and update them per tensor or with `torch._foreach_*`. Here those tensors stay
where the original keeps them, so users and checkpoints see the same objects, but their storage
is a view of one flat buffer per (device, dtype): the update is one `swa_fast.lerp_` per buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter

import torch
from torch import Tensor
from torch.nn import Module

from .. import ops
from ..flat import FlatBuffer, FlatGroup
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

    def to_(
        self,
        tensors: Sequence[Tensor],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        non_blocking: bool = False,
        pin_memory: bool = False,
    ) -> None:
        """Move the buffers (one copy each, none where nothing changes; the dtype applies to
        floating buffers) or pin them, and re-point `tensors`, the ones given at construction."""
        old = self.buffer
        groups = []
        for g in old.groups:
            if pin_memory:
                moved = g.buffer if g.buffer.is_pinned() else g.buffer.pin_memory()
            else:
                cast = dtype if g.dtype.is_floating_point else None
                moved = g.buffer.to(device=device, dtype=cast, non_blocking=non_blocking)
            groups.append(FlatGroup(moved.device, moved.dtype, moved, g.indices))
        self.buffer = FlatBuffer.__new__(FlatBuffer)
        self.buffer.__setstate__({**old.__getstate__(), "groups": groups})  # views over the moved buffers
        for t, view in zip(tensors, self.buffer.views):
            t.data = view
        self.ptrs = [view.data_ptr() for view in self.buffer.views]

    def holds(self, tensors: Sequence[Tensor]) -> bool:
        """Whether `tensors` still live in the buffers (a `.to()`, a `load_state_dict(assign=True)`
        or `p.data = ...` gives them new storage)."""
        return len(tensors) == len(self.ptrs) and list(map(Tensor.data_ptr, tensors)) == self.ptrs

    def lerp_(
        self,
        sources: Sequence[Tensor],
        weight: float,
        other_device: bool = False,
        part: list[int] | None = None,
    ) -> None:
        """avg += weight * (source - avg) for the stored tensors (those at positions `part` only,
        when given), one fused op per buffer; `sources` pair with every stored tensor. With
        `other_device`, sources that live elsewhere are copied over first (the originals' `device=`)."""
        if part is None:
            pairs = [(g.device, views, src) for g, views, src in self.buffer.pairs(sources)]
        else:
            pairs = [(device, views, pick(at, sources)) for device, views, at in self._part(part) if views]
        if other_device:
            pairs = [(d, views, [s if s.device == d else s.to(d) for s in src]) for d, views, src in pairs]
        if len(pairs) > 1:  # each op checks its own group; check all first so a mismatch writes nothing
            for _, views, src in pairs:
                ops.check("lerp_", views, src, weight)
        for _, views, src in pairs:
            ops.lerp_(views, src, weight)

    def _part(self, part: list[int]) -> list[tuple[torch.device, list[Tensor], list[int]]]:
        """Per buffer, its device, its views at positions `part` and those positions; kept for the
        next call (which tensors a model freezes changes rarely)."""
        key = tuple(part)
        if getattr(self, "_part_key", None) != key:
            chosen = set(part)
            self._part_plan = []
            for g in self.buffer.groups:
                at = [i for i in g.indices if i in chosen]
                self._part_plan.append((g.device, [self.buffer.views[i] for i in at], at))
            self._part_key = key
        return self._part_plan


def pick(positions: list[int], tensors: Sequence[Tensor]) -> list[Tensor]:
    """[tensors[i] for i in positions], without a Python loop."""
    if not positions:
        return []
    return [tensors[positions[0]]] if len(positions) == 1 else list(itemgetter(*positions)(tensors))
