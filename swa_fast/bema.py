"""BEMA (Block et al., "EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes", 2025, arXiv
2508.00180): an EMA of the weights plus a correction of its lag, from the weights at the start.

    bema = swa_fast.BEMA(model)                # the model now is theta_0 (update_after=0)
    ...
    bema.update(model)                         # one fused bema_ pass per (device, dtype) group
    with bema.average_applied(model):          # evaluate with the BEMA weights
        evaluate(model)

At step t (the update() calls so far, or the `step=` given):

    ema_t  = ema_{t-1} + beta_t * (theta_t - ema_{t-1})
    bema_t = ema_t + alpha_t * (theta_t - theta_0)

with beta_t and alpha_t from `weighting.bema_weights`. The EMA, the BEMA weights and theta_0 are
three flat copies of the model's tensors, and one update reads the model, the EMA and theta_0 once
and writes the EMA and the BEMA weights (`swa_fast.bema_`): TRL's `BEMACallback` makes seven torch
calls and three temporaries per parameter.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import Tensor
from torch.nn import Module

from .averaging import AT_LEAST_FLOAT32, Averager
from .model_tensors import ModelCopy
from .weighting import bema_weights, count, real_number

__all__ = ["BEMA"]


class _Snapshot:
    """The weight of the call that takes the starting weights (copies, not a bema_ pass): it
    travels through `Averager.apply` and the placements like any weight."""

    def __repr__(self) -> str:
        return "BEMA snapshot"


_SNAPSHOT = _Snapshot()
# What the readers can show: the BEMA weights (the default) or the plain EMA.
_SHOWN = ("bema", "ema")


def schedule_settings(
    owner: str, ema_power, bias_power, lag, multiplier, min_ema_multiplier
) -> tuple[float, float, float, float, float]:
    """BEMA's schedule settings checked, as floats (`owner`: who takes them, for the messages): the
    powers, lag and multiplier real numbers >= 0 with lag + multiplier > 0, min_ema_multiplier in
    [0, 1]."""
    checked = tuple(
        real_number(value, f"{owner}: {name}", 0.0)
        for name, value in (
            ("ema_power", ema_power),
            ("bias_power", bias_power),
            ("lag", lag),
            ("multiplier", multiplier),
        )
    )
    if not checked[2] + checked[3] > 0:
        raise ValueError(
            f"swa_fast.{owner}: expected lag + multiplier > 0 (the schedule's age at step 1), got lag "
            f"{lag!r} and multiplier {multiplier!r}"
        )
    return (*checked, real_number(min_ema_multiplier, f"{owner}: min_ema_multiplier", 0.0, 1.0))


class BEMA(Averager):
    """Bias-corrected EMA (BEMA, Block et al. 2025), as TRL's `BEMACallback` keeps it, updated by one
    fused `swa_fast.bema_` per flat group.

    Steps: the call to `update` is step t = `calls` (the manager's construction is step 0), or the
    `step` it is given (say the Trainer's `global_step`, which is what TRL uses). Step
    `update_after` takes theta_0 and the EMA from the model (with `update_after=0`, the model as the
    manager was made is theta_0, as TRL's callback takes it at the start of training); the steps
    `update_after + k * update_every` (k >= 1) update the EMA with weight beta_t and write the BEMA
    weights ema_t + alpha_t * (theta_t - theta_0); the other steps do nothing. Before its first
    update the BEMA copy holds the model as the manager was made (TRL's `running_model` likewise).

    The readers (`copy_to`, `swap`, `average_applied`) show the BEMA weights, or the plain EMA with
    `which="ema"`; `average` is the BEMA weights' flat buffer, `ema` and `start` the EMA's and
    theta_0's. `state_dict()` holds all three and the counts: a resumed run goes on bit for bit.

    Args:
        model: the model to average.
        ema_power: kappa, beta_t = (lag + multiplier * t) ** -kappa, a real number >= 0 (0: the EMA
            is the model).
        bias_power: eta, alpha_t = (lag + multiplier * t) ** -eta, a real number >= 0 (0: alpha is 1;
            a large one, say 8, turns the correction off).
        lag: rho, the schedule's offset (a virtual starting age), a real number >= 0.
        update_after: tau, the step that takes theta_0 (and starts the EMA); no update before.
        update_every: phi, the steps between two updates after `update_after`.
        multiplier: gamma, how fast the schedule's age grows per step, a real number >= 0
            (lag + multiplier must be > 0).
        min_ema_multiplier: the least beta_t, in [0, 1].
        dtype, use_buffers, rank0_only, device, side_stream, backend: as the `Averager`'s
            (check_finite and capturable are refused: a skipped update would still write the BEMA
            weights, and the schedule is decided on the host).
    """

    _OP = "bema_"
    _ADDS_COPIES = True

    def __init__(
        self,
        model: Module,
        *,
        ema_power: float = 0.5,
        bias_power: float = 0.2,
        lag: float = 10,
        update_after: int = 0,
        update_every: int = 1,
        multiplier: float = 1.0,
        min_ema_multiplier: float = 0.0,
        dtype: torch.dtype | str | None = AT_LEAST_FLOAT32,
        use_buffers: bool = False,
        check_finite: bool = False,
        rank0_only: bool = False,
        device: torch.device | str | None = None,
        side_stream: bool = False,
        backend: str | None = None,
        capturable: bool = False,
    ) -> None:
        settings = schedule_settings("BEMA", ema_power, bias_power, lag, multiplier, min_ema_multiplier)
        self.ema_power, self.bias_power, self.lag, self.multiplier, self.min_ema_multiplier = settings
        self.update_after = count(update_after, "BEMA: update_after", 0)
        self.update_every = count(update_every, "BEMA: update_every", 1)
        if check_finite:
            raise ValueError(
                "swa_fast.BEMA: check_finite is not supported (a skipped update would still write the "
                "BEMA weights); SWA and EMA have it"
            )
        super().__init__(
            model,
            dtype=dtype,
            use_buffers=use_buffers,
            rank0_only=rank0_only,
            device=device,
            side_stream=side_stream,
            backend=backend,
            capturable=capturable,  # (refused: the schedule is decided on the host)
        )
        # The BEMA weights are the Averager's own copy (what the readers and `average` show); the
        # EMA and theta_0 are laid out alike and share its integer buffers (copied, not averaged).
        self._ema = self._same_layout()
        self._start = self._same_layout()
        self.ema, self.start = self._ema.flat, self._start.flat
        self._plan = self._new_plan()  # bema_ over [ema, bema, start]
        self._step: int | None = None  # the step given to this update() call
        self._forced = False  # this call updates whatever the schedule says (TRL's _update_bema_weights)

    def _same_layout(self) -> ModelCopy:
        copy = ModelCopy(self.tracked, self._copy.stored(), backend=self.backend)
        copy.integers = self._copy.integers
        return copy

    # --- updates ------------------------------------------------------------------------------------

    def update(self, model: Module, step: int | None = None) -> None:
        """Update with the model's current weights at step `step` (an int >= 0; default: the calls
        to update() so far, this one included): a snapshot of theta_0 at `update_after`, a BEMA
        update on the steps `update_every` apart after it, nothing on the others."""
        if step is not None:
            step = count(step, "BEMA.update: step", 0)
        self._step = step
        try:
            super().update(model)
        finally:
            self._step = None

    def _update_at(self, model: Module, step: int) -> None:
        """A BEMA update with step `step`'s weights now, whatever the schedule says (TRL's
        `_update_bema_weights(step)`)."""
        self._forced = True
        try:
            self.update(model, step)
        finally:
            self._forced = False

    def weights_at(self, step: int) -> tuple[float, float]:
        """(beta_t, alpha_t) of step `step` (`weighting.bema_weights` with these settings)."""
        return bema_weights(
            step, self.ema_power, self.bias_power, self.lag, self.multiplier, self.min_ema_multiplier
        )

    def _update_weight(self) -> tuple[float, float] | _Snapshot | None:
        t = self._calls if self._step is None else self._step
        if self._forced:
            return self.weights_at(t)
        if t < self.update_after:
            return None
        if t == self.update_after:
            return _SNAPSHOT
        if (t - self.update_after) % self.update_every:
            return None
        return self.weights_at(t)

    def _plan_targets(self) -> list[list[Tensor]]:
        """bema_'s written lists [ema, bema] and its read list theta_0, laid out as the model's
        tensors (their integer positions hold the shared integer buffers, which the engine copies
        into the first list's)."""
        return [self._ema.stored(), self._copy.stored(), self._start.stored()]

    def _run_update(self, tensors: list[Tensor], weight, counted_on_device: Tensor | None) -> None:
        if weight is _SNAPSHOT:  # theta_0 and the EMA become the model (the BEMA weights stay)
            self._start.save(tensors)
            self._ema.save(tensors)
            return
        self._plan.run(tensors, weight, counted=counted_on_device)

    # --- reading ------------------------------------------------------------------------------------

    def _shown(self, which: str, what: str) -> ModelCopy:
        if which not in _SHOWN:
            raise ValueError(f"swa_fast.BEMA.{what}: which must be 'bema' or 'ema', got {which!r}")
        return self._copy if which == "bema" else self._ema

    def copy_to(self, model: Module, which: str = "bema") -> None:
        """Write the BEMA weights (`which="ema"`: the EMA) into the model (see Averager.copy_to)."""
        self._copy_to(model, self._shown(which, "copy_to"))

    def swap(self, model: Module, which: str = "bema") -> None:
        """Exchange the model's weights and the BEMA weights (or the EMA) (see Averager.swap)."""
        self._swap(model, self._shown(which, "swap"))

    def average_applied(self, model: Module, which: str = "bema") -> AbstractContextManager[Module]:
        """The BEMA weights (`which="ema"`: the EMA) in the model within the block, its own weights
        restored exactly after (see Averager.average_applied)."""
        return self._average_applied(model, self._shown(which, "average_applied"))

    # --- saving and resuming --------------------------------------------------------------------------

    _SETTINGS = ("ema_power", "bias_power", "lag", "multiplier", "min_ema_multiplier", "update_after")

    def _extra_state(self) -> dict:
        return {
            "ema": self._ema.named(),
            "start": self._start.named(),
            "bema": {name: getattr(self, name) for name in self._SETTINGS},
        }

    def _check_extra_state(self, state: dict) -> tuple[dict, dict]:
        mine = {name: getattr(self, name) for name in self._SETTINGS}
        if state.get("bema") != mine or "ema" not in state or "start" not in state:
            raise ValueError(
                f"swa_fast.BEMA.load_state_dict: expected a BEMA state_dict with the settings {mine} and "
                f"entries 'ema' and 'start', got settings {state.get('bema')} and keys {sorted(state)}"
            )
        for key in ("ema", "start"):
            self.tracked.local_state(state[key])  # every entry checked before anything is written
        return state["ema"], state["start"]

    def _load_extra_state(self, checked: tuple[dict, dict]) -> None:
        ema, start = checked
        self._ema.load_named(ema)
        self._start.load_named(start)
