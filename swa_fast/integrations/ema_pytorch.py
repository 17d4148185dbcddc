"""Drop-in for lucidrains' ema-pytorch `EMA`: change the import, keep the code and the checkpoints.

    from swa_fast.integrations.ema_pytorch import EMA     # was: from ema_pytorch import EMA

Same arguments, methods, attributes and state_dict (`initted`, `step`, `online_model.*`,
`ema_model.*`) as ema-pytorch's, and the same semantics: the first `update()` copies the model,
updates on steps divisible by `update_every` copy it until `update_after_step`, then average with
the warmup decay `1 - (1 + epoch / inv_gamma) ** -power` clamped to [min_value, beta] (computed in
float32 as the original does, so the decay is the same to the bit); only floating (and complex)
parameters and buffers are kept, integer buffers such as BatchNorm's `num_batches_tracked` stay as
they were copied; `ignore_names`, `ignore_startswith_names` and `param_or_buffer_names_no_ema` act
on the averaging update only, the copies copy everything, as in the original.

What changes is the update: one fused swa_fast op per device for all averaged tensors (and one for
the copied ones) instead of a Python loop of `lerp_` calls, with no host synchronisation: the
original reads `step`, `initted` and the decay back with `.item()` on every update; here the step
count lives on the host and the `step` / `initted` buffers are only written (kept equal to it, so
checkpoints load both ways; loading a state_dict reads them back). Also: the EMA copy may be
kept in another dtype (`dtype=torch.float32` for a bf16 model), and sources of another dtype are
averaged without `coerce_dtype` (the op reads each side in its own dtype).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from copy import deepcopy
from functools import partial

import torch
from torch import Tensor
from torch.nn import Module

from ..engine import UpdatePlan
from ..model_tensors import ModulesWatch
from ..weighting import count, real_number
from ..wrappers import hooked

__all__ = ["EMA"]

_OWNER = "integrations.ema_pytorch.EMA"


class _Plan:
    """What one update of `target` from `source` does, worked out once per pair of models: the
    engine's lerp and copy plans, kept while the models hold the same tensors (`watch`)."""

    def __init__(self, watch: ModulesWatch, lerp: UpdatePlan, copy: UpdatePlan) -> None:
        self.watch, self.lerp, self.copy = watch, lerp, copy


