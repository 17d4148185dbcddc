"""Drop-in replacement for `torch.optim.swa_utils`: change the import, keep the code.

    from swa_fast.swa_utils import AveragedModel, SWALR, update_bn

`AveragedModel` keeps torch's signature, state_dict keys, `n_averaged` buffer and `module`
attribute, and its averages are interchangeable with torch's in both directions. What changes is
the update: the averaged model's floating parameters (and buffers, with `use_buffers=True`) live in
flat buffers, one per (device, dtype), and `update_parameters` is one fused swa_fast op per group,
with the weight worked out where `n_averaged` lives (on a GPU without a host synchronisation; a
CPU count is read directly): no per-parameter Python arithmetic.
The default SWA average and the functions from this module's `get_swa_multi_avg_fn` /
`get_ema_multi_avg_fn` take that path; a user's own `avg_fn` / `multi_avg_fn` run as in torch.

`get_swa_avg_fn` / `get_ema_avg_fn` give torch's per-tensor functions (the same math, usable
wherever torch's are), which this module's `AveragedModel` recognises as `avg_fn=` and runs fused
(what Lightning's EMA callback passes). `SWALR` is torch's own scheduler. `update_bn` is
swa_fast.bn's: torch's behaviour, plus a `forward_fn` for batches that are not a tensor.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from copy import deepcopy

import torch
from torch import Tensor
from torch.nn import Module
from torch.optim.swa_utils import SWALR

from . import ops
from .bn import update_bn
from .buffer_copy import BufferCopy
from .counts import numpy_view
from .distributed import element_firsts
from .engine import UpdatePlan
from .flat import FlatBuffer
from .model_tensors import ModuleWalk, module_buffers, module_tensors, pick, save_own_bytes
from .ops.rounding import STOCHASTIC_DTYPES, rounding_tensor
from .stochastic_rounding import ManagerRounding
from .weighting import ema_weight, real_number, swa_weight

__all__ = [
    "SWALR",
    "AveragedModel",
    "get_ema_avg_fn",
    "get_ema_multi_avg_fn",
    "get_swa_avg_fn",
    "get_swa_multi_avg_fn",
    "update_bn",
]

PARAM_LIST = list[Tensor] | tuple[Tensor, ...]
_CPU = torch.device("cpu")
_SWA = ("swa", None)  # the kind of the default average
_is_compiling = torch.compiler.is_compiling


def get_swa_multi_avg_fn() -> Callable[[PARAM_LIST, PARAM_LIST, Tensor | int], None]:
    """Equal-weight average (SWA, Izmailov et al. 2018): avg += (param - avg) / (n + 1), fused."""

    @torch.no_grad()
    def swa_update(averaged: PARAM_LIST, current: PARAM_LIST, num_averaged: Tensor | int) -> None:
        if averaged and averaged[0].is_floating_point():
            ops.lerp_(averaged, current, swa_weight(num_averaged))
        else:  # integer tensors, as torch does
            for a, c in zip(averaged, current):
                a.copy_(a + (c - a) / (num_averaged + 1))

    swa_update.swa_fast_kind = ("swa", None)
    return swa_update


def get_ema_multi_avg_fn(decay: float = 0.999) -> Callable[[PARAM_LIST, PARAM_LIST, Tensor | int], None]:
    """Exponential moving average: ema = decay * ema + (1 - decay) * param, fused. `decay` is any
    real number in [0, 1] that torch's takes (a numpy number, a 0-dim tensor of any dtype)."""
    decay = real_number(decay, "get_ema_multi_avg_fn: decay", 0.0, 1.0)

    @torch.no_grad()
    def ema_update(ema: PARAM_LIST, current: PARAM_LIST, _num_averaged: Tensor | int) -> None:
        if ema and ema[0].is_floating_point():
            ops.lerp_(ema, current, 1.0 - decay)
        else:
            for e, c in zip(ema, current):
                e.copy_(e * decay + c * (1 - decay))

    ema_update.swa_fast_kind = ("ema", decay)
    return ema_update


def get_swa_avg_fn() -> Callable[[Tensor, Tensor, Tensor | int], Tensor]:
    """torch's per-tensor equal-weight average, avg + (param - avg) / (n + 1). Given as `avg_fn=`
    to this module's `AveragedModel`, the whole model is updated by one fused op per group."""

    @torch.no_grad()
    def swa_update(averaged: Tensor, current: Tensor, num_averaged: Tensor | int) -> Tensor:
        return averaged + (current - averaged) / (num_averaged + 1)

    swa_update.swa_fast_kind = ("swa", None)
    return swa_update


