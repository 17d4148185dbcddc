"""The merge methods, each written once (docs/merging.md gives their formulas and papers).

Linear methods are one weight per input, applied by one fused `swa_fast.weighted_sum_` per chunk:
`mean`, `ema`, `lawa`, `wsm`, and `task-arithmetic` (base + scale * sum_i w_i (ft_i - base) is the
weighted sum of the base and the fine-tuned models with weights 1 - scale * sum_i w_i and scale * w_i).
TIES and DARE are not linear: they are computed by torch on each whole tensor (their trimming,
sign election and random drops are per-tensor reductions and masks, not the bandwidth-bound sum)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

LINEAR = ("mean", "ema", "lawa", "wsm", "task-arithmetic")
NEEDS_BASE = ("task-arithmetic", "ties", "dare")
METHODS = (*LINEAR, "ties", "dare")
WSM_SCHEDULES = ("linear", "cosine", "1-sqrt")


@dataclass(frozen=True)
class Settings:
    """What a method reads besides the inputs (each checked by `check_settings`)."""

    method: str = "mean"
    weights: tuple[float, ...] | None = None
    decay: float | None = None  # ema
    schedule: str = "linear"  # wsm
    scale: float = 1.0  # task-arithmetic, ties, dare: the lambda of the summed task vectors
    density: float = 0.2  # ties: the fraction of each task vector kept
    drop: float = 0.9  # dare: the probability that an element of a task vector is dropped
    seed: int = 0  # dare


def check_settings(s: Settings, count: int) -> None:
    """Refuse settings that do not fit the method or the `count` inputs merged (the base apart)."""
    if s.method not in METHODS:
        raise ValueError(f"swa_fast.merge: method must be one of {list(METHODS)}, got {s.method!r}")
    if count < 1:
        raise ValueError("swa_fast.merge: expected at least one input to merge, got none")
    if s.weights is not None:
        _check_weights(s, count)
    refusal = {
        "ema": None
        if s.decay is not None and 0.0 <= s.decay <= 1.0
        else f"needs a decay in [0, 1], got {s.decay!r}",
        "wsm": None
        if s.schedule in WSM_SCHEDULES
        else f"takes a schedule of {list(WSM_SCHEDULES)}, got {s.schedule!r}",
        "ties": None if 0.0 < s.density <= 1.0 else f"needs a density in (0, 1], got {s.density!r}",
        "dare": None if 0.0 <= s.drop < 1.0 else f"needs a drop probability in [0, 1), got {s.drop!r}",
    }.get(s.method)
    if refusal is not None:
        raise ValueError(f"swa_fast.merge: method {s.method!r} {refusal}")
    if not math.isfinite(s.scale):
        raise ValueError(f"swa_fast.merge: scale must be finite, got {s.scale!r}")


def _check_weights(s: Settings, count: int) -> None:
    if len(s.weights) != count:
        raise ValueError(
            f"swa_fast.merge: {len(s.weights)} weights given for {count} inputs; expected one per input"
        )
    if not all(math.isfinite(w) for w in s.weights):
        raise ValueError(f"swa_fast.merge: the weights must be finite, got {list(s.weights)}")
    if s.method in ("ema", "wsm", "lawa"):
        raise ValueError(
            f"swa_fast.merge: method {s.method!r} sets its own weights; `weights` cannot be given"
        )
    if s.method == "mean" and sum(s.weights) == 0:
        raise ValueError(f"swa_fast.merge: the weights of a mean must not sum to 0, got {list(s.weights)}")


def ema_weights(count: int, decay: float) -> list[float]:
    """e_1 = x_1, e_k = decay * e_{k-1} + (1 - decay) * x_k, as weights of x_1..x_count."""
    return [decay ** (count - 1)] + [(1 - decay) * decay ** (count - k) for k in range(2, count + 1)]


def _decay_shape(schedule: str, x: float) -> float:
    if schedule == "linear":
        return 1.0 - x
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * x))
    return 1.0 - math.sqrt(x)  # 1-sqrt


def wsm_weights(count: int, schedule: str) -> list[float]:
    """WSM (Tian et al. 2025): merging checkpoints theta_0..theta_k (k = count - 1) with c_0 = 1 - w_1,
    c_j = w_j - w_{j+1}, c_k = w_k equals decaying the learning rate by w_1..w_k over the k steps
    between them; w_i is the schedule's shape at i / (k + 1) (so a linear decay is the uniform mean)."""
    k = count - 1
    w = [1.0] + [_decay_shape(schedule, i / (k + 1)) for i in range(1, k + 1)] + [0.0]
    return [w[j] - w[j + 1] for j in range(count)]


