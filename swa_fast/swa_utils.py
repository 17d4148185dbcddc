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

from collections.abc import Callable
from copy import deepcopy

import torch
from torch import Tensor
from torch.nn import Module
from torch.optim.swa_utils import SWALR

from . import checks, ops
from .bn import update_bn
from .flat import FlatBuffer
from .model_tensors import module_buffers, module_tensors
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


def _save_own_bytes(module: Module, state: dict, prefix: str, _metadata: dict) -> None:
    """A state_dict post-hook of the submodules of an AveragedModel's copy. Its averaged tensors are
    views of flat buffers, and torch.save writes a view's whole storage: `avg.module[1].state_dict()`
    would save every layer. So in the outermost state_dict call, the entries of a storage that the
    call's entries do not cover entirely are cloned (each saves its own bytes, as torch's would).
    The whole model's state covers every flat buffer and stays views of it (no copy)."""
    seen = getattr(state, "_metadata", None)  # one entry per module visited so far, by its prefix
    if seen is not None and prefix and prefix[:-1].rpartition(".")[0] in seen:
        return  # a submodule in its parent's call, which sees more of the storage
    live = {id(t) for t in module_tensors(module, True)}  # keep_vars=True: the tensors themselves
    by_storage: dict[int, list[str]] = {}
    for name, value in state.items():
        if type(value) is Tensor and value.numel() and id(value) not in live and name.startswith(prefix):
            by_storage.setdefault(value.untyped_storage().data_ptr(), []).append(name)
    for names in by_storage.values():
        views = [state[name] for name in names]
        size = views[0].element_size()
        spans = {(v.storage_offset(), v.numel()) for v in views}  # tied weights are listed twice
        if sum(n for _, n in spans) * size < views[0].untyped_storage().nbytes():
            for name, view in zip(names, views):
                state[name] = view.clone()


class _FlatAverage:
    """The averaged tensors as views of flat buffers, and the data pointers that prove the module
    still uses them (a `.to()`, a `load_state_dict(assign=True)` or `p.data = ...` replaces them)."""

    def __init__(self, tensors: list[Tensor]) -> None:
        self.floating = [i for i, t in enumerate(tensors) if t.is_floating_point()]
        self.other = [i for i, t in enumerate(tensors) if not t.is_floating_point()]
        self.buffer = FlatBuffer([tensors[i] for i in self.floating])
        for i, view in zip(self.floating, self.buffer.views):
            tensors[i].data = view
        self.ptrs = [t.data_ptr() for t in tensors]


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
    ) -> None:
        super().__init__()
        if avg_fn is not None and multi_avg_fn is not None:
            raise AssertionError("Only one of avg_fn and multi_avg_fn should be provided")
        self.module = deepcopy(model)
        if device is not None:
            self.module = self.module.to(device)
        if dtype is not None:
            self.module = self.module.to(dtype)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers
        self._moved = device is not None
        self._flat_average: _FlatAverage | None = None
        # Not on this module or `module`: their state holds every averaged tensor, so it covers
        # every flat buffer, and a whole-model state_dict() pays only each submodule's early return.
        for module in self.module.modules():
            if module is not self.module:
                module.register_state_dict_post_hook(_save_own_bytes)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _averaged_tensors(self) -> list[Tensor]:
        return module_tensors(self.module, self.use_buffers)

    def _current_flat_average(self) -> _FlatAverage:
        tensors = self._averaged_tensors()
        flat = self._flat_average
        if flat is None or flat.ptrs != [t.data_ptr() for t in tensors]:
            flat = self._flat_average = _FlatAverage(tensors)
        return flat

    @torch.no_grad()
    def update_parameters(self, model: Module) -> None:
        """Update the average with `model`'s current weights (the first call copies them)."""
        current = module_tensors(model, self.use_buffers)
        given = self.avg_fn if self.avg_fn is not None else self.multi_avg_fn
        kind = getattr(given, "swa_fast_kind", None)
        if given is not None and kind is None:
            self._update_like_torch(current)
        else:
            self._update_fused(current, kind or ("swa", None))
        if not self.use_buffers:  # as torch does: buffers are not averaged, they follow the model
            ours, theirs = module_buffers(self.module), module_buffers(model)
            n = min(len(ours), len(theirs))  # (torch zips them)
            if n:
                torch._foreach_copy_(ours[:n], theirs[:n])
        self.n_averaged += 1

    def _update_fused(self, current: list[Tensor], kind: tuple[str, float | None]) -> None:
        flat = self._current_flat_average()
        if len(current) != len(flat.ptrs):
            raise ValueError(
                f"swa_fast.AveragedModel.update_parameters: the model has {len(current)} "
                f"{'parameters and buffers' if self.use_buffers else 'parameters'}, the averaged copy "
                f"has {len(flat.ptrs)}; pass the model this AveragedModel was made from"
            )
        # 1 on the first call: an exact copy. Worked out where n_averaged lives (no host sync).
        weight = swa_weight(self.n_averaged) if kind[0] == "swa" else ema_weight(kind[1], self.n_averaged)
        calls = []
        floating = [current[i] for i in flat.floating] if flat.other else current
        for group, views, src in flat.buffer.pairs(floating):
            if self._moved or src[0].device != group.device:  # torch's `device=`: the model lives elsewhere
                src = [s if s.device == group.device else s.to(group.device) for s in src]
            elsewhere = isinstance(weight, Tensor) and weight.device not in (group.device, _CPU)
            w = weight.to(group.device) if elsewhere else weight
            calls.append((views, src, w))
        if len(calls) > 1:  # each op checks its own group; check all first so a mismatch writes nothing
            for avg, src, w in calls:
                checks.check_lerp(avg, src, w)
        for avg, src, w in calls:
            ops.lerp_(avg, src, w)
        if flat.other:
            averaged = self._averaged_tensors()
            self._update_integers([averaged[i] for i in flat.other], [current[i] for i in flat.other], kind)

    def _update_integers(self, averaged: list[Tensor], current: list[Tensor], kind) -> None:
        """Integer buffers (num_batches_tracked with use_buffers=True), with torch's arithmetic:
        a copy on the first update, then the average truncated back to the integer dtype. Alike
        buffers (a model's num_batches_tracked are all 0-dim int64) are stacked, so that each step
        is one op for all of them rather than one per BatchNorm layer."""
        alike: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        for a, c in zip(averaged, current):
            group = alike.setdefault((a.device, a.dtype, a.shape, c.device), ([], []))
            group[0].append(a)
            group[1].append(c)
        for (device, *_), (a_list, c_list) in alike.items():
            a, c = torch.stack(a_list), torch.stack(c_list).to(device)
            n = self.n_averaged.to(device)
            blended = a + (c - a) / (n + 1) if kind[0] == "swa" else a * kind[1] + c * (1 - kind[1])
            torch._foreach_copy_(a_list, torch.where(n == 0, c, blended).unbind())

    def _update_like_torch(self, current: list[Tensor]) -> None:
        """A user's own avg_fn / multi_avg_fn: torch's update, step for step."""
        averaged = [p.detach() for p in self._averaged_tensors()]
        current = [c.detach().to(a.device) for a, c in zip(averaged, current)]
        if self.n_averaged == 0:
            for a, c in zip(averaged, current):
                a.copy_(c)
            return
        if self.multi_avg_fn is not None:
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

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_flat_average"] = None  # rebuilt on the next update
        return state
