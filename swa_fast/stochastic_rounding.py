"""A manager's stochastic rounding (`rounding="stochastic"`): its seed, and at each update the op's
`rounding` argument (ops/rounding.py defines the bits).

The random bits of an element depend on (seed, update number, the element's index in the whole
model's flat layout) only, so ranks that average the same model agree with no communication, an
FSDP2 rank's shard rounds as the same elements of a whole model would, and a resumed manager (the
seed and the update count are in its state_dict) continues bit for bit.
"""

from __future__ import annotations

import numbers

from torch import Tensor

from . import distributed
from .ops import OP_TABLE
from .ops.rounding import STOCHASTIC_DTYPES, rounding_tensor

ROUNDINGS = ("nearest", "stochastic")


class ManagerRounding:
    """How a manager rounds into its averages. `at(step)`: the op's `rounding` for that update
    (None: to nearest)."""

    def __init__(self, rounding: str, seed: int, owner: str, op: str) -> None:
        if not isinstance(rounding, str) or rounding not in ROUNDINGS:
            raise ValueError(
                f"swa_fast.{owner}: rounding must be 'nearest' or 'stochastic', got {rounding!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**63) <= seed < 2**63:
            raise ValueError(f"swa_fast.{owner}: seed must be an int (64 bits), got {seed!r}")
        if rounding == "stochastic" and not OP_TABLE[op].rounds:
            raise ValueError(f"swa_fast.{owner}: rounding='stochastic' is not available for this manager")
        self.rounding, self.seed, self.owner = rounding, int(seed), owner
        self._key: Tensor | None = None

    @property
    def stochastic(self) -> bool:
        return self.rounding == "stochastic"

    def start(self, tracked, averages: list[Tensor], capturable: bool) -> None:
        """Work out each tracked tensor's first element in the whole model's flat layout, once:
        `averages` are the stored copies (their dtypes say whether anything is rounded)."""
        if not self.stochastic:
            return
        if capturable:
            raise ValueError(
                f"swa_fast.{self.owner}: rounding='stochastic' draws anew at every update from a host count; "
                "it cannot be captured (drop capturable=True)"
            )
        if not any(a.dtype in STOCHASTIC_DTYPES for a in averages):
            raise ValueError(
                f"swa_fast.{self.owner}: rounding='stochastic' rounds bfloat16 and float16 averages, but "
                f"these are {sorted({str(a.dtype) for a in averages})}: pass dtype=torch.bfloat16 (or "
                "torch.float16)"
            )
        firsts = distributed.element_firsts(tracked.shapes, tracked.layouts, self.owner)
        self._key = rounding_tensor(self.seed, 0, firsts)

    def at(self, step: int) -> Tensor | None:
        """The op's `rounding` for update number `step` (from 0), None to round to nearest. (The
        ops read it when called: one tensor, rewritten in place, serves every update.)"""
        if self._key is None:
            return None
        self._key[1] = step
        return self._key

    def state(self) -> dict:
        """What a state_dict keeps of it: the seed, with the rounding it serves."""
        return {"rounding": self.rounding, "seed": self.seed} if self.stochastic else {}

    def load(self, state: dict) -> None:
        """Take the seed of a saved state (checked by `check`)."""
        if self.stochastic and "seed" in state:
            self.seed = int(state["seed"])
            if self._key is not None:
                self._key[0] = self.seed

    def check(self, state: dict, what: str) -> None:
        """Refuse, before anything is loaded, a state saved with another rounding."""
        theirs = state.get("rounding", "nearest")
        if theirs != self.rounding:
            raise ValueError(
                f"swa_fast.{what}: expected the state_dict of a manager with rounding={self.rounding!r}, got "
                f"one with rounding={theirs!r}; nothing was loaded"
            )
        seed = state.get("seed")
        if self.stochastic and seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"swa_fast.{what}: 'seed' must be an int, got {seed!r}; nothing was loaded")