def get_ema_avg_fn(decay: float = 0.999) -> Callable[[Tensor, Tensor, Tensor | int], Tensor]:
    """torch's per-tensor exponential moving average, decay * ema + (1 - decay) * param, `decay` as
    `get_ema_multi_avg_fn` takes it. Given as `avg_fn=` to this module's `AveragedModel`, the whole
    model is updated by one fused op per group."""
    decay = real_number(decay, "get_ema_avg_fn: decay", 0.0, 1.0)

    @torch.no_grad()
    def ema_update(ema: Tensor, current: Tensor, _num_averaged: Tensor | int) -> Tensor:
        return decay * ema + (1 - decay) * current

    ema_update.swa_fast_kind = ("ema", decay)
    return ema_update


def _flatten(tensors: list[Tensor]) -> FlatBuffer:
    """Move the floating `tensors` (the averaged copy's) into flat buffers, one per (device,
    dtype): each keeps its Python object and now views its buffer."""
    floating = [t for t in tensors if t.is_floating_point()]
    flat = FlatBuffer(floating)
    for t, view in zip(floating, flat.views):
        t.data = view
    return flat


class _CountingDict(dict):
    """The dicts of the averaged copy's modules (`_parameters`, `_buffers`, `_modules`): each
    change to any of them is counted. The copy is ours, so `update_parameters` reads its tensors
    from lists made once and makes them anew only when the count moved (a `.to()`'s new buffers, a
    `load_state_dict(assign=True)`, a `del`, a module set): nothing to walk or compare per call.
    The model's dicts are the user's and stay as they are (read by a `ModuleWalk`)."""

    __slots__ = ()
    changes = 0


def _counted(method: Callable) -> Callable:
    def change(self, *args, **kwargs):
        _CountingDict.changes += 1
        return method(self, *args, **kwargs)

    return change


for _name in ("__setitem__", "__delitem__", "__ior__", "pop", "popitem", "clear", "update", "setdefault"):
    setattr(_CountingDict, _name, _counted(getattr(dict, _name)))


class _OwnCopy:
    """The averaged copy's tensors as a `ModuleWalk` over it gives them, from lists made when its
    dicts last changed (they are `_CountingDict`s from the first read on). `owner` is the
    AveragedModel's own `_modules` dict, counted too, so a new `module` is seen."""

    def __init__(self, owner: dict) -> None:
        self.owner = owner
        self.walks = 0
        self._read()

    def _read(self) -> None:
        module = self.owner["module"]
        for m in module.modules():
            for kind in ("_parameters", "_buffers", "_modules"):
                if type(m.__dict__[kind]) is not _CountingDict:
                    m.__dict__[kind] = _CountingDict(m.__dict__[kind])
        self.changes = _CountingDict.changes
        self._tensors = module_tensors(module, True)
        self._parts = [module_tensors(module, False), module_buffers(module)]
        self.walks += 1

    def tensors(self) -> list[Tensor]:
        if _CountingDict.changes != self.changes:
            self._read()
        return self._tensors

    def parts(self) -> list[list[Tensor]]:
        if _CountingDict.changes != self.changes:
            self._read()
        return self._parts