def linear_weights(s: Settings, count: int) -> list[float]:
    """The weight of each of the `count` inputs (the base first, for task arithmetic) in the sum."""
    if s.method == "ema":
        return ema_weights(count, s.decay)
    if s.method == "wsm":
        return wsm_weights(count, s.schedule)
    given = list(s.weights) if s.weights is not None else [1.0] * (count - (s.method == "task-arithmetic"))
    if s.method == "task-arithmetic":
        scaled = [s.scale * w for w in given]
        return [1.0 - sum(scaled), *scaled]
    total = sum(given)  # mean and lawa: a weighted average, its weights normalised to sum to 1
    return [w / total for w in given]


# --- TIES and DARE: on whole tensors --------------------------------------------------------------------


def _accumulation_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def ties(base: Tensor, models: Sequence[Tensor], weights: Sequence[float], s: Settings) -> Tensor:
    """TIES-merging (Yadav et al. 2023): each task vector tau_i = w_i (ft_i - base) trimmed to its
    largest magnitudes (those at least its ceil(density * n)-th largest, ties kept), the sign of each
    element elected as the sign of the trimmed vectors' sum, and the mean of the trimmed values of
    that sign (the disjoint mean) added to the base, scaled."""
    acc = _accumulation_dtype(base)
    b = base.to(acc)
    taus = [w * (m.to(acc) - b) for m, w in zip(models, weights)]
    keep = max(1, math.ceil(s.density * b.numel()))
    trimmed = []
    for tau in taus:
        magnitude = tau.abs().reshape(-1)
        threshold = magnitude.kthvalue(magnitude.numel() - keep + 1).values if magnitude.numel() else 0
        trimmed.append(torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau)))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agrees = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agrees.sum(0).clamp_min(1)
    merged = torch.where(agrees, stacked, torch.zeros_like(stacked)).sum(0) / count
    return b + s.scale * merged


def dare_masks(shape: torch.Size, count: int, s: Settings, name: str) -> list[Tensor]:
    """DARE's keep masks of the `count` task vectors of one tensor: each element kept with
    probability 1 - drop, drawn from a generator seeded by (seed, the tensor's name, the model's
    position), so a merge is reproducible and does not depend on the order of the tensors."""
    masks = []
    for i in range(count):
        generator = torch.Generator().manual_seed(
            (s.seed * 1_000_003 + zlib.crc32(name.encode())) * 1_009 + i
        )
        masks.append(torch.rand(shape, generator=generator) >= s.drop)
    return masks


def dare(base: Tensor, models: Sequence[Tensor], weights: Sequence[float], s: Settings, name: str) -> Tensor:
    """DARE (Yu et al. 2024): each task vector's elements dropped with probability p and the rest
    rescaled by 1 / (1 - p), then added to the base as in task arithmetic:
    base + scale * sum_i w_i * mask_i * (ft_i - base) / (1 - p)."""
    acc = _accumulation_dtype(base)
    b = base.to(acc)
    out = b.clone()
    factor = s.scale / (1.0 - s.drop)
    for m, w, mask in zip(models, weights, dare_masks(base.shape, len(models), s, name)):
        out += (w * factor) * torch.where(mask, m.to(acc) - b, torch.zeros_like(b))
    return out
