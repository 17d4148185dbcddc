"""Learning-rate schedules for weight averaging.

`SWALR` (anneal to a constant rate for SWA) is torch's own, re-exported. `FGECyclicLR` is the
cyclic schedule of Fast Geometric Ensembling (Garipov et al., "Loss Surfaces, Mode Connectivity,
and Fast Ensembling of DNNs", 2018, eq. 2): stepped once per iteration, over a cycle of `c`
iterations the rate goes from `lr_max` down to `lr_min` at mid-cycle and back,

    t(i) = ((i - 1) mod c + 1) / c
    lr(i) = (1 - 2 t) lr_max + 2 t lr_min          for t <= 1/2
    lr(i) = (2 - 2 t) lr_min + (2 t - 1) lr_max    for t >  1/2

for the i-th iteration (from 1), and FGE takes a snapshot at each minimum, t = 1/2. The cosine
variant, lr = lr_min + (lr_max - lr_min) (1 + cos 2 pi t) / 2, has the same ends and minima.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import SWALR

from .weighting import count

__all__ = ["SWALR", "FGECyclicLR"]


class FGECyclicLR(LRScheduler):
    """FGE's cyclic learning rate, one `step()` per iteration (see the module docstring).

    Args:
        optimizer: the optimizer whose rate it sets.
        lr_max, lr_min: the rate at the ends and at the middle of each cycle (0 <= lr_min <= lr_max).
        cycle_length: c, in iterations; even, so that one iteration of each cycle sits exactly at
            the minimum (Garipov et al. use 2 to 4 epochs' worth of iterations).
        shape: "linear" (the paper's) or "cosine".
        last_epoch: as torch's schedulers (-1: start a new schedule).

    `at_minimum()` says whether the iteration the optimizer is taking now uses the minimum rate:
    `swa_fast.FGE(..., scheduler=this)` snapshots then. The state (`state_dict`,
    `load_state_dict`) is the scheduler's position, so a resumed run continues the same cycle.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_max: float,
        lr_min: float,
        cycle_length: int,
        shape: str = "linear",
        last_epoch: int = -1,
    ) -> None:
        cycle_length = count(cycle_length, "FGECyclicLR: cycle_length", 0)
        if cycle_length < 2 or cycle_length % 2:
            raise ValueError(
                f"FGECyclicLR: cycle_length must be an even number of iterations >= 2 (so that one "
                f"iteration sits at the minimum), got {cycle_length}"
            )
        if shape not in ("linear", "cosine"):
            raise ValueError(f"FGECyclicLR: shape must be 'linear' or 'cosine', got {shape!r}")
        if not 0 <= lr_min <= lr_max:
            raise ValueError(f"FGECyclicLR: expected 0 <= lr_min <= lr_max, got {lr_min} and {lr_max}")
        self.lr_max = lr_max
        self.lr_min = lr_min
        self.cycle_length = cycle_length
        self.shape = shape
        super().__init__(optimizer, last_epoch)

    def cycle_position(self, iteration: int) -> float:
        """t(i) in (0, 1] for the `iteration`-th iteration (from 1)."""
        return ((iteration - 1) % self.cycle_length + 1) / self.cycle_length

    def lr_at(self, iteration: int) -> float:
        """The rate of the `iteration`-th iteration (from 1)."""
        t = self.cycle_position(iteration)
        if self.shape == "cosine":
            return self.lr_min + (self.lr_max - self.lr_min) * (1 + math.cos(2 * math.pi * t)) / 2
        if t <= 0.5:
            return (1 - 2 * t) * self.lr_max + 2 * t * self.lr_min
        return (2 - 2 * t) * self.lr_min + (2 * t - 1) * self.lr_max

    @property
    def iteration(self) -> int:
        """The iteration (from 1) that the current rate is for: `step()` has been called
        `iteration - 1` times since construction."""
        return self.last_epoch + 1

    def at_minimum(self) -> bool:
        """True while the optimizer steps with the minimum rate of a cycle (t = 1/2)."""
        return 2 * ((self.iteration - 1) % self.cycle_length + 1) == self.cycle_length

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.iteration)] * len(self.optimizer.param_groups)
