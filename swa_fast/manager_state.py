"""Saving and resuming a manager: pickling without its model, and its state_dict.

`ManagerState` is a part of `averaging.Averager` (a mixin of its methods, one purpose per file);
subclasses add their own entries through the `_extra_state` hooks.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from .placement import SideStream


class ManagerState:
    """An `Averager`'s pickling and its state_dict / load_state_dict, checked before any write."""

    def __getstate__(self) -> dict:
        """Pickling (`torch.save(manager)`, `copy.deepcopy`) keeps the average, the counts and the
        settings, not the model (only referenced weakly): the unpickled manager tracks the first
        model it is given (`update`, `copy_to`, ...) with the same names and shapes."""
        if isinstance(self._placement, SideStream):
            raise TypeError(
                f"swa_fast.{type(self).__name__}: a side_stream=True manager cannot be pickled (its CUDA "
                "stream and hooks belong to this process); save its state_dict() instead"
            )
        self.wait()  # an update in flight lands first
        return {**self.__dict__, "_plan": None}  # (made anew when unpickled)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._plan = self._new_plan()

    def state_dict(self) -> dict:
        """The average in its flat buffers' memory (no copy; DCP loads into them in place; each entry
        a storage of its own bytes, so a saved part holds only its own) and the counts as they are
        now: save it before the next `update`, which changes the former only."""
        if not self.holds_average:  # rank0_only: nothing here to save (DCP saves rank 0's state)
            return {}
        self.wait()
        return {
            "average": self._copy.named(),
            "n_averaged": self.n_averaged,
            "n_skipped": self.n_skipped,
            "calls": self.calls,
            "updates": self.updates,
            **self._rounding.state(),
            **self._extra_state(),
        }

    def _extra_state(self) -> dict:
        return {}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict of the same model; resuming continues bit for bit. Checks everything
        before writing anything: a state of another model raises and names the first mismatch.
        Under rank0_only, ranks other than 0 hold nothing and ignore it."""
        if not self.holds_average:
            return
        self.wait()
        missing = [k for k in ("average", "n_averaged", "calls") if k not in state]
        if missing:
            name = type(self).__name__
            raise ValueError(
                f"swa_fast.{name}.load_state_dict: expected the state_dict of a swa_fast.{name} (from its "
                f"state_dict()), got a dict missing {missing}"
            )
        counts = {key: self._saved_count(state, key) for key in ("n_averaged", "n_skipped", "calls")}
        updates = self._saved_count(state, "updates" if "updates" in state else "folds")  # older saves
        self._rounding.check(state, f"{type(self).__name__}.load_state_dict")
        checked = self._check_extra_state(state)
        self._copy.load_named(state["average"])  # checks every entry before writing any
        self.counts.set(counts["n_averaged"], counts["n_skipped"])
        self.calls = counts["calls"]
        self.updates = counts["calls"] if updates is None else updates
        self._load_extra_state(checked)
        self._rounding.load(state)

    def _saved_count(self, state: dict, key: str) -> int | None:
        """`state[key]`, a count (an int or a 0-dim integer tensor, >= 0) as an int, checked before
        anything is written; None when absent (0 for n_skipped, which older saves lack)."""
        if key not in state:
            return 0 if key == "n_skipped" else None
        value = state[key]
        count = value
        if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point():
            count = value.item()  # a complex or boolean one is refused below
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(
                f"swa_fast.{type(self).__name__}.load_state_dict: '{key}' must be a count (an int >= 0 or "
                f"a 0-dim integer tensor), got {value!r}"
            )
        return int(count)

    def _check_extra_state(self, state: dict) -> Any:
        """Raise unless the subclass's part of `state` fits (before anything is written); return
        what `_load_extra_state` then writes (this rank's parts of it)."""

    def _load_extra_state(self, checked: Any) -> None:
        pass
