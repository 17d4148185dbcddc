"""The weight each averaging update gives the model: one home for each rule.

Every average here is updated as `avg += w * (model - avg)`; only `w` differs:

    SWA (Izmailov et al. 2018)   w = 1 / (n + 1)      n: models averaged so far (1 first: a copy)
    EMA                          w = 1 - decay_t       decay_t = 0 on the first update (a copy), then
                                                       `decay`, or timm's warmup
                                                       min(decay, 1 - (1 + t / gamma) ** -power),
                                                       or a half-life: 2 ** (-every / half_life), or
                                                       torchtitan's 2 ** (-1 / (fraction * k))
    BEMA (Block et al. 2025)     the EMA's w = beta_t, and the correction's alpha_t (bema_weights)

The managers, both drop-ins (`swa_utils.AveragedModel`, `optim.SWA`) and FGE's `to_swa` take their
weights from here. A count held on a GPU gives a weight computed there (no host synchronisation);
a host count or a CPU tensor gives a Python float, which the kernels take by value.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def real_number(
    value: object, what: str, low: float = -math.inf, high: float = math.inf, above_low: bool = False
) -> float:
    """`value` as a Python float, for a setting checked once where it is given: any real number
    torch takes as a scalar (a Python or numpy number, a 0-dim real tensor of any dtype), finite,
    in [low, high], or in (low, high] with `above_low`. `what` names it in the error, which says what
    was expected and what came."""
    number = None
    if isinstance(value, Tensor):
        if value.dim() == 0 and not value.is_complex():
            number = float(value.item())  # read once, at construction
    elif isinstance(value, numbers.Real):
        number = float(value)
    if (
        number is None
        or not math.isfinite(number)
        or not (number > low if above_low else number >= low)
        or not number <= high
    ):
        if high == math.inf:
            expected = f"{'>' if above_low else '>='} {low}"
        else:
            expected = f"in {'(' if above_low else '['}{low}, {high}]"
        raise ValueError(f"swa_fast.{what} must be a finite real number {expected}, got {value!r}")
    return number


def count(value: object, what: str, low: int = 0, allow_none: bool = False) -> int | None:
    """`value` as a Python int, for a count or a period (`update_every`, `max_rank`, ...) checked
    once where it is given: an integer (a Python or numpy one; a float only when integral, as 2.0)
    >= `low`, or None when `allow_none` (the setting is off). `what` names it in the error, which
    says what was expected and what came: 12.34, "2", True or None (unless allowed) are refused
    here rather than silently changing which updates run."""
    if value is None and allow_none:
        return None
    number = None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        number = int(value)
    if number is None or number < low:
        expected = f"an int >= {low}" + (" or None" if allow_none else "")
        raise ValueError(f"swa_fast.{what} must be {expected}, got {value!r}")
    return number


def swa_weight(n_averaged: Tensor | int, capturable: bool = False) -> Tensor | float:
    """1 / (n + 1): the weight that keeps the average the equal-weight mean of every model given.
    `capturable`: a tensor count gives a tensor even on the CPU (no host read: a CUDA graph or
    torch.compile traces it)."""
    is_tensor = type(n_averaged) is not int and isinstance(n_averaged, Tensor)  # (an int first: fast)
    if is_tensor and (capturable or not n_averaged.is_cpu):
        return torch.reciprocal(n_averaged.to(torch.float64) + 1)  # there: no host sync
    return 1.0 / (int(n_averaged) + 1)  # reading a CPU tensor waits for nothing


def ema_decay(
    decay: float, t: int | Tensor, warmup_gamma: float | None = None, warmup_power: float = 2 / 3
) -> float | Tensor:
    """decay_t of the t-th averaging update (from 0): 0 at t <= 0 (the first update copies the
    model), then `decay`, or with `warmup_gamma` timm's warmup (ModelEmaV3.get_decay), under which
    early averages follow the model closely. A tensor `t` gives a float64 tensor worked out where it
    is (a capturable update), with the same float64 arithmetic."""
    if type(t) is not int and isinstance(t, Tensor):  # (an int first: isinstance of Tensor is slow)
        if warmup_gamma is None:
            return (t > 0).to(torch.float64) * decay
        warm = 1 - (1 + t.to(torch.float64) / warmup_gamma) ** -warmup_power
        return torch.where(t <= 0, 0.0, torch.clamp(warm, max=decay))
    if t <= 0:
        return 0.0
    if warmup_gamma is None:
        return decay
    return min(decay, 1 - (1 + t / warmup_gamma) ** -warmup_power)


def half_life_decay(
    t: int | Tensor, every: int = 1, half_life: float | None = None, fraction: float | None = None
) -> float | Tensor:
    """decay_t of an EMA given by its half-life (the number of update() calls after which a model's
    weight in the average has halved), t counted as `ema_decay`'s (the calls since the copy, 0 at
    it), an averaging update every `every` calls. 0 at t <= 0 (the copy), then either
    `half_life` calls: 2 ** (-every / half_life) at every averaging update, or
    `fraction` of the calls so far (torchtitan's EMA, `decay = 2 ** (-1 / (half_life_fraction *
    num_updates))`): 2 ** (-1 / (fraction * k)) at the k-th averaging update after the copy,
    k = t // every (>= 1), so that the half-life, fraction * k updates, is fraction * t calls.
    A tensor `t` gives a float64 tensor worked out where it is (a capturable update), with the
    same float64 arithmetic."""
    if fraction is None:
        return ema_decay(2.0 ** (-every / half_life), t)
    if type(t) is not int and isinstance(t, Tensor):
        k = torch.clamp(torch.div(t, every, rounding_mode="floor"), min=1).to(torch.float64)
        return torch.where(t <= 0, 0.0, 2.0 ** (-1.0 / (fraction * k)))
    if t <= 0:
        return 0.0
    return 2.0 ** (-1.0 / (fraction * max(t // every, 1)))


def ema_weight(decay: float, n_averaged: Tensor | int) -> Tensor | float:
    """1 - decay_t for an EMA that has averaged `n_averaged` models (no warmup): 1, a copy, first."""
    if type(n_averaged) is not int and isinstance(n_averaged, Tensor) and not n_averaged.is_cpu:
        return torch.where(n_averaged == 0, 1.0, 1.0 - decay).to(torch.float64)  # decided there
    return 1.0 - ema_decay(decay, int(n_averaged))


def bema_weights(
    t: int,
    ema_power: float = 0.5,
    bias_power: float = 0.2,
    lag: float = 10,
    multiplier: float = 1.0,
    min_ema_multiplier: float = 0.0,
) -> tuple[float, float]:
    """BEMA's weights at step `t` (Block et al. 2025, "EMA Without the Lag: Bias-Corrected Iterate
    Averaging Schemes", arXiv 2508.00180), (beta_t, alpha_t):

        beta_t  = max((lag + multiplier * t) ** -ema_power, min_ema_multiplier)   the EMA's weight
        alpha_t = (lag + multiplier * t) ** -bias_power                           the correction's

    so that ema += beta_t * (model - ema) and bema = ema + alpha_t * (model - model_0). Worked out in
    Python floats with TRL's own expressions (its `BEMACallback._ema_beta` / `_bema_alpha`), so the
    two agree bit for bit. `lag + multiplier * t` must be > 0."""
    base = lag + multiplier * t
    if not base > 0:
        raise ValueError(
            "swa_fast.bema_weights: expected lag + multiplier * t > 0, got "
            f"{lag} + {multiplier} * {t} = {base}"
        )
    return max(base ** (-ema_power), min_ema_multiplier), base ** (-bias_power)
