"""Pairs of tensor lists (an average's and a model's) updated by one fused swa_fast op per
device, for the integrations that keep their averages as a model's own tensors (ema-pytorch's EMA
copy, Lightning's SWA copy): which calls an update makes is worked out once per pair of models and
kept while the models hold the same tensors."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import Module

from .. import ops
from ..flat import write_through_strides
from ..model_tensors import _walk

_CPU = torch.device("cpu")


class Pairs:
    """Target and source tensors of one device, updated by one call: a fused swa_fast op, or
    torch's foreach ops for complex tensors (which the swa_fast ops do not take)."""

    def __init__(self, targets: list[Tensor], sources: list[Tensor], move: bool, fused: bool) -> None:
        self.targets, self.sources = targets, sources
        self.device = targets[0].device
        self.move = move  # sources on another device (allow_different_devices): moved per call
        self.fused = fused
        # The ops write contiguous tensors; a strided target (channels_last) goes through stand-ins.
        self.strided = fused and any(not t.is_contiguous() for t in targets)

    def _sources(self) -> list[Tensor]:
        return [s.to(self.device) for s in self.sources] if self.move else self.sources

    def lerp(self, weight: float | Tensor) -> None:
        """targets += weight * (sources - targets). A tensor weight (worked out where a count
        lives) is used where it is, on the targets' device or the CPU, else moved there."""
        sources = self._sources()
        if isinstance(weight, Tensor) and weight.device not in (self.device, _CPU):
            weight = weight.to(self.device)
        if not self.fused:
            torch._foreach_lerp_(self.targets, sources, weight)
        elif self.strided:
            write_through_strides(self.targets, lambda stand_ins: ops.lerp_(stand_ins, sources, weight), True)
        else:
            ops.lerp_(self.targets, sources, weight)

    def copy(self) -> None:
        sources = self._sources()
        if not self.fused:
            torch._foreach_copy_(self.targets, sources)
        elif self.strided:
            write_through_strides(self.targets, lambda stand_ins: ops.copy_(stand_ins, sources))
        else:
            ops.copy_(self.targets, sources)


def group_pairs(pairs: list[tuple[Tensor, Tensor]], allow_different_devices: bool, owner: str) -> list[Pairs]:
    """Pairs (target, source) in calls: one per target device, complex ones apart."""
    by_call: dict[tuple[torch.device, bool], tuple[list[Tensor], list[Tensor], list[bool]]] = {}
    for target, source in pairs:
        fused = not (target.is_complex() or source.is_complex())
        targets, sources, moved = by_call.setdefault((target.device, fused), ([], [], []))
        targets.append(target)
        sources.append(source)
        moved.append(source.device != target.device)
    calls = []
    for (device, fused), (targets, sources, moved) in by_call.items():
        if any(moved) and not allow_different_devices:
            other = next(s.device for s, m in zip(sources, moved) if m)
            raise ValueError(
                f"swa_fast.{owner}: the average's tensors are on {device}, the model's on {other}; "
                "expected one device, or allow_different_devices=True"
            )
        calls.append(Pairs(targets, sources, any(moved), fused))
    return calls


def tensors_key(*models: Module) -> list:
    """What identifies the tensors of models: the ids of their parameters and buffers in a walk of
    the modules' own dicts (a `.to()` replaces buffers; a shared tensor is listed twice, which
    changes nothing), and each model's first device (a `.to()` moves parameters in place)."""
    key = []
    for model in models:
        walked = _walk(model, True, True)
        key += [list(map(id, walked)), walked[0].device if walked else None]
    return key


