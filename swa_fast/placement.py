"""Where a manager's average lives relative to the model, and so when an update's arithmetic runs.

    SameDevice   beside the model: the update runs at once, on the current stream
    SideStream   beside a GPU model, updated on a CUDA stream of its own, overlapping what follows
    OtherDevice  on another device (pinned host memory for a GPU model): each update starts an
                 asynchronous copy of the weights there and returns; the copy is applied at the
                 next update or read

A placement calls back into its manager (`Averager`) for the update itself; `wait()` makes what
follows see every update made so far.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn import Module

from .model_tensors import ModelCopy, TrackedModel

if TYPE_CHECKING:
    from .averaging import Averager


class SameDevice:
    """The average beside the model's tensors (or on their devices, group by group)."""

    def update(self, manager: Averager, tensors: list[Tensor]) -> None:
        manager.apply(tensors)

    def wait(self, manager: Averager) -> None:
        pass


class SideStream:
    """Updates on a CUDA stream of their own. The side stream starts from the weights as the
    optimizer left them on the main stream; the next `optimizer.step()` (any optimizer's, through a
    global step pre-hook) and, with `join_forward`, the model's next forward (a training forward
    writes BatchNorm statistics in place) wait for it on the GPU, without a host sync."""

    def __init__(self, model: Module, device: torch.device, join_forward: bool) -> None:
        if device.type != "cuda":
            raise ValueError(f"swa_fast: side_stream=True needs a model on a CUDA GPU, it is on {device}")
        self.stream = torch.cuda.Stream(device)
        self._done: torch.cuda.Event | None = None
        me = weakref.ref(self)  # the hooks must not keep the manager alive

        def join(*_args) -> None:
            if (placement := me()) is not None:
                placement.wait()

        hooks = [torch.optim.optimizer.register_optimizer_step_pre_hook(join)]
        if join_forward:
            hooks.append(model.register_forward_pre_hook(join))
        weakref.finalize(self, lambda: [h.remove() for h in hooks])

    def update(self, manager: Averager, tensors: list[Tensor]) -> None:
        # The weight is computed on the side stream too, so nothing it reads is freed under it.
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            manager.apply(tensors)
            self._done = torch.cuda.Event()
            self._done.record(self.stream)

    def wait(self, manager: Averager | None = None) -> None:
        """The current stream waits, on the GPU, for the update in flight."""
        if self._done is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(self._done)
            self._done = None


class OtherDevice:
    """The average on `device`, away from the model: each update saves the model's tensors into a
    staging copy there (asynchronously from a GPU into pinned memory) with the weight that update
    gets, and the copy is applied at the next update (by when it has long landed) or read."""

    def __init__(
        self, tracked: TrackedModel, tensors: list[Tensor], device: torch.device, pin_memory: bool
    ) -> None:
        self.staging = ModelCopy(tracked, tensors, device=device, pin_memory=pin_memory)
        self._pending: Tensor | float | None = None  # the weight of the staged update

    def update(self, manager: Averager, tensors: list[Tensor]) -> None:
        self.wait(manager)  # the previous update's copy: it has long landed
        weight = manager.next_weight()
        if weight is not None:
            # Pending only once saved: a save that refuses (it checks before copying) stages
            # nothing, and the next update must not apply this one's weight to older tensors.
            self.staging.save(tensors)
        self._pending = weight

    def wait(self, manager: Averager) -> None:
        """Block until the staged copy has landed, then apply it."""
        if self._pending is not None:
            self.staging.wait()
            weight, self._pending = self._pending, None
            manager.apply(self.staging.stored(), weight)
