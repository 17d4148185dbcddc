"""diffusers' `EMAModel` on swa_fast's fused path: change the import, keep the code.

    from swa_fast.integrations.diffusers import EMAModel
    # was: from diffusers.training_utils import EMAModel

A subclass of diffusers' class with its arguments, attributes (`shadow_params`, `optimization_step`,
`cur_decay_value`, ...), decay schedule (`get_decay`, inherited), `copy_to`, `store` / `restore`,
`state_dict` / `load_state_dict` and `save_pretrained` / `from_pretrained`, so checkpoints move
both ways. What changes: `shadow_params` are views of one flat buffer per (device, dtype), updated
in place by one `swa_fast.lerp_` per buffer in `step`; `to()` and `pin_memory()` move or pin each
buffer in one copy. See docs/integrations.md for what differs.
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import attrgetter

import torch
from diffusers.training_utils import EMAModel as _DiffusersEMAModel
from diffusers.training_utils import is_transformers_available
from torch import Tensor
from torch.nn import Module

from ..flat import copy_lists
from ..weighting import count
from ._common import FlatShadow, check_count, pick

__all__ = ["EMAModel"]

_requires_grad = attrgetter("requires_grad")


def _zero3_enabled() -> bool:
    """DeepSpeed ZeRO-3, under which diffusers gathers each parameter before reading it."""
    if not is_transformers_available():
        return False
    import transformers.integrations.deepspeed as deepspeed

    return deepspeed.is_deepspeed_zero3_enabled()


class EMAModel(_DiffusersEMAModel):
    """diffusers' `EMAModel`, whose `step` is one fused swa_fast op per flat buffer.

    Args:
        parameters: the parameters to track (a module is accepted, deprecated, as in diffusers).
        decay: the highest decay.
        min_decay: the lowest decay.
        update_after_step: steps up to `update_after_step + 1` copy the parameters (decay 0).
        use_ema_warmup: decay `1 - (1 + t / inv_gamma) ** -power`; else `(1 + t) / (10 + t)`
            (both capped by `decay`), t = optimization_step - update_after_step - 1.
        inv_gamma, power: the warmup's constants.
        foreach: accepted as diffusers'; the update is fused either way.
        model_cls, model_config: what `save_pretrained` builds to save the average.
        dtype: swa_fast's addition (default None: the parameters' dtype, as diffusers): the dtype of
            the shadow parameters, e.g. an fp32 average of a bf16 model.
        **kwargs: diffusers' deprecated `max_value`, `min_value`, `device`.
    """

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_ema_warmup: bool = False,
        inv_gamma: float | int = 1.0,
        power: float | int = 2 / 3,
        foreach: bool = False,
        model_cls=None,
        model_config=None,
        *,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> None:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(
                "swa_fast.integrations.diffusers.EMAModel: dtype must be None or a floating torch.dtype, "
                f"got {dtype!r}"
            )
        self.dtype = dtype
        super().__init__(
            parameters,
            decay=decay,
            min_decay=min_decay,
            update_after_step=update_after_step,
            use_ema_warmup=use_ema_warmup,
            inv_gamma=inv_gamma,
            power=power,
            foreach=foreach,
            model_cls=model_cls,
            model_config=model_config,
            **kwargs,
        )
        self.update_after_step = count(
            update_after_step, "integrations.diffusers.EMAModel: update_after_step", 0
        )
        self._flatten()

    def _flatten(self, pin_memory: bool = False) -> None:
        """Re-point the floating shadow parameters into flat buffers (integer ones stay apart: they
        never require grad, so every step copies them)."""
        shadow = self.shadow_params
        self._floating = [i for i, s in enumerate(shadow) if s.is_floating_point()]
        self._integer = [i for i, s in enumerate(shadow) if not s.is_floating_point()]
        self._flat = FlatShadow(
            pick(self._floating, shadow),
            dtype=self.dtype,
            pin_memory=pin_memory,
            owner="integrations.diffusers.EMAModel",
        )
        self._shadow_list = shadow

    def _floating_shadow(self) -> list[Tensor]:
        return self.shadow_params if not self._integer else pick(self._floating, self.shadow_params)

    def _current_flat(self) -> FlatShadow:
        """The flat buffers, rebuilt when `shadow_params` was replaced or re-pointed meanwhile."""
        if self.shadow_params is not self._shadow_list or not self._flat.holds(self._floating_shadow()):
            self._flatten()
        return self._flat

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """One EMA step: parameters that require grad are blended with this step's decay, the others
        copied, as diffusers does."""
        if isinstance(parameters, Module) or _zero3_enabled():
            return super().step(parameters)  # diffusers' deprecation warning; ZeRO-3's gathering
        parameters = list(parameters)
        check_count(
            "swa_fast.integrations.diffusers.EMAModel.step",
            "parameters",
            len(self.shadow_params),
            len(parameters),
        )
        flat = self._current_flat()
        decay = self.get_decay(self.optimization_step + 1)  # counted below, once nothing raised
        floating = parameters if not self._integer else pick(self._floating, parameters)
        trained = list(map(_requires_grad, floating))
        if all(trained):
            flat.lerp_(floating, 1 - decay)
        else:  # frozen parameters are copied, as diffusers does
            if self.__dict__.get("_trained") != trained:  # which are frozen changes rarely
                self._trained = trained
                self._split_frozen = (
                    [i for i, grad in enumerate(trained) if grad],
                    [i for i, grad in enumerate(trained) if not grad],
                )
            blended, frozen = self._split_frozen
            flat.lerp_(floating, 1 - decay, part=blended)
            copy_lists(pick(frozen, flat.buffer.views), pick(frozen, floating))
        if self._integer:
            torch._foreach_copy_(pick(self._integer, self.shadow_params), pick(self._integer, parameters))
        self.optimization_step += 1
        self.cur_decay_value = decay

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> None:
        """Move the shadow parameters (floating ones to `dtype` too), one copy per flat buffer."""
        if "_flat" not in self.__dict__:  # diffusers' deprecated `device=` argument, during __init__
            return super().to(device=device, dtype=dtype, non_blocking=non_blocking)
        flat = self._current_flat()
        flat.to_(self._floating_shadow(), device=device, dtype=dtype, non_blocking=non_blocking)
        if dtype is not None:
            self.dtype = dtype
        if self._integer:
            for i in self._integer:
                self.shadow_params[i] = self.shadow_params[i].to(device=device, non_blocking=non_blocking)

    def pin_memory(self) -> None:
        """Pin the shadow parameters' flat buffers (one copy each), for non-blocking offloading."""
        self._current_flat().to_(self._floating_shadow(), pin_memory=True)
        for i in self._integer:
            self.shadow_params[i] = self.shadow_params[i].pin_memory()

    def load_state_dict(self, state_dict: dict) -> None:
        """diffusers' checks and fields; the loaded shadow parameters then go into flat buffers."""
        super().load_state_dict(state_dict)
        self._current_flat()
