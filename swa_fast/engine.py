"""The engine: averages updated from their sources, by one fused op per device.

Every averaging path of swa_fast (the managers, the `AveragedModel` drop-in, `optim.SWA`, the
integrations) does the same work: pair each average with its source, group the pairs by device,
copy integer and bool pairs exactly, check every group before anything is written, and run one
fused op per group. `UpdatePlan` does that work once for a list of averages and the sources laid
out like them; an update then reuses it while the sources are the same tensors, which its caller
knows from the one "same tensors?" test (model_tensors: `ModuleWalk.holds`, `ModulesWatch`).

A plan keeps tensor objects, not their memory: the ops read each tensor's storage, shape and
strides at every call and check them before writing. So a tensor given new storage in place
(`p.data = ...`, `Module.to`) is read where it now lives, and a change the plan did not foresee
(a tensor now strided, or on another device) is refused by the op, which writes nothing; the
plan is then made anew from the tensors as they are (`run` and `check` do it once, on their own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops
from .flat import check_same_shapes, contiguous_stand_ins, copy_lists, write_through_strides
from .model_tensors import pick

_CPU = torch.device("cpu")
_is_compiling = torch.compiler.is_compiling

# How a pair is updated: by the plan's fused op, copied exactly (integer and bool tensors: a
# model's num_batches_tracked), or by torch (complex tensors, which the fused ops do not take).
FUSED, EXACT, TORCH = "fused", "exact", "torch"
_TORCH_OPS = {"lerp_": torch._foreach_lerp_, "copy_": torch._foreach_copy_}


@dataclass
class _Group:
    """The pairs of one call: their positions, the targets' device and how they are updated."""

    device: torch.device
    kind: str
    positions: list[int]
    take: object  # list -> the group's part of a list laid out like the sources (None: all of it)
    targets: list[list[Tensor]]  # the op's target lists, cut to the group
    move: bool  # some sources live on another device: moved there per call
    strided: bool  # some targets are strided: written through contiguous stand-ins
    op: object  # the bound op (FUSED), torch's foreach op (TORCH) or None (EXACT)

    def part(self, items: Sequence[Tensor]) -> list[Tensor]:
        if self.take is None:
            return list(items)
        if _is_compiling():  # (torch.compile does not trace an itemgetter)
            return [items[i] for i in self.positions]
        return self.take(items)


