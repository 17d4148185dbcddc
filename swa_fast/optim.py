"""Drop-in replacement for `torchcontrib.optim.SWA`: change the import, keep the code.

    from swa_fast.optim import SWA
    opt = SWA(torch.optim.SGD(model.parameters(), lr=0.1), swa_start=10, swa_freq=5, swa_lr=0.05)

Auto mode (both `swa_start` and `swa_freq` given) averages every `swa_freq` steps after
`swa_start`; manual mode leaves it to `update_swa()` / `update_swa_group(group)`. The averages of a
param group live in one flat buffer and are updated with one fused op; `opt.state[p]['swa_buffer']`
is that buffer's view of `p`, as in torchcontrib. A parameter added to a group later (a layer
unfrozen) starts its average at the group's next update, from zeros as in torchcontrib, and the
others keep theirs. Unlike torchcontrib's (keyed by `id()`), the state_dict restores the averages
after a restart.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor
from torch.nn import Module

from . import ops
from .bn import update_bn
from .engine import UpdatePlan
from .flat import FlatBuffer, write_through_strides
from .weighting import count, swa_weight


@dataclass
class _GroupAverages:
    """A param group's averages: `flat.views[i]` is the average of `params[i]`, updated through
    `plan`. `params` is the group's list as it was then and `listed` the list object itself, which
    an append (say, an unfrozen layer) changes in place."""

    listed: list
    params: list[Tensor]
    flat: FlatBuffer
    plan: UpdatePlan

    def current(self, group: dict) -> bool:
        """Whether the group still holds these parameters: two checks per group, for the update path."""
        return group["params"] is self.listed and len(self.listed) == len(self.params)


class SWA(torch.optim.Optimizer):
    """Stochastic Weight Averaging as an optimizer wrapper (Izmailov et al., UAI 2018).

    Args:
        optimizer: the optimizer to wrap; it keeps the param groups and does the steps.
        swa_start: auto mode: the step count after which averaging starts.
        swa_freq: auto mode: average every `swa_freq` steps after `swa_start`.
        swa_lr: auto mode: the learning rate from `swa_start` on (None: the optimizer's own).
    Without both `swa_start` and `swa_freq` (manual mode) averaging is left to `update_swa()`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        swa_start: int | None = None,
        swa_freq: int | None = None,
        swa_lr: float | None = None,
    ) -> None:
        # Optimizer.__init__ is not called: the wrapped optimizer owns the param groups.
        given = [swa_start is not None, swa_freq is not None]
        if any(given) and not all(given):
            warnings.warn("Some of swa_start, swa_freq is None, ignoring other", stacklevel=2)
        self._auto_mode = all(given)
        if self._auto_mode:  # (torchcontrib casts 12.34 to 12 with a warning: refused here)
            swa_start = count(swa_start, "optim.SWA: swa_start", 0)
            swa_freq = count(swa_freq, "optim.SWA: swa_freq", 1)
        else:
            if swa_lr is not None:
                warnings.warn("Some of swa_start, swa_freq is None, ignoring swa_lr", stacklevel=2)
            swa_start = swa_freq = swa_lr = None
        if swa_lr is not None and swa_lr < 0:
            raise ValueError(f"Invalid SWA learning rate: {swa_lr}")
        self.swa_start, self.swa_freq, self.swa_lr = swa_start, swa_freq, swa_lr
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state: defaultdict = defaultdict(dict)
        self.opt_state = optimizer.state
        self._flat: dict[int, _GroupAverages] = {}  # id(param group) -> its averages
        for group in self.param_groups:
            group["n_avg"] = 0
            group["step_counter"] = 0

    def _averages(self, group: dict) -> _GroupAverages:
        """The group's averages, rebuilt when its parameters changed: each parameter keeps its own
        average (torchcontrib keys them per parameter), and one new to the group starts from zeros,
        as torchcontrib's does, so its first update gives it p / (n_avg + 1)."""
        kept = self._flat.get(id(group))
        if kept is not None and kept.current(group):
            return kept
        params = list(group["params"])
        starts = [self._average_of(p) for p in params]
        flat = FlatBuffer([p.new_zeros(p.shape) if a is None else a for p, a in zip(params, starts)])
        for p, view in zip(params, flat.views):
            self.state[p]["swa_buffer"] = view
        names = [f"parameter {i} of its param group" for i in range(len(params))]  # (for errors)
        plan = UpdatePlan("lerp_", [flat.views], params, owner="optim.SWA", names=names, keep_sources=False)
        kept = self._flat[id(group)] = _GroupAverages(group["params"], params, flat, plan)
        return kept

    def _average_of(self, p: Tensor) -> Tensor | None:
        """`p`'s average, if it has one (self.state is a defaultdict: a lookup would add `p`)."""
        return self.state[p].get("swa_buffer") if p in self.state else None

    @torch.no_grad()
    def update_swa_group(self, group: dict) -> None:
        """Update the group's averages with its current parameters: avg += (p - avg) / (n_avg + 1)."""
        averages = self._averages(group)
        weight = swa_weight(group["n_avg"])  # a host number: the first update is an exact copy
        averages.plan.run(group["params"], weight)  # every dtype checked before any is written
        group["n_avg"] += 1

    def update_swa(self) -> None:
        for group in self.param_groups:
            self.update_swa_group(group)

    @torch.no_grad()
    def swap_swa_sgd(self) -> None:
        """Exchange the parameters and their averages (call twice to go back)."""
        for group in self.param_groups:
            kept = self._flat.get(id(group))
            if kept is not None and kept.current(group):
                for _, views, params in kept.flat.pairs(kept.params):
                    write_through_strides(params, partial(ops.swap_, b=views), keep_values=True)
                continue
            # A parameter was added since the group's last update: one at a time, as torchcontrib.
            for p in group["params"]:
                average = self._average_of(p)
                if average is None:
                    warnings.warn(f"SWA wasn't applied to param {p}; skipping it", stacklevel=2)
                    continue
                live = p.detach().clone()
                p.detach().copy_(average)
                average.copy_(live)

    def step(self, closure: Callable | None = None):
        if self.swa_lr is not None:
            for group in self.param_groups:
                if group["step_counter"] >= self.swa_start:
                    group["lr"] = self.swa_lr
        loss = self.optimizer.step(closure)
        for group in self.param_groups:
            group["step_counter"] += 1
            steps = group["step_counter"]
            if self._auto_mode and steps > self.swa_start and steps % self.swa_freq == 0:
                self.update_swa_group(group)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        param_group["n_avg"] = 0
        param_group["step_counter"] = 0
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        """torchcontrib's layout, with the averages keyed by parameter position, so they reload."""
        opt = self.optimizer.state_dict()
        position = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        swa_state = {position[id(p)]: dict(s) for p, s in self.state.items() if id(p) in position}
        return {"opt_state": opt["state"], "swa_state": swa_state, "param_groups": opt["param_groups"]}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        for i, s in state_dict["swa_state"].items():
            if not 0 <= int(i) < len(params):
                raise ValueError(
                    f"swa_fast.optim.SWA: the state_dict has averages for parameter {i}, "
                    f"this optimizer has {len(params)} parameters"
                )
            buffer = s.get("swa_buffer")
            if buffer is not None and buffer.shape != params[int(i)].shape:
                raise ValueError(
                    f"swa_fast.optim.SWA: parameter {i} has shape {list(params[int(i)].shape)}, "
                    f"its saved average {list(buffer.shape)}"
                )
        self.optimizer.load_state_dict(
            {"state": state_dict["opt_state"], "param_groups": state_dict["param_groups"]}
        )
        self.param_groups = self.optimizer.param_groups  # load_state_dict made new group dicts
        self.opt_state = self.optimizer.state
        self.state = defaultdict(dict)
        self._flat = {}
        params = [p for g in self.param_groups for p in g["params"]]
        for i, s in state_dict["swa_state"].items():
            if "swa_buffer" in s:
                p = params[int(i)]
                self.state[p]["swa_buffer"] = s["swa_buffer"].to(p.device, p.dtype, copy=True)
        for group in self.param_groups:
            # Into one flat buffer now where every parameter has its average; the others, with a
            # parameter added since, at their next update (as when it was added).
            if group["params"] and all(self._average_of(p) is not None for p in group["params"]):
                self._averages(group)

    @staticmethod
    def bn_update(loader, model: Module, device=None) -> None:
        """torchcontrib's name for update_bn."""
        update_bn(loader, model, device)