class _Prepared:
    """What `update_parameters` reads on every call with one model: a walk over the model that
    reads its tensors live (a replaced tensor, a `.to()` is seen at the next call), the averaged
    copy's tensors (`_OwnCopy`), and the split of the latter into floating ones, one fused op per
    device, and integer ones, redone whenever the copy changed. Lists given out are not to be
    changed. `p.data = ...` on either side keeps the tensor object, which the op writes or reads
    wherever it now lives."""

    def __init__(self, model: Module, owner: dict, use_buffers: bool) -> None:
        self.model = weakref.ref(model)
        self.use_buffers = use_buffers
        self.theirs = ModuleWalk(model, True, True)
        self.ours = _OwnCopy(owner)
        self.split(self.ours.tensors() if use_buffers else self.ours.parts()[0])
        self._count: Tensor | None = None
        self._count_ptr = 0
        self._count_view = None

    def host_count(self, n_averaged: Tensor):
        """A numpy view of `n_averaged` (`counts.numpy_view`) when it is a CPU long tensor
        (torch's default, even for a GPU model), else None. Reading it and adding 1 through the
        view skips a tensor op's dispatch (kept: docs/benchmarks.md, "Measured costs behind design
        choices"); it is the buffer's own memory, so
        the buffer, its state_dict and a checkpoint see the count at once."""
        # a new buffer (`.to()`, load_state_dict(assign=True)) or new memory (`.data = ...`)
        if n_averaged is not self._count or n_averaged.data_ptr() != self._count_ptr:
            self._count, self._count_ptr = n_averaged, n_averaged.data_ptr()
            self._count_view = numpy_view(n_averaged) if n_averaged.dtype == torch.long else None
        return self._count_view

    def lists(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """The model's and the averaged copy's averaged tensors, then their buffers that are copied
        (as torch does: not averaged, they follow the model; none with use_buffers)."""
        if self.use_buffers:
            current, averaged, theirs, ours = self.theirs.tensors(), self.ours.tensors(), [], []
        else:
            (current, theirs), (averaged, ours) = self.theirs.parts(), self.ours.parts()
        if self.walks != self.ours.walks:  # the averaged copy changed
            self.split(averaged)
        if len(ours) != len(theirs):  # (torch zips them)
            ours, theirs = ours[: len(theirs)], theirs[: len(ours)]
        return current, averaged, theirs, ours

    def split(self, averaged: list[Tensor]) -> None:
        self.walks = self.ours.walks
        floating = [i for i, t in enumerate(averaged) if t.is_floating_point()]
        integers = [i for i, t in enumerate(averaged) if not t.is_floating_point()]
        self.floating = pick(floating) if integers else None
        self.integers = pick(integers) if integers else None
        devices = {averaged[i].device for i in floating}
        self.plan: UpdatePlan | None = None  # the engine's plan of the floating tensors, at the next update
        device = averaged[0].device if averaged else _CPU
        self.lerp = ops.BoundOp("lerp_", device)
        self.copy_buffers = BufferCopy(device)
        # the usual layout: every averaged tensor floating, on one device, run by the extension
        # (which then also copies the buffers in the same call: ops.eager_lerp_then_copy)
        self.plain = not integers and len(devices) < 2 and self.lerp.eager is not None
        self._rounding: Tensor | None = None  # rounding="stochastic"'s op argument, at its first use

    def rounding_at(self, averaged: list[Tensor], seed: int, step: int) -> Tensor:
        """The `rounding` argument of the floating tensors' lerp_ for update `step`: each tensor
        numbered by its place in the averaged copy's tensors laid end to end."""
        if self._rounding is None:
            firsts = element_firsts([t.shape for t in averaged], [None] * len(averaged), "AveragedModel")
            self._rounding = rounding_tensor(0, 0, firsts if self.floating is None else self.floating(firsts))
        self._rounding[0], self._rounding[1] = seed, step
        return self._rounding


class AveragedModel(Module):
    """`torch.optim.swa_utils.AveragedModel`, updated by fused swa_fast ops on flat buffers.

    Args:
        model: the model to average (deep-copied into `module`).
        device: where the averaged copy lives (default: where the model is).
        avg_fn: a per-tensor `avg_fn(averaged, current, n_averaged) -> new average`; this
            module's `get_swa_avg_fn()` / `get_ema_avg_fn(decay)` take the fused path, a user's own
            runs as in torch, tensor by tensor.
        multi_avg_fn: a per-list `multi_avg_fn(averaged, current, n_averaged)`; this module's
            `get_swa_multi_avg_fn()` / `get_ema_multi_avg_fn(decay)` take the fused path, a user's
            own runs as in torch. Neither given: the equal-weight (SWA) average, fused.
        use_buffers: average the buffers too (else they are copied from the model, as in torch).
        dtype: the dtype of the averaged copy's floating parameters and buffers (default: the
            model's own, as in torch). `dtype=torch.float32` keeps an fp32 average of a bf16/fp16
            model, so small updates are not rounded away; the averaged model then computes in fp32.
        rounding: "nearest" (torch's), or "stochastic": each update rounds into bf16/fp16 averages
            stochastically (`dtype=torch.bfloat16, rounding="stochastic"`: half the memory of an fp32
            average, and an EMA that keeps moving), by random bits of the seed, `n_averaged` and each
            element's place (docs/low-precision.md). Each update then
            reads `n_averaged` and the seed on the host.
        seed: stochastic rounding's seed, kept in the state_dict (`rounding_seed`).
    """

    n_averaged: Tensor

    def __init__(
        self,
        model: Module,
        device: int | torch.device | None = None,
        avg_fn: Callable[[Tensor, Tensor, Tensor | int], Tensor] | None = None,
        multi_avg_fn: Callable[[PARAM_LIST, PARAM_LIST, Tensor | int], None] | None = None,
        use_buffers: bool = False,
        *,
        dtype: torch.dtype | None = None,
        rounding: str = "nearest",
        seed: int = 0,
    ) -> None:
        super().__init__()
        stochastic = ManagerRounding(rounding, seed, "AveragedModel", "lerp_").stochastic
        if avg_fn is not None and multi_avg_fn is not None:
            raise AssertionError("Only one of avg_fn and multi_avg_fn should be provided")
        self.module = deepcopy(model)
        if device is not None:
            self.module = self.module.to(device)
        if dtype is not None:
            self.module = self.module.to(dtype)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        if stochastic:
            if not any(t.dtype in STOCHASTIC_DTYPES for t in module_tensors(self.module, use_buffers)):
                raise ValueError(
                    "swa_fast.AveragedModel: rounding='stochastic' rounds bfloat16 and float16 averages, "
                    "but the averaged copy has none: pass dtype=torch.bfloat16 (or torch.float16)"
                )
            self.register_buffer("rounding_seed", torch.tensor(seed, dtype=torch.long))
        self._stochastic = stochastic
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers
        self._moved = device is not None
        self._flat: FlatBuffer | None = None  # the averaged copy's floating tensors, at the first update
        self._prepared: _Prepared | None = None
        # The copy's tensors will view flat buffers: its state_dict (whole, a submodule's, or any
        # part of either) saves only its tensors' own bytes, as torch's does.
        save_own_bytes(self.module)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _averaged_tensors(self) -> list[Tensor]:
        return module_tensors(self.module, self.use_buffers)

    def _prepare(self, model: Module) -> _Prepared:
        if self._flat is None:  # the first update (or the first since unpickling)
            self._flat = _flatten(self._averaged_tensors())
        if type(self._modules) is not _CountingDict:
            self.__dict__["_modules"] = _CountingDict(self._modules)
        self._prepared = _Prepared(model, self._modules, self.use_buffers)
        return self._prepared

    def update_parameters(self, model: Module) -> None:
        """Update the average with `model`'s current weights (the first call copies them)."""
        given = self.avg_fn if self.avg_fn is not None else self.multi_avg_fn
        kind = _SWA if given is None else getattr(given, "swa_fast_kind", None)
        if kind is None:
            self._update_like_torch(model)
            return
        prepared = self._prepared
        if prepared is None or prepared.model() is not model:
            prepared = self._prepare(model)
        current, averaged, theirs, ours = prepared.lists()
        # (n_averaged read from the dict: Module.__getattr__ is a Python call)
        n_averaged = self._buffers["n_averaged"]
        count = prepared.host_count(n_averaged)
        # 1 on the first call: an exact copy. Worked out where n_averaged lives (no host sync).
        n = n_averaged if count is None else count.item()
        weight = swa_weight(n) if kind[0] == "swa" else ema_weight(kind[1], n)
        eager = not _is_compiling()  # asked once: then the ops' entry points are called straight
        copied = False
        if self._stochastic:
            rounding = prepared.rounding_at(averaged, int(self.rounding_seed), int(n_averaged))
            self._update_fused(prepared, current, averaged, weight, kind, n, rounding)
        elif eager and prepared.plain and not self._moved:
            try:  # the usual case: one call, whose ops' checks (before they write) say if anything is amiss
                if prepared.copy_buffers.by_op:
                    copied = ops.eager_lerp_then_copy(averaged, current, weight, ours, theirs)
                else:
                    prepared.lerp.eager(averaged, current, weight)
            except ValueError:  # the lerp_ refused: the general path says why, or takes the devices apart
                self._update_fused(prepared, current, averaged, weight, kind, n)
                prepared.plain = False  # (what it took, a strided copy say, stays: its plan from now on)
        else:
            self._update_fused(prepared, current, averaged, weight, kind, n)
        if ours and not copied:
            prepared.copy_buffers(ours, theirs, eager)
        if count is not None:
            count[()] = n + 1  # in the buffer's memory (not `count += 1`: a slower numpy ufunc)
        else:  # in place, as `+=` is, but without its setattr, which registers the buffer anew
            n_averaged.add_(1)

    def _update_fused(
        self,
        prepared: _Prepared,
        current: list[Tensor],
        averaged: list[Tensor],
        weight,
        kind: tuple,
        n,
        rounding: Tensor | None = None,
    ) -> None:
        if len(current) != len(averaged):
            raise ValueError(
                f"swa_fast.AveragedModel.update_parameters: the model has {len(current)} "
                f"{'parameters and buffers' if self.use_buffers else 'parameters'}, the averaged copy "
                f"has {len(averaged)}; pass the model this AveragedModel was made from"
            )
        avg, src = averaged, current
        if prepared.floating is not None:
            avg, src = prepared.floating(averaged), prepared.floating(current)
        if prepared.plan is None:  # as torch does, the model's tensors are taken where the averages are
            prepared.plan = UpdatePlan(
                "lerp_", [avg], src, owner="AveragedModel", move_sources=True, keep_sources=False
            )
        prepared.plan.run(src, weight, rounding=rounding)
        if prepared.integers is not None:
            self._update_integers(prepared.integers(averaged), prepared.integers(current), kind, n)

    def _update_integers(self, averaged: list[Tensor], current: list[Tensor], kind, n: Tensor | int) -> None:
        """Integer buffers (num_batches_tracked with use_buffers=True), with torch's arithmetic:
        a copy on the first update, then the average truncated back to the integer dtype. Alike
        buffers (a model's num_batches_tracked are all 0-dim int64) are stacked, so that each step
        is one op for all of them rather than one per BatchNorm layer. `n`: the count as read on
        the host, or the n_averaged buffer where it was not (then decided on its device: moving a
        CPU count to a GPU would wait for the GPU)."""
        alike: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        for a, c in zip(averaged, current):
            group = alike.setdefault((a.device, a.dtype, a.shape, c.device), ([], []))
            group[0].append(a)
            group[1].append(c)
        on_host = type(n) is int
        for (device, *_), (a_list, c_list) in alike.items():
            c = torch.stack(c_list).to(device)
            if on_host and n == 0:  # the first update: a copy, exact at any count
                torch._foreach_copy_(a_list, c.unbind())
                continue
            a, count = torch.stack(a_list), n if on_host else n.to(device)
            blended = a + (c - a) / (count + 1) if kind[0] == "swa" else a * kind[1] + c * (1 - kind[1])
            if not on_host:  # (truncated first, as the copy would: c itself is kept exactly)
                blended = torch.where(count == 0, c, blended.to(c.dtype))
            torch._foreach_copy_(a_list, blended.unbind())

    @torch.no_grad()
    def _update_like_torch(self, model: Module) -> None:
        """A user's own avg_fn / multi_avg_fn: torch's update, step for step."""
        averaged = [p.detach() for p in self._averaged_tensors()]
        current = [c.detach().to(a.device) for a, c in zip(averaged, module_tensors(model, self.use_buffers))]
        if self.n_averaged == 0:
            for a, c in zip(averaged, current):
                a.copy_(c)
        elif self.multi_avg_fn is not None:
            groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
            for a, c in zip(averaged, current):
                group = groups.setdefault((a.device, a.dtype), ([], []))
                group[0].append(a)
                group[1].append(c)
            for (device, _), (a_list, c_list) in groups.items():
                self.multi_avg_fn(a_list, c_list, self.n_averaged.to(device))
        else:
            for a, c in zip(averaged, current):
                a.copy_(self.avg_fn(a, c, self.n_averaged.to(a.device)))
        if not self.use_buffers:  # as torch does: buffers are not averaged, they follow the model
            ours, theirs = module_buffers(self.module), module_buffers(model)
            if ours and theirs:
                n = min(len(ours), len(theirs))  # (torch zips them)
                torch._foreach_copy_(ours[:n], theirs[:n])
        self.n_averaged.add_(1)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_flat"] = state["_prepared"] = None  # rebuilt on the next update
        return state
