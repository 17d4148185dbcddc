"""Fast Geometric Ensembling (Garipov et al., "Loss Surfaces, Mode Connectivity, and Fast
Ensembling of DNNs", 2018): snapshots of the weights at the minima of a cyclic learning rate,
whose averaged predictions form an ensemble at the cost of one training run.

    schedule = swa_fast.FGECyclicLR(optimizer, lr_max=0.05, lr_min=5e-4, cycle_length=2 * len(loader))
    fge = swa_fast.FGE(model, max_snapshots=8, scheduler=schedule)   # snapshots itself at minima
    for x, y in loader: ...; optimizer.step(); schedule.step()
    probs = fge.predict(model, x_test)                               # mean softmax of snapshots

A snapshot is the model's floating parameters and buffers (BatchNorm statistics included) in
flat buffers, saved and loaded with one fused copy per (device, dtype) group; its dtype and device
are choices (say bf16, or the CPU in pinned memory for a GPU model).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from .averaging import SWA, check_backend
from .ensemble import PredictsOnBatches, ensemble_predict
from .model_tensors import ModelCopy, TrackedModel
from .schedules import FGECyclicLR
from .weighting import count
from .wrappers import hooked

WHEN_FULL = ("drop_oldest", "raise")


class FGE(PredictsOnBatches):
    """A store of snapshots of `model`, oldest first, and their ensemble's predictions.

    Args:
        model: the model to snapshot (its floating and integer parameters and buffers).
        max_snapshots: the most snapshots kept (None: no limit).
        dtype, device, pin_memory: how snapshots are stored (default: as the model's tensors; say
            bf16, or `device="cpu", pin_memory=True` for a GPU model).
        scheduler: an `FGECyclicLR`; a snapshot is then taken after every optimizer step made at
            the minimum of a cycle, with no call in the training loop (a step post-hook on its
            optimizer; `close()` removes it).
        when_full: "drop_oldest" reuses the oldest snapshot's storage for the new one (the ensemble
            follows the latest cycles); "raise" refuses a new snapshot with an error.
        backend: force an op backend (see `swa_fast.choose_backend`).
    """

    def __init__(
        self,
        model: Module,
        max_snapshots: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        pin_memory: bool = False,
        scheduler: FGECyclicLR | None = None,
        when_full: str = "drop_oldest",
        backend: str | None = None,
    ) -> None:
        max_snapshots = count(max_snapshots, "FGE: max_snapshots", 1, allow_none=True)
        if when_full not in WHEN_FULL:
            raise ValueError(f"swa_fast.FGE: when_full must be one of {WHEN_FULL}, got {when_full!r}")
        if scheduler is not None and not isinstance(scheduler, FGECyclicLR):
            raise ValueError(f"swa_fast.FGE: scheduler must be FGECyclicLR, got {type(scheduler).__name__}")
        if pin_memory and not torch.cuda.is_available():
            # Pinned memory only speeds up copies to and from a GPU, and cannot be had without one;
            # torch's DataLoader drops it the same way.
            warnings.warn(
                "swa_fast.FGE: pin_memory=True, but no GPU is available; snapshots are stored unpinned",
                stacklevel=2,
            )
            pin_memory = False
        self.tracked = TrackedModel(model, buffers=True, owner="FGE", options=[])
        self.max_snapshots = max_snapshots
        self.dtype = dtype
        self.device = device
        self.pin_memory = pin_memory
        self.when_full = when_full
        self.backend = backend
        self.snapshots: list[ModelCopy] = []
        self.n_taken = 0  # snapshots taken in all, dropped ones included
        # Shapes, dtypes and devices of the model's tensors: enough to rebuild snapshots on load.
        self._layout = [(t.shape, t.dtype, t.device) for t in self.tracked.tensors(model)]
        stored_on = {torch.device(device)} if device is not None else {d for _, _, d in self._layout}
        check_backend(backend, stored_on)  # now, not at the first snapshot
        self._hook = None
        if scheduler is not None:
            stepped = hooked(scheduler.optimizer, "FGE")  # (the one inside swa_fast.optim.SWA)
            self._hook = stepped.register_step_post_hook(self._after_step(scheduler))

    def _after_step(self, scheduler: FGECyclicLR) -> Callable[..., None]:
        tracked = self.tracked

        def snapshot_at_minimum(_optimizer, _args, _kwargs) -> None:
            # Runs after optimizer.step() and before scheduler.step(): the step just made used the
            # scheduler's current rate.
            model = tracked.model
            if scheduler.at_minimum() and model is not None:
                self.snapshot(model)

        return snapshot_at_minimum

    def close(self) -> None:
        """Stop taking snapshots automatically."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __len__(self) -> int:
        return len(self.snapshots)

    def nbytes(self) -> int:
        """Bytes held by the snapshots."""
        return sum(s.nbytes() for s in self.snapshots)

    @torch.no_grad()
    def snapshot(self, model: Module) -> None:
        """Store the model's current weights and buffers as the newest snapshot. A snapshot that
        fails leaves the store as it was."""
        tensors = self.tracked.tensors(model)
        for name, t, (shape, _, _) in zip(self.tracked.names, tensors, self._layout):
            if t.shape != shape:  # a `p.data = ...` keeps the Parameter, so tracked.tensors passes it
                raise ValueError(
                    f"swa_fast.FGE: '{name}' has shape {list(t.shape)}, its snapshots {list(shape)}; "
                    "create a new FGE for the changed model"
                )
        if self.max_snapshots is not None and len(self.snapshots) >= self.max_snapshots:
            if self.when_full == "raise":
                raise RuntimeError(
                    f"swa_fast.FGE: the store is full ({self.max_snapshots} snapshots) and "
                    "when_full='raise'; raise max_snapshots or use when_full='drop_oldest'"
                )
            self.snapshots[0].save(tensors)  # the oldest leaves its place only once overwritten
            self.snapshots.append(self.snapshots.pop(0))
        else:
            self.snapshots.append(self._new_copy(tensors))
        self.n_taken += 1

    def _new_copy(self, tensors: list[Tensor]) -> ModelCopy:
        return ModelCopy(
            self.tracked,
            tensors,
            dtype=self.dtype,
            device=self.device,
            pin_memory=self.pin_memory,
            backend=self.backend,
        )

    # --- the ensemble ---------------------------------------------------------------------------------

    def _members(self, model: Module) -> Iterator[None]:
        tensors = self.tracked.tensors(model)
        for snapshot in self.snapshots:
            snapshot.load(tensors)
            yield

    def predict_loader(
        self,
        model: Module,
        loader: Iterable[Any],
        forward_fn: Callable[[Module, Any], Tensor] | None = None,
        output: str = "probs",
    ) -> Tensor:
        """The mean over snapshots of the model's softmax probabilities (`output="logits"`: raw
        outputs) on every batch of `loader`, concatenated. Each snapshot is loaded once, and the
        loader, which must give the same batches each pass, is run once per snapshot. The model's
        own weights, buffers and train/eval mode are restored exactly afterwards."""
        return ensemble_predict(model, self._members(model), loader, output, forward_fn)

    @torch.no_grad()
    def to_swa(self, model: Module) -> SWA:
        """An `swa_fast.SWA` manager for `model` holding the equal-weight mean of the snapshots
        (their BatchNorm statistics averaged too; `update_bn` gives the exact ones)."""
        if not self.snapshots:
            raise ValueError("swa_fast.FGE: no snapshots to average")
        swa = SWA(model, use_buffers=True, backend=self.backend)
        for snapshot in self.snapshots:
            snapshot.wait()  # a save to host memory may still be on its way
            swa.update_from(snapshot.stored())
        return swa

    # --- saving and resuming --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "snapshots": [s.named() for s in self.snapshots],
            "n_taken": self.n_taken,
            "max_snapshots": self.max_snapshots,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore the snapshots of a `state_dict()` of the same model; checks everything before
        changing anything."""
        if "snapshots" not in state or "n_taken" not in state:
            raise ValueError(f"swa_fast.FGE: not an FGE state_dict: keys {sorted(state)}")
        saved = state["snapshots"]
        if self.max_snapshots is not None and len(saved) > self.max_snapshots:
            raise ValueError(
                f"swa_fast.FGE: the state_dict has {len(saved)} snapshots, this store holds at most "
                f"{self.max_snapshots}"
            )
        # Checks every snapshot first; then this rank's parts (DTensor shards, or slices of full tensors).
        saved = [self.tracked.local_state(snapshot) for snapshot in saved]
        copies = []
        for snapshot in saved:
            tensors = [
                snapshot[name].to(device=device, dtype=dtype)
                for name, (_, dtype, device) in zip(self.tracked.names, self._layout)
            ]
            copies.append(self._new_copy(tensors))
        self.snapshots = copies
        self.n_taken = int(state["n_taken"])
