"""UpdateCounts: how many updates an average holds, kept where no update has to wait for it."""

from __future__ import annotations

import torch
from torch import Tensor


def numpy_view(t: Tensor):
    """A numpy view of a plain 0-dim integer (or bool) CPU tensor's memory, else None: reading it
    and writing it skip the dispatch of the tensor's own methods. The view keeps that memory
    alive, so while `t.data_ptr()` is the one the view was made at, it is still `t`'s memory (a
    `.data = ...` moves it)."""
    plain = type(t) is Tensor and not t.dim() and t.is_cpu and not t.requires_grad
    if not plain or t.is_floating_point() or t.is_complex():
        return None
    try:
        return t.numpy()
    except (TypeError, RuntimeError):  # a dtype numpy does not hold
        return None


def counted(finite: Tensor | None, due: Tensor | None) -> Tensor | None:
    """Whether an update counts, when the device decides: averaged without inf/NaN (`finite`) and
    on the schedule (`due`, a capturable EMA's `update_every`); None where neither was asked."""
    return finite if due is None else due if finite is None else finite & due


class UpdateCounts:
    """`n_averaged` (updates in the average) and `n_skipped` (non-finite updates left out), as 0-dim
    long tensors on the average's device.

    When every update counts (`device_decides=False`), the host keeps the count and writes it to
    the device tensor only when `n_averaged` is read, so that an update launches nothing but its
    fused op. When the device decides which updates count (a manager's `check_finite`), the count
    lives there and the host never reads it.
    """

    def __init__(self, device: torch.device, device_decides: bool) -> None:
        self._n_averaged = torch.zeros((), dtype=torch.long, device=device)
        self.n_skipped = torch.zeros((), dtype=torch.long, device=device)
        self.host: int | None = None if device_decides else 0  # None: only the device knows
        self._written = 0  # the host count last written to the device tensor

    @property
    def n_averaged(self) -> Tensor:
        if self.host is not None and self._written != self.host:
            self._n_averaged.fill_(self.host)
            self._written = self.host
        return self._n_averaged

    def current(self) -> Tensor | int:
        """The count to compute a weight from without a host sync: the host's, else the device's."""
        return self._n_averaged if self.host is None else self.host

    def add(self, finite: Tensor | None = None, due: Tensor | None = None) -> None:
        """Count one update. When the device decides: `finite` (a device boolean) says whether it
        was averaged or skipped for inf/NaN, and `due` whether the call was one that averages at
        all (a capturable EMA's schedule); None: it was."""
        if self.host is not None:
            self.host += 1
            return
        averaged = counted(finite, due)
        self._n_averaged += 1 if averaged is None else averaged
        if finite is not None:
            self.n_skipped += ~finite if due is None else ~finite & due

    def set(self, n_averaged: Tensor | int, n_skipped: Tensor | int = 0) -> None:
        """Overwrite both counts (a loaded state, or averages built elsewhere)."""
        self._n_averaged.copy_(torch.as_tensor(n_averaged))
        self.n_skipped.copy_(torch.as_tensor(n_skipped))
        if self.host is not None:
            self.host = self._written = int(self._n_averaged)  # read once here


def all_finite(groups: list[list[Tensor]], device: torch.device) -> Tensor:
    """One boolean on `device`: every element of the groups' tensors (each group on one device,
    none of them empty: torch's max-abs norm has no value for those) is finite (max-abs norms
    propagate inf and NaN, and cannot overflow), worked out without a host sync (`check_finite`)."""
    with torch.no_grad():  # the model's parameters require grad: record no graph
        maxima = [
            n.to(device, torch.float32)
            for src in groups
            if src
            for n in torch._foreach_norm(src, float("inf"))
        ]
        if not maxima:  # nothing to average: every update counts
            return torch.ones((), dtype=torch.bool, device=device)
        return torch.stack(maxima).isfinite().all()


class CountedCalls:
    """A manager's calls and updates, on the host or (capturable) on the device, and its
    `UpdateCounts` as properties: a part of `averaging.Averager` (a mixin), which sets `_calls`,
    `_updates`, `_device_calls` and `counts`."""

    @property
    def capturable(self) -> bool:
        return self._device_calls is not None

    @property
    def calls(self) -> int:
        """`update` calls so far (read from the device when capturable)."""
        return self._calls if self._device_calls is None else int(self._device_calls)

    @calls.setter
    def calls(self, value: int) -> None:
        self._calls = value
        if self._device_calls is not None:
            self._device_calls.fill_(value)

    @property
    def updates(self) -> int:
        """Updates applied to the average so far (EMA's `update_every` leaves calls out)."""
        if self._device_calls is None:
            return self._updates
        return int(self.counts.n_averaged + self.counts.n_skipped)

    @updates.setter
    def updates(self, value: int) -> None:
        self._updates = value

    @property
    def n_averaged(self) -> Tensor:
        """The number of updates in the average: a 0-dim tensor on the average's device (written
        from the host's count when read: read it here each time rather than keeping it)."""
        return self.counts.n_averaged

    @property
    def n_skipped(self) -> Tensor:
        """Updates left out for holding inf or NaN (`check_finite`): a 0-dim device tensor."""
        return self.counts.n_skipped

    def _count_call(self) -> None:
        if self._device_calls is None:
            self._calls += 1
        else:  # capturable: in place on the device, so a replayed graph counts too
            self._device_calls.add_(1)