class EMA(Module):
    """ema-pytorch's `EMA` (lucidrains), updated by fused swa_fast ops without host syncs.

    Args:
        model: the online model (an nn.Module; the original's pytree form is not covered).
        ema_model: the EMA copy, or a function making it (default: a deep copy of `model`).
        beta: the largest decay.
        update_after_step: updates before this step copy the model instead of averaging.
        update_every: average (or copy) on steps divisible by this.
        inv_gamma, power, min_value: the warmup, decay = 1 - (1 + epoch / inv_gamma) ** -power,
            clamped to [min_value, beta], where epoch = step - update_after_step - 1.
        param_or_buffer_names_no_ema: names copied from the model instead of averaged.
        ignore_names, ignore_startswith_names: names (or name prefixes) the averaging update leaves.
        include_online_model: keep the model as a submodule (saved in the state_dict).
        allow_different_devices: move the model's tensors to the EMA copy's device when they differ.
        use_foreach: accepted for compatibility; every update is fused anyway.
        update_model_with_ema_every, update_model_with_ema_beta: every this many steps, move the
            model to the EMA weights (a copy at beta 0, else a lerp keeping `beta` of the model).
        forward_method_names: methods of the EMA copy made methods of this object.
        move_ema_to_online_device: move the EMA copy to the model's device before averaging.
        coerce_dtype: accepted for compatibility; sources of another dtype are always taken.
        lazy_init_ema: make the EMA copy at the first `update()`.
        dtype: swa_fast's addition: keep the EMA copy's floating tensors in this dtype (say
            torch.float32 for a bf16 model, so small updates are not rounded away).
    """

    initted: Tensor
    step: Tensor

    def __init__(
        self,
        model: Module,
        ema_model: Module | Callable[[], Module] | None = None,
        beta: float = 0.9999,
        update_after_step: int = 100,
        update_every: int = 10,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_value: float = 0.0,
        param_or_buffer_names_no_ema: set[str] | list[str] = frozenset(),
        ignore_names: set[str] = frozenset(),
        ignore_startswith_names: set[str] = frozenset(),
        include_online_model: bool = True,
        allow_different_devices: bool = False,
        use_foreach: bool = False,
        update_model_with_ema_every: int | None = None,
        update_model_with_ema_beta: float = 0.0,
        forward_method_names: tuple[str, ...] = (),
        move_ema_to_online_device: bool = False,
        coerce_dtype: bool = False,
        lazy_init_ema: bool = False,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        owner = _OWNER
        if not isinstance(model, Module):
            raise ValueError(f"swa_fast.{owner}: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(param_or_buffer_names_no_ema, (set, frozenset, list)):
            raise ValueError(
                f"swa_fast.{owner}: param_or_buffer_names_no_ema must be a set or list of names, "
                f"got {type(param_or_buffer_names_no_ema).__name__}"
            )
        if lazy_init_ema and ema_model is not None:
            raise ValueError(f"swa_fast.{owner}: lazy_init_ema=True makes its EMA model, got ema_model too")
        update_model_with_ema_every = count(
            update_model_with_ema_every, f"{owner}: update_model_with_ema_every", 1, allow_none=True
        )
        update_every = count(update_every, f"{owner}: update_every", 1)
        update_after_step = count(update_after_step, f"{owner}: update_after_step", 0)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"swa_fast.{owner}: dtype must be a floating torch.dtype or None, got {dtype!r}")
        super().__init__()
        self.beta = real_number(beta, f"{owner}: beta", 0.0, 1.0)
        self.is_frozen = self.beta == 1.0
        self.include_online_model = include_online_model
        self.online_model = model if include_online_model else [model]  # a list hides it from the state
        if not isinstance(ema_model, Module) and callable(ema_model):
            ema_model = ema_model()
        self.ema_model = None
        self.forward_method_names = forward_method_names
        self._dtype = dtype
        self._plans: dict[tuple[int, int, bool], _Plan] = {}
        if not lazy_init_ema:
            self.init_ema(ema_model)
        self.update_every = update_every
        self.update_after_step = update_after_step
        self.inv_gamma = real_number(inv_gamma, f"{owner}: inv_gamma", 0.0, above_low=True)
        self.power = real_number(power, f"{owner}: power")
        self.min_value = real_number(min_value, f"{owner}: min_value", 0.0, 1.0)
        self.param_or_buffer_names_no_ema = param_or_buffer_names_no_ema
        self.ignore_names = ignore_names
        self.ignore_startswith_names = ignore_startswith_names
        self.update_model_with_ema_every = update_model_with_ema_every
        self.update_model_with_ema_beta = real_number(
            update_model_with_ema_beta, f"{owner}: update_model_with_ema_beta", 0.0, 1.0
        )
        self.allow_different_devices = allow_different_devices
        moves = {"auto_move_device": allow_different_devices, "coerce_dtype": coerce_dtype}
        self.inplace_copy = partial(_inplace, Tensor.copy_, **moves)
        self.inplace_lerp = partial(_inplace, Tensor.lerp_, **moves)
        self.coerce_dtype = coerce_dtype
        self.move_ema_to_online_device = move_ema_to_online_device
        self.use_foreach = use_foreach
        # The same buffers as the original (its checkpoints load here and back), written only: the
        # counts that decide each update are these host copies, so an update reads nothing back.
        self.register_buffer("initted", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0))
        self._host_step = 0
        self._host_initted = False
        self.register_load_state_dict_post_hook(_read_counts_back)

    # --- the EMA copy ---------------------------------------------------------------------------

    def init_ema(self, ema_model: Module | None = None) -> None:
        """Make (or take) the EMA copy and the names of the tensors it keeps: the floating and
        complex parameters and buffers."""
        self.ema_model = ema_model if ema_model is not None else deepcopy(self.model)
        if self._dtype is not None:
            self.ema_model.to(self._dtype)
        for p in self.ema_model.parameters():
            p.detach_()
        for name in self.forward_method_names:
            setattr(self, name, getattr(self.ema_model, name))
        kept = (torch.is_floating_point, torch.is_complex)
        self.parameter_names = {n for n, p in self.ema_model.named_parameters() if any(k(p) for k in kept)}
        self.buffer_names = {n for n, b in self.ema_model.named_buffers() if any(k(b) for k in kept)}
        self._plans = {}

    @property
    def model(self) -> Module:
        return self.online_model if self.include_online_model else self.online_model[0]

    def eval(self):
        return self.ema_model.eval()

    @torch.no_grad()
    def forward_eval(self, *args, **kwargs):
        """The EMA model's output without gradients, in eval mode, leaving its mode as it was."""
        training = self.ema_model.training
        out = self.ema_model(*args, **kwargs)
        self.ema_model.train(training)
        return out

    def __call__(self, *args, **kwargs):
        return self.ema_model(*args, **kwargs)

    def restore_ema_model_device(self) -> None:
        self.ema_model.to(self.initted.device)

    def add_to_optimizer_post_step_hook(self, optimizer):
        """Update after every `optimizer.step()`; returns the hook's handle. (A wrapper whose own
        step runs no hooks, `swa_fast.optim.SWA`: on the optimizer it wraps.)"""
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer = hooked(optimizer, f"{_OWNER}.add_to_optimizer_post_step_hook")
        if not hasattr(optimizer, "register_step_post_hook"):
            raise ValueError(
                f"swa_fast.{_OWNER}: expected an optimizer with register_step_post_hook, "
                f"got {type(optimizer).__name__}"
            )
        return optimizer.register_step_post_hook(lambda *_: self.update())

    def get_params_iter(self, model: Module):
        for name, param in model.named_parameters():
            if name in self.parameter_names:
                yield name, param

    def get_buffers_iter(self, model: Module):
        for name, buffer in model.named_buffers():
            if name in self.buffer_names:
                yield name, buffer

    # --- the update -----------------------------------------------------------------------------

    def _plan(self, target: Module, source: Module, selective: bool) -> _Plan:
        """The calls that update `target` from `source`: with `selective`, those of
        update_moving_average (ignored names left, no-EMA names copied, the rest averaged), else
        those of the copy helpers (everything kept, copied). Worked out again only when a model's
        tensors changed."""
        slot = (id(target), id(source), selective)
        plan = self._plans.get(slot)
        if plan is not None and not plan.watch.changed():
            return plan
        lerp, copy = [], []
        for iterate in (self.get_params_iter, self.get_buffers_iter):
            for (name, src), (_, tgt) in zip(iterate(source), iterate(target)):
                if not selective:
                    copy.append((tgt, src))
                elif name in self.ignore_names or name.startswith(tuple(self.ignore_startswith_names)):
                    continue
                elif name in self.param_or_buffer_names_no_ema:
                    copy.append((tgt, src))
                else:
                    lerp.append((tgt, src))
        plans = [
            UpdatePlan(
                op,
                [[t for t, _ in pairs]],
                [s for _, s in pairs],
                owner=_OWNER,
                move_sources=self.allow_different_devices,
                move_option="allow_different_devices=True",
            )
            for op, pairs in (("lerp_", lerp), ("copy_", copy))
        ]
        plan = self._plans[slot] = _Plan(ModulesWatch(target, source), *plans)
        return plan

    @torch.no_grad()
    def copy_params_from_model_to_ema(self) -> None:
        copy = self._plan(self.ema_model, self.model, False).copy
        copy.run(copy.sources)

    @torch.no_grad()
    def copy_params_from_ema_to_model(self) -> None:
        copy = self._plan(self.model, self.ema_model, False).copy
        copy.run(copy.sources)

    def update_model_with_ema(self, decay: float | None = None) -> None:
        """Move the model to the EMA weights: a copy at decay 0, else keep `decay` of the model."""
        decay = self.update_model_with_ema_beta if decay is None else decay
        if decay == 0.0:
            self.copy_params_from_ema_to_model()
            return
        self.update_moving_average(self.model, self.ema_model, decay)

    def get_current_decay(self) -> float:
        """The decay of an update at the current step, in the original's float32 arithmetic (on a
        CPU scalar from the host count: no device is touched)."""
        epoch = (torch.tensor(self._host_step) - self.update_after_step - 1).clamp(min=0.0)
        if epoch.item() <= 0:  # a CPU scalar: reading it waits for nothing
            return 0.0
        value = 1 - (1 + epoch / self.inv_gamma) ** -self.power
        return value.clamp(min=self.min_value, max=self.beta).item()

    def update(self) -> None:
        """One training step: the first call copies the model; then, on steps divisible by
        `update_every`, a copy up to `update_after_step` and an average after it."""
        step = self._host_step
        self._host_step += 1
        self.step.add_(1)
        if not self._host_initted:
            if self.ema_model is None:
                self.init_ema()
            self.copy_params_from_model_to_ema()
            self._host_initted = True
            self.initted.fill_(True)
            return
        should_update = step % self.update_every == 0
        if should_update and step <= self.update_after_step:
            self.copy_params_from_model_to_ema()
            return
        if should_update:
            self.update_moving_average(self.ema_model, self.model)
        if self.update_model_with_ema_every is not None and step % self.update_model_with_ema_every == 0:
            self.update_model_with_ema()

    @torch.no_grad()
    def update_moving_average(
        self, ma_model: Module, current_model: Module, current_decay: float | None = None
    ) -> None:
        """ma_model's kept tensors move toward current_model's: weight 1 - decay (default: the
        current decay), one fused call per device; names without EMA are copied."""
        if self.is_frozen:
            return
        if self.move_ema_to_online_device:
            ma_device, current_device = _first_device(ma_model), _first_device(current_model)
            if ma_device != current_device:
                ma_model.to(current_device)
        decay = self.get_current_decay() if current_decay is None else current_decay
        weight = 1.0 - decay
        if not math.isfinite(weight):
            raise ValueError(f"swa_fast.{_OWNER}: expected a finite decay, got {decay!r}")
        plan = self._plan(ma_model, current_model, True)
        # Everything checked before anything is written: the copies' calls, then the average
        # (whose op checks every group first); the copies last.
        plan.copy.check(plan.copy.sources)
        plan.lerp.run(plan.lerp.sources, weight)
        plan.copy.run(plan.copy.sources)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_plans"] = {}  # tensor lists of this object's models, rebuilt on the next update
        return state


def _first_device(model: Module) -> torch.device:
    return next(model.parameters()).device


def _read_counts_back(module: EMA, _incompatible_keys) -> None:
    """After a state_dict was loaded (an original's or ours), the host counts follow its buffers."""
    module._host_step = int(module.step.item())
    module._host_initted = bool(module.initted.item())


def _inplace(op, target: Tensor, source: Tensor, *args, auto_move_device=False, coerce_dtype=False) -> Tensor:
    """The original's per-tensor `inplace_copy` / `inplace_lerp`, for code that calls them."""
    if auto_move_device:
        source = source.to(target.device)
    if coerce_dtype and source.dtype != target.dtype:
        source = source.to(target.dtype)
    return op(target, source, *args)