class UpdatePlan:
    """How `targets` are updated from sources laid out like them, worked out once.

    Args:
        op: the fused op: "lerp_" (an average), "moments_" (first and second moments: targets
            are [mean, sq]), "multi_lerp_" (K averages: targets are the K lists) or "copy_".
        targets: the op's target lists, each as long as `sources` (EXACT pairs use the first).
        sources: the sources now (their devices and kinds shape the plan; `run` takes them anew).
        owner: who is updating, for error messages.
        names: the tensors' names, for error messages (default: their positions).
        move_sources: a source on another device than its target is moved there at each call
            (torch's `AveragedModel(device=...)`); otherwise the plan refuses it.
        move_option: the user's option that allows sources elsewhere, named in the error when
            they are and `move_sources` is False.
        keep_sources: hold `sources` (as `self.sources`) for a caller that runs the plan with the
            tensors it was made from; a manager that tracks its model (and must not keep a freed
            model's memory alive) passes False.
        backend: force an op backend (see `swa_fast.choose_backend`).
    """

    def __init__(
        self,
        op: str,
        targets: Sequence[Sequence[Tensor]],
        sources: Sequence[Tensor],
        *,
        owner: str,
        names: Sequence[str] | None = None,
        move_sources: bool = False,
        move_option: str | None = None,
        keep_sources: bool = True,
        backend: str | None = None,
    ) -> None:
        self.op, self.owner, self.backend = op, owner, backend
        self.move_sources, self.move_option = move_sources, move_option
        self.targets = [list(t) for t in targets]
        self.names = list(names) if names is not None else None
        for lst in self.targets:
            self._check_length(len(lst), len(sources), "averages")
        self.length = len(sources)
        self.sources = list(sources) if keep_sources else None
        self._set_groups(sources)

    def _set_groups(self, sources: Sequence[Tensor]) -> None:
        self.groups = self._group(list(sources))
        # The usual update: one fused call over the lists as they are.
        only = self.groups[0] if len(self.groups) == 1 else None
        plain = only is not None and only.kind == FUSED and only.take is None
        self._single = only if plain and not (only.move or only.strided) else None

    # --- building -----------------------------------------------------------------------------------

    def _check_length(self, expected: int, got: int, what: str) -> None:
        if expected != got:
            raise ValueError(
                f"swa_fast.{self.owner}: expected {expected} tensors laid out as the {what}, got {got}"
            )

    def _kind(self, target: Tensor, source: Tensor) -> str:
        if target.is_complex() or source.is_complex():
            if self.op not in _TORCH_OPS:
                raise ValueError(
                    f"swa_fast.{self.owner}: {self.op} takes real floating tensors, got a complex one"
                )
            return TORCH
        return FUSED if target.is_floating_point() else EXACT

    def _group(self, sources: list[Tensor]) -> list[_Group]:
        by_call: dict[tuple[torch.device, str], list[int]] = {}
        for i, (target, source) in enumerate(zip(self.targets[0], sources)):
            by_call.setdefault((target.device, self._kind(target, source)), []).append(i)
        groups = []
        for (device, kind), positions in by_call.items():
            take = None if positions == list(range(len(sources))) else pick(positions)
            cut = [lst if take is None else take(lst) for lst in self.targets]
            moved = [s for s in (sources if take is None else take(sources)) if s.device != device]
            if moved and not self.move_sources:
                raise ValueError(
                    f"swa_fast.{self.owner}: the averages are on {device}, the model's tensors on "
                    f"{moved[0].device}; expected one device"
                    + (f", or {self.move_option}" if self.move_option else "")
                )
            strided = kind != EXACT and any(not t.is_contiguous() for lst in cut for t in lst)
            if strided and len(cut) > 1:
                raise ValueError(f"swa_fast.{self.owner}: {self.op}'s targets must be contiguous")
            groups.append(
                _Group(device, kind, positions, take, cut, bool(moved), strided, self._op(kind, device))
            )
        return groups

    def _op(self, kind: str, device: torch.device):
        if kind == TORCH:
            return _TORCH_OPS[self.op]
        if kind == EXACT:
            return None
        if self.op == "multi_lerp_":  # K nested lists: the public function splits K > 4 into passes
            return self._multi_lerp
        return ops.BoundOp(self.op, device, self.backend)

    def _multi_lerp(self, *args) -> None:
        """multi_lerp_ over the K target lists, the sources, the weights and, maybe, `rounding` and
        `stats`."""
        k = len(self.targets)
        rounding, stats = (*args[k + 2 :], None, None)[:2]
        ops.multi_lerp_(args[:k], args[k], args[k + 1], rounding=rounding, stats=stats, backend=self.backend)

    @property
    def fused_devices(self) -> list[torch.device]:
        """The devices of the groups the fused op updates (where `stats` are kept)."""
        return [g.device for g in self.groups if g.kind == FUSED]

    # --- using it -------------------------------------------------------------------------------------

    def run(
        self,
        sources: Sequence[Tensor],
        *scalars,
        counted: Tensor | None = None,
        rounding: Tensor | None = None,
        stats: dict[torch.device, Tensor] | None = None,
    ) -> None:
        """Update every target from `sources` (laid out as at construction) with the op's scalars
        (lerp_'s and moments_'s weight, multi_lerp_'s weights; none for copy_). Exact pairs are
        copied, only where `counted` (a device boolean, when the device decides whether an update
        counts) is true. `rounding`: the op's stochastic rounding (ops.rounding: seed, step, stream,
        then the first element of each position), cut to each group. `stats`: the op's `stats` of
        each device (ops.pass_stats), which every fused group on it adds to. Every group is checked
        before any is written."""
        optional = (rounding, stats) if rounding is not None or stats is not None else ()
        single = self._single
        if single is None:
            self._run_groups(sources, (*scalars, *optional), counted)
            return
        try:
            single.op(*single.targets, sources, *scalars, *_optional(rounding, stats, single.device))
        except ValueError:  # refused before writing: say why, or plan anew from the tensors now
            self._plan_anew(sources)
            self._run_groups(sources, (*scalars, *optional), counted, plan_anew=False)

    def _plan_anew(self, sources: Sequence[Tensor]) -> None:
        """After an op refused a call (before writing anything): raise naming a tensor whose shape
        changed, else group the pairs again from the tensors as they are now (a target made
        strided by `.to(memory_format=...)`, moved to another device, given another dtype)."""
        self.check_shapes(sources)
        self._set_groups(sources)

    def check_shapes(self, sources: Sequence[Tensor], every_plan: bool = False) -> None:
        """Raise, naming the first tensor whose shape differs from its average's, unless `sources`
        fit the targets (a comparison of shapes, no device work). A plan without names checks
        only their number (the ops' own checks then say which index differs) unless `every_plan`
        (several groups, checked before any is written)."""
        self._check_length(self.length, len(sources), "averages")
        if self.names is None and not every_plan:
            return
        names = self.names if self.names is not None else [f"tensor {i}" for i in range(self.length)]
        check_same_shapes(names, sources, self.targets[0])

    def check(self, sources: Sequence[Tensor], *scalars) -> None:
        """Raise what `run(sources, *scalars)` would raise before writing, writing nothing: for a
        caller that runs two plans in one update (ema-pytorch's averages and copies). A refusal
        plans anew, as `run` does, and checks again."""
        try:
            self._check_all([self._prepare(g, sources, scalars) for g in self.groups], sources)
        except ValueError:
            self._plan_anew(sources)
            self._check_all([self._prepare(g, sources, scalars) for g in self.groups], sources)

    def _check_all(self, calls: list[tuple[_Group, list]], sources: Sequence[Tensor]) -> None:
        self.check_shapes(sources, every_plan=True)
        for group, args in calls:
            if group.kind == FUSED:  # (a strided group's op writes contiguous stand-ins: checked so)
                self._check([contiguous_stand_ins(args[0]), *args[1:]] if group.strided else args)

    def _run_groups(
        self, sources: Sequence[Tensor], scalars: tuple, counted: Tensor | None, plan_anew: bool = True
    ) -> None:
        calls = [self._prepare(g, sources, scalars) for g in self.groups]
        try:  # nothing is written before the first call returns: a refusal until then plans anew
            if len(calls) > 1:  # each op checks its own group; check them all first
                self._check_all(calls, sources)
            if calls:
                self._call(*calls[0], counted)
        except ValueError:
            if not plan_anew:
                self.check_shapes(sources)  # name the tensor if it can
                raise
            self._plan_anew(sources)
            self._run_groups(sources, scalars, counted, plan_anew=False)
            return
        for group, args in calls[1:]:
            self._call(group, args, counted)

    def _prepare(self, group: _Group, sources: Sequence[Tensor], scalars: tuple) -> tuple[_Group, list]:
        src = group.part(sources)
        if group.move:
            src = [s if s.device == group.device else s.detach().to(group.device) for s in src]
        weights = 0 if self.op == "copy_" else 1  # the op's scalars before `rounding` and `stats`
        placed = [_on(s, group.device) for s in scalars[:weights]]
        if len(scalars) > weights and group.kind == FUSED:
            rounding, stats = scalars[weights:]
            if rounding is not None and group.take is not None:  # its firsts, cut to the group
                rounding = torch.cat([rounding[:3], rounding[3:][group.positions]])
            placed += _optional(rounding, stats, group.device)
        return group, [*group.targets, src, *placed]

    def _check(self, args: list) -> None:
        if self.op == "multi_lerp_":
            k = len(self.targets)
            avgs, rest = args[:k], args[k:]
            ops.OP_TABLE[self.op].check([t for lst in avgs for t in lst], *rest, max_count=None)
        else:
            ops.OP_TABLE[self.op].check(*args)

    def _call(self, group: _Group, args: list, counted: Tensor | None) -> None:
        if group.kind == EXACT:
            target, src = args[0], args[len(self.targets)]
            if counted is not None:  # (an update the device left out keeps them as they were)
                src = [torch.where(counted, s, t) for t, s in zip(target, src)]
            copy_lists(target, src, backend=self.backend)
        elif group.kind == TORCH:
            group.op(args[0], *args[len(self.targets) :])
        elif group.strided:  # the ops write contiguous tensors: the strided ones through stand-ins
            target, src, *rest = args  # (one target list: checked when the plan was made)
            keep = self.op != "copy_"  # (a copy overwrites its stand-ins whole)
            write_through_strides(target, lambda stand_ins: group.op(stand_ins, src, *rest), keep)
        else:
            group.op(*args)


def _optional(rounding: Tensor | None, stats: dict | None, device: torch.device) -> tuple:
    """The op's optional last arguments for a call on `device`: none, `rounding`, or `rounding` and
    that device's `stats`."""
    if stats is not None:
        return rounding, stats.get(device)
    return () if rounding is None else (rounding,)


def _on(value, device: torch.device):
    """A scalar argument where the group's op can read it: a tensor on another device than the
    group's (or the CPU, which every op reads on the host) is moved there."""
    if isinstance(value, Tensor) and value.device not in (device, _CPU):
        return value.to(device, non_blocking=True)
    return value
