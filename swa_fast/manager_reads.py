"""Reading a manager's average: into the model, exchanged with it, or applied for a block.

`AverageReads` is a part of `averaging.Averager` (a mixin of its methods, one purpose per file);
it reads the manager's `tracked`, `_copy`, `average`, `_placement`, `use_buffers` and `backend`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager

import torch
from torch.nn import Module

from . import ops
from .flat import FlatBuffer, write_through_strides
from .model_tensors import ModelCopy, TrackedModel
from .placement import OtherDevice


class AverageReads:
    """The readers of an `Averager`'s average; each first waits for the updates in flight. A manager
    of several averages (PostHocEMA's profiles, BEMA's EMA beside its weights) reads the one asked
    for through the same code: `_copy_to`, `_swap`, `_average_applied` take the copy to read."""

    def copy_to(self, model: Module) -> None:
        """Write the average into the model (cast to the model's dtypes), one fused copy per group."""
        self._copy_to(model, self._copy)

    def _copy_to(self, model: Module, copy: ModelCopy) -> None:
        self._ready("copy_to")
        copy.load(self.tracked.targets(model))

    def swap(self, model: Module) -> None:
        """Exchange the model's weights and the average in place (same dtypes only: an fp32 average
        of a bf16 model cannot hold the live weights exactly; use `average_applied`)."""
        self._swap(model, self._copy)

    @torch.no_grad()
    def _swap(self, model: Module, copy: ModelCopy) -> None:
        self._ready("swap")
        if isinstance(self._placement, OtherDevice):
            raise ValueError(
                "swa_fast: swap exchanges the weights in place, so it needs the average on the model's "
                "device; this one is kept on another (device=). Use average_applied(model) instead."
            )
        floating = self.tracked.split(self.tracked.targets(model))[0]
        copy.flat.check_shapes(floating)  # every group, before any is written
        self._check_swappable(copy.flat, floating)
        self.tracked.before_write()
        for _, avg, live in copy.flat.pairs(floating):
            swap = functools.partial(ops.swap_, avg, backend=self.backend)
            write_through_strides(live, swap, keep_values=True)
        self.tracked.after_write()

    def _check_swappable(self, average: FlatBuffer, floating: list) -> None:
        """Raise, saying what to do instead, unless every tensor has its average's dtype (a swap
        exchanges the values in place: an fp32 average of a bf16 model cannot take the model's)."""
        for group, _, live in average.pairs(floating):
            for i, t in zip(group.indices, live):
                if t.dtype != group.dtype:
                    name = self.tracked.floating_names[i]
                    raise ValueError(
                        f"swa_fast.{type(self).__name__}.swap: the average is {group.dtype} but '{name}' is "
                        f"{t.dtype}; swap exchanges them in place, so each must be kept in its own dtype. "
                        "Use average_applied(model) (the average within a block, the weights restored "
                        "exactly after) or copy_to(model), or make the manager with dtype=None"
                    )

    def average_applied(self, model: Module) -> AbstractContextManager[Module]:
        """Within the block the model holds the average; on exit it is exactly as it was, buffers
        included (also those the average leaves alone, which `update_bn` in the block changes)."""
        return self._average_applied(model, self._copy)

    @contextlib.contextmanager
    def _average_applied(self, model: Module, copy: ModelCopy) -> Iterator[Module]:
        self._ready("average_applied")
        self.tracked.tensors(model)  # the model this average is of (or one like it), else raise
        # Everything the block may change, in the model's own dtypes: the restore is exact.
        everything = self.tracked if self.use_buffers else TrackedModel(model, True, self.tracked.owner)
        tensors = everything.targets(model)
        live = ModelCopy(everything, tensors, backend=self.backend)
        self._copy_to(model, copy)
        try:
            yield model
        finally:
            live.load(tensors)

    def _ready(self, what: str) -> None:
        """Before reading the average: it must be here, and an update in flight must be in it."""
        if not self.holds_average:
            raise ValueError(
                f"swa_fast.{type(self).__name__}.{what}: with rank0_only=True the average lives on rank 0 "
                "only, and this process is another rank; call it on rank 0"
            )
        self.wait()
