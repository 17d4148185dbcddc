"""What an averaging pass sees: the optional last argument `stats` of lerp_, moments_ and
multi_lerp_, the one definition every backend follows (the reference and foreach backends record
through this module; the C++, CUDA and Triton kernels count in registers in the same pass and add
their counts to the tensor at the end of each block).

`stats` is an int64 tensor of shape [W, 4] on the lists' device, contiguous, one row per written
list of the call (lerp_: avg; moments_: mean, then sq; multi_lerp_: each average of the call, in
order). For every element the pass writes (weight 0 writes nothing, so it adds nothing), the op adds
to its written list's row:

    [0] written      += 1
    [1] unchanged    += 1 where the stored value after the write is the one before: the same bits,
                        or NaN before and after (a NaN's payload is each backend's conversion's;
                        the Triton kernels compare the bits alone, so there a NaN kept NaN with
                        another payload counts as changed)
    [2] non_finite   += 1 where the stored value after the write is inf or NaN
    [3] max_update    = max(itself, the fp32 bits of |value - old|)

`value` is the op's result in its accumulation dtype (fp32, fp64 for fp64 averages) before its
rounding into the average, `old` the average's stored value before the write in that dtype; an fp64
difference is rounded to fp32 (to nearest) first. A NaN difference is left out of the maximum (the
non-finite count says it). Non-negative fp32 values order as their bits do, so the kernels keep the
maximum as an integer (an atomic max). Columns 0-2 are added and column 3 is maxed into what the
tensor holds: the caller zeroes it (a manager, before each update), so that one update's several
calls (dtype groups, devices, passes of multi_lerp_) add up. Nothing is read back to the host by the
op: the counts stay on the device until someone asks.

A stored value that did not change where the update was not zero is what a stalled low-precision
average looks like (docs/low-precision.md): `unchanged == written` with `max_update > 0`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FIELDS = ("written", "unchanged", "non_finite", "max_update")
_NAN_BITS = 0x7F800000  # fp32 bits above this are NaN


def stats_tensor(written_lists: int, device: torch.device | str = "cpu") -> Tensor:
    """A zeroed `stats` argument for a call that writes `written_lists` lists."""
    return torch.zeros(written_lists, len(FIELDS), dtype=torch.int64, device=device)


def check_stats(op: str, stats, written_lists: int, device: torch.device | None) -> None:
    """An op's `stats` argument: None, or a contiguous int64 tensor of shape [written_lists, 4] on the
    lists' `device` (None: a call with no tensors, any device); the C++ check's messages."""
    if stats is None:
        return
    if not isinstance(stats, Tensor):
        raise ValueError(
            f"swa_fast.{op}: `stats` must be None or an int64 tensor of shape [{written_lists}, 4] (written, "
            f"unchanged, non-finite, max |update|, per written list), got {type(stats).__name__}"
        )
    if stats.dtype != torch.int64 or (device is not None and stats.device != device):
        where = device if device is not None else "the lists' device"
        raise ValueError(
            f"swa_fast.{op}: `stats` must be an int64 tensor on {where}, got {stats.dtype} on {stats.device}"
        )
    if list(stats.shape) != [written_lists, len(FIELDS)] or not stats.is_contiguous():
        raise ValueError(
            f"swa_fast.{op}: `stats` must be a contiguous tensor of shape [{written_lists}, 4] (one row per "
            f"written list), got shape {list(stats.shape)}"
            + ("" if stats.is_contiguous() else " (not contiguous)")
        )


@torch.no_grad()
def record(row: Tensor, old: Tensor, value: Tensor, stored: Tensor, counted: Tensor | None = None) -> None:
    """Adds one written tensor to `row` (a [4] view of `stats`): `old` its stored value before the
    write (a copy, its dtype), `value` the result in the accumulation dtype before rounding,
    `stored` the tensor after the write. `counted`: None, or a boolean tensor that says whether the
    write happened (a device weight not 0), so that nothing is read back to decide it."""
    if stored.numel() == 0:
        return
    diff = (value - old.to(value.dtype)).abs().to(torch.float32)
    bits = diff.view(torch.int32).to(torch.int64)
    seen = torch.stack(
        [
            torch.tensor(stored.numel(), device=stored.device),
            ((_bits(stored) == _bits(old)) | (stored.isnan() & old.isnan())).sum(),
            (~torch.isfinite(stored)).sum(),
            torch.where(bits > _NAN_BITS, 0, bits).max(),
        ]
    ).to(row.device)
    if counted is not None:
        seen = seen * counted.to(device=row.device, dtype=torch.int64)
    row[:3] += seen[:3]
    row[3] = torch.maximum(row[3], seen[3])


def _bits(t: Tensor) -> Tensor:
    """t's stored bits as integers of its width."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


@dataclass(frozen=True)
class ListStats:
    """One written list's row of `stats`, read on the host."""

    written: int
    unchanged: int
    non_finite: int
    max_update: float

    @property
    def stalled(self) -> bool:
        """Whether the update moved nothing although it was not zero: every written element kept
        its stored value."""
        return self.written > 0 and self.unchanged == self.written and self.max_update > 0


def read_stats(stats: Tensor) -> list[ListStats]:
    """Each row of a `stats` tensor (one host read of the whole tensor)."""
    rows = stats.cpu()
    largest = rows[:, 3].to(torch.int32).view(torch.float32).tolist()
    return [ListStats(int(r[0]), int(r[1]), int(r[2]), m) for r, m in zip(rows.tolist(), largest)]
