"""A manager's `stats=True`: what each update's fused pass saw (ops/pass_stats.py), kept on the
device, read only when asked (`last_stats()`), and the one-time warning for an average that did not
move at all over an update (a bf16 EMA of decay 0.9999 rounded to nearest: docs/low-precision.md).

The op adds its counts to a small int64 tensor per device; the manager zeroes it before each update.
Nothing waits for the device: a CUDA update's counts are copied to pinned host memory behind it and
looked at by a later update once they have arrived (a CPU update's at once, being host memory).
"""

from __future__ import annotations

import numbers
import os
import sys
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from .ops import OP_TABLE
from .ops.pass_stats import ListStats, read_stats, stats_tensor


class ManagerStats:
    """The counts of one manager's updates: `rows` names its op's written lists (SWA's average,
    SWAG's mean and second moment, PostHocEMA's profiles)."""

    def __init__(self, enabled: bool, owner: str, op: str, rows: Sequence[str], warns: bool = True) -> None:
        if not isinstance(enabled, bool):
            raise ValueError(f"swa_fast.{owner}: stats must be True or False, got {enabled!r}")
        if enabled and not OP_TABLE[op].rounds:
            raise ValueError(f"swa_fast.{owner}: stats=True is not available for this manager")
        self.enabled, self.owner, self.rows = enabled, owner, tuple(rows)
        self._tensors: dict[torch.device, Tensor] = {}
        self._copies: dict[torch.device, tuple[Tensor, torch.cuda.Event]] = {}  # a GPU's, pinned
        self._warned = not warns  # (stochastic rounding moves an average in expectation: no warning)
        self._seen = False  # whether an update has filled the tensors
        self._copying: tuple[bool, ...] = ()  # per row, whether the last update was a copy (weight 1)

    def note_weight(self, weight) -> None:
        """The coming update's weight, as the manager worked it out on the host (a number, or
        PostHocEMA's one per profile): a row whose weight is 1 is a copy, whose rounding back to the
        stored value is no stall."""
        if not self.enabled:
            return
        weights = list(weight) if isinstance(weight, (list, tuple)) else [weight] * len(self.rows)
        self._copying = tuple(isinstance(w, numbers.Real) and w == 1 for w in weights)

    def for_update(self, plan) -> dict[torch.device, Tensor] | None:
        """The op's `stats` of each device the engine's `plan` updates on, zeroed (None without
        stats=True: then nothing is asked of the plan, on the update's hot path)."""
        if not self.enabled:
            return None
        for device in plan.fused_devices:
            if device not in self._tensors:
                self._tensors[device] = stats_tensor(len(self.rows), device)
            self._tensors[device].zero_()
        self._seen = True
        return self._tensors

    def after_update(self) -> None:
        """Look for a stalled average without waiting: the counts of host memory now; a GPU's
        from their copy to pinned memory behind an earlier update, once it has arrived (one copy
        in flight per device, into one buffer)."""
        if not self.enabled or self._warned or torch.compiler.is_compiling():
            return
        for device, counts in self._tensors.items():
            if device.type == "cpu":
                self._warn_if_stalled(read_stats(counts), self._copying)
                continue
            host, arrived, copying = self._copies.get(device, (None, None, ()))
            if arrived is not None:
                if not arrived.query():
                    continue  # still on its way: looked at by a later update
                self._warn_if_stalled(read_stats(host), copying)
            else:
                host, arrived = (
                    torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True),
                    torch.cuda.Event(),
                )
            host.copy_(counts, non_blocking=True)
            arrived.record()
            self._copies[device] = (host, arrived, self._copying)

    def _warn_if_stalled(self, rows: list[ListStats], copying: Sequence[bool]) -> None:
        if self._warned:
            return
        stalled = [name for name, row, copy in zip(self.rows, rows, copying) if row.stalled and not copy]
        if stalled:
            self._warned = True
            warnings.warn(
                f"swa_fast.{self.owner}: an update did not change the stored value of any element of "
                f"{', '.join(stalled)} although it was not zero: the average is stalled, its updates "
                "smaller than half a step of its dtype (a bf16 or fp16 average of a long EMA rounded to "
                "nearest). Keep it in float32 or pass rounding='stochastic' (docs/low-precision.md). "
                "(Said once.)",
                RuntimeWarning,
                stacklevel=_user_frame(),
            )

    def last(self) -> dict[str, ListStats]:
        """What the last update saw, per written list, summed over devices (one host read)."""
        if not self.enabled:
            raise ValueError(f"swa_fast.{self.owner}: last_stats() needs stats=True")
        totals = [ListStats(0, 0, 0, 0.0) for _ in self.rows]
        for counts in self._tensors.values() if self._seen else ():
            totals = [
                ListStats(
                    a.written + b.written,
                    a.unchanged + b.unchanged,
                    a.non_finite + b.non_finite,
                    max(a.max_update, b.max_update),
                )
                for a, b in zip(totals, read_stats(counts))
            ]
        self._warn_if_stalled(totals, self._copying)
        return dict(zip(self.rows, totals))


def _user_frame() -> int:
    """The stacklevel of the first caller outside swa_fast (`update`, `last_stats`, reached from
    several depths), so that the warning names the user's line."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level
