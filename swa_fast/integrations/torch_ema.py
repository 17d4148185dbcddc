"""torch-ema's `ExponentialMovingAverage` on swa_fast's fused path: change the import, keep the code.

    from swa_fast.integrations.torch_ema import ExponentialMovingAverage
    # was: from torch_ema import ExponentialMovingAverage

A subclass of torch-ema's class with its arguments, attributes (`decay`, `num_updates`,
`shadow_params`, `collected_params`), weak references to the parameters, `copy_to`, `store` /
`restore`, `average_parameters()` and state_dict format. What changes: `shadow_params` are views of
one flat buffer per (device, dtype), updated in place by one `swa_fast.lerp_` per buffer, and
`to()` moves each buffer in one copy. See docs/integrations.md for what differs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch_ema
from torch import Tensor

from ._common import FlatShadow

__all__ = ["ExponentialMovingAverage"]

_OWNER = "swa_fast.integrations.torch_ema.ExponentialMovingAverage"


class ExponentialMovingAverage(torch_ema.ExponentialMovingAverage):
    """torch-ema's `ExponentialMovingAverage`, whose `update` is one fused swa_fast op per flat
    buffer.

    Args:
        parameters: the parameters to average (all of them, whether they require grad or not).
        decay: the decay, in [0, 1].
        use_num_updates: decay `min(decay, (1 + n) / (10 + n))` at the n-th update (from 1).
        dtype: swa_fast's addition (default None: the parameters' dtype, as torch-ema): the dtype of
            the shadow parameters, e.g. an fp32 average of a bf16 model; `copy_to` casts back.
    """

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        decay: float,
        use_num_updates: bool = True,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"{_OWNER}: dtype must be None or a floating torch.dtype, got {dtype!r}")
        super().__init__(parameters, decay, use_num_updates)
        self.dtype = dtype
        self._flatten()

    def _flatten(self) -> None:
        for i, s in enumerate(self.shadow_params):
            if not s.is_floating_point():  # torch-ema's update fails on these too, later
                raise ValueError(f"{_OWNER}: averages floating tensors, parameter {i} is {s.dtype}")
        self._flat = FlatShadow(
            self.shadow_params, dtype=self.dtype, owner="integrations.torch_ema.ExponentialMovingAverage"
        )
        self._shadow_list = self.shadow_params

    def _current_flat(self) -> FlatShadow:
        """The flat buffers, rebuilt when `shadow_params` was replaced or re-pointed meanwhile."""
        if self.shadow_params is not self._shadow_list or not self._flat.holds(self.shadow_params):
            self._flatten()
        return self._flat

    def update(self, parameters: Iterable[torch.nn.Parameter] | None = None) -> None:
        """Move the average toward `parameters` (default: the ones given at construction)."""
        parameters = self._get_parameters(parameters)
        flat = self._current_flat()
        decay = self.decay
        if self.num_updates is not None:
            n = self.num_updates + 1  # counted below, once nothing raised
            decay = min(decay, (1 + n) / (10 + n))
        with torch.no_grad():
            flat.lerp_(parameters, 1.0 - decay)
        if self.num_updates is not None:
            self.num_updates += 1

    def to(self, device=None, dtype=None) -> None:
        """Move the shadow parameters (one copy per flat buffer) and any stored ones."""
        self._current_flat().to_(self.shadow_params, device=device, dtype=dtype)
        if dtype is not None:
            self.dtype = dtype
        if self.collected_params is not None:
            self.collected_params = [p.to(device=device, dtype=dtype) for p in self.collected_params]

    def load_state_dict(self, state_dict: dict) -> None:
        """torch-ema's checks, casts to the parameters' device and dtype (to `dtype` when given,
        which keeps an fp32 average fp32), then flat buffers."""
        saved: list[Tensor] = list(state_dict.get("shadow_params") or [])
        super().load_state_dict(state_dict)
        if self.dtype is not None and len(saved) == len(self.shadow_params):
            self.shadow_params = [
                s.detach().to(device=t.device, copy=True) for s, t in zip(saved, self.shadow_params)
            ]
        self._flatten()
