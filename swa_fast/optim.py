"""Drop-in replacement for `torchcontrib.optim.SWA`: change the import, keep the code.

    from swa_fast.optim import SWA
    opt = SWA(torch.optim.SGD(model.parameters(), lr=0.1), swa_start=10, swa_freq=5, swa_lr=0.05)

Auto mode (both `swa_start` and `swa_freq` given) averages every `swa_freq` steps after
`swa_start`; manual mode leaves it to `update_swa()` / `update_swa_group(group)`. The averages of a
param group live in one flat buffer and are updated with one fused op; `opt.state[p]['swa_buffer']`
is that buffer's view of `p`, as in torchcontrib. Unlike torchcontrib's (keyed by `id()`), the
state_dict restores the averages after a restart.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.nn import Module

from . import ops
from .bn import update_bn
from .flat import FlatBuffer
from .weighting import swa_weight


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
        if self._auto_mode:
            if int(swa_start) != swa_start or int(swa_freq) != swa_freq:
                warnings.warn("Casting swa_start, swa_freq to int", stacklevel=2)
            swa_start, swa_freq = int(swa_start), int(swa_freq)
            if swa_start < 0:
                raise ValueError(f"Invalid swa_start: {swa_start}")
            if swa_freq < 1:
                raise ValueError(f"Invalid swa_freq: {swa_freq}")
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
        self._flat: dict[int, FlatBuffer] = {}  # id(param group) -> its averages
        for group in self.param_groups:
            group["n_avg"] = 0
            group["step_counter"] = 0

    def _averages(self, group: dict) -> FlatBuffer:
        flat = self._flat.get(id(group))
        if flat is None or len(flat) != len(group["params"]):
            flat = self._flat[id(group)] = FlatBuffer(group["params"])
            for p, view in zip(group["params"], flat.views):
                self.state[p]["swa_buffer"] = view
        return flat

    @torch.no_grad()
    def update_swa_group(self, group: dict) -> None:
        """Update the group's averages with its current parameters: avg += (p - avg) / (n_avg + 1)."""
        flat = self._averages(group)
        weight = swa_weight(group["n_avg"])  # a host number: the first update is an exact copy
        for _, views, params in flat.pairs(group["params"]):
            ops.lerp_(views, params, weight)
        group["n_avg"] += 1

    def update_swa(self) -> None:
        for group in self.param_groups:
            self.update_swa_group(group)

    @torch.no_grad()
    def swap_swa_sgd(self) -> None:
        """Exchange the parameters and their averages (call twice to go back)."""
        for group in self.param_groups:
            if id(group) not in self._flat:
                for p in group["params"]:
                    warnings.warn(f"SWA wasn't applied to param {p}; skipping it", stacklevel=2)
                continue
            flat = self._flat[id(group)]
            for _, views, params in flat.pairs(group["params"]):
                ops.swap_(params, views)

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
        saved = {int(i): s for i, s in state_dict["swa_state"].items()}
        start = 0
        for group in self.param_groups:
            positions = range(start, start + len(group["params"]))
            start += len(group["params"])
            if all("swa_buffer" in saved.get(i, {}) for i in positions) and len(positions):
                flat = self._averages(group)
                for view, i in zip(flat.views, positions):
                    view.copy_(saved[i]["swa_buffer"])

    @staticmethod
    def bn_update(loader, model: Module, device=None) -> None:
        """torchcontrib's name for update_bn."""
        update_bn(loader, model, device)
