"""The power-function EMA profiles of post-hoc EMA (EDM2, Karras et al. 2024): sigma_rel <-> gamma,
the update weight that keeps a profile however far apart the updates are, the weight each update
gets, the closed-form inner products of two profiles and the least-squares reconstruction of one
profile from others (see manager.py for the derivation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..weighting import real_number

# sigma_rel(gamma) rises from 0 at gamma = -1 to its peak at gamma = (sqrt(5) - 3) / 2, where
# u = gamma + 1 solves u^2 + u = 1, and falls towards 0 as gamma grows: EDM2 takes the falling side
# (the largest root of the cubic), so every sigma_rel below the peak has one gamma there.
_GAMMA_AT_PEAK = (math.sqrt(5.0) - 3.0) / 2.0


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function profile t^gamma on [0, T], over T."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


SIGMA_REL_MAX = gamma_to_sigma_rel(_GAMMA_AT_PEAK)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function EMA of relative width `sigma_rel`, in (0, SIGMA_REL_MAX):
    the largest real root of (gamma + 2)^2 (gamma + 3) sigma_rel^2 = gamma + 1, by bisection on the
    side where sigma_rel falls with gamma (monotone there), to the last bit of a float64."""
    sigma_rel = real_number(sigma_rel, "posthoc: sigma_rel", 0.0, SIGMA_REL_MAX, above_low=True)
    if sigma_rel == SIGMA_REL_MAX:
        return _GAMMA_AT_PEAK
    low, high = _GAMMA_AT_PEAK, 1.0
    while gamma_to_sigma_rel(high) > sigma_rel:  # sigma_rel ~ 1 / gamma for large gamma
        low, high = high, 2 * high
    while True:
        middle = (low + high) / 2
        if middle in (low, high):
            return (
                high
                if abs(gamma_to_sigma_rel(high) - sigma_rel) <= abs(gamma_to_sigma_rel(low) - sigma_rel)
                else low
            )
        if gamma_to_sigma_rel(middle) > sigma_rel:
            low = middle
        else:
            high = middle


def update_weight(gamma: float, previous: float, progress: float) -> float:
    """1 - beta of the update that moves a power-function EMA from progress `previous` to
    `progress`: beta = (previous / progress) ** (gamma + 1), 0 at the first update (a copy).
    Written with expm1/log1p so that a small weight keeps its digits late in training."""
    if previous == 0:
        return 1.0
    return -math.expm1((gamma + 1) * math.log1p(-(progress - previous) / progress))


def profile_weights(gamma: float, progress: Sequence[float]) -> list[float]:
    """The weight each update's model has in the average after updates at increasing `progress`
    t_1 < ... < t_n: (t_i^(g+1) - t_(i-1)^(g+1)) / t_n^(g+1), with t_0 = 0 (they sum to 1)."""
    end = progress[-1]
    scaled = [0.0] + [(t / end) ** (gamma + 1) for t in progress]
    return [b - a for a, b in zip(scaled, scaled[1:])]


def profile_inner(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """<p_a, p_b> = the integral over t of p_a(t) p_b(t) for power-function profiles
    p(t) = (g + 1) t^g / T^(g + 1) on [0, T], elementwise over broadcast float64 tensors. With
    T_a <= T_b the integral runs over [0, T_a] and comes to
    (g_a + 1)(g_b + 1) / (g_a + g_b + 1) * (T_a / T_b)^g_b / T_b; the other case by symmetry."""
    a_first = t_a <= t_b
    t_short, t_long = torch.where(a_first, t_a, t_b), torch.where(a_first, t_b, t_a)
    g_long = torch.where(a_first, gamma_b, gamma_a)
    scale = (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
    return scale * (t_short / t_long) ** g_long / t_long


@dataclass
class Reconstruction:
    """How a requested profile is made from the snapshots: `coefficients[i]` multiplies the i-th
    of `sources` (step, profile index), and `profile_error` is the L2 distance between the
    combined profile and the requested one, over the latter's L2 norm. The result stands for the
    training at update `step` (the last snapshot used) and `progress`."""

    coefficients: list[float]
    sources: list[tuple[int, int]]
    profile_error: float
    step: int | None = None
    progress: float | None = None


def solve_coefficients(
    progress: Sequence[float],
    gammas: Sequence[float],
    target_progress: float,
    target_gamma: float,
    labels: Sequence[str] | None = None,
) -> tuple[Tensor, float]:
    """EDM2's least squares: the coefficients x minimising || sum_i x_i p_i - p_r || for the
    profiles p_i (`progress[i]`, `gammas[i]`) and the requested p_r, in float64. Solved as the
    minimum-norm least-squares solution of the Gram system A x = b (SVD with a cut-off), which stays
    finite when two snapshots' profiles (nearly) coincide and keeps the coefficients, and so the
    rounding they multiply, small. Returns (x, relative profile error). A system that cannot be
    solved (a profile whose inner products are not finite numbers: progress 0, or so small that
    1 / progress overflows) raises a ValueError naming its sources by `labels` (default: their
    positions), before LAPACK sees it."""
    t = torch.tensor(list(progress), dtype=torch.float64)
    g = torch.tensor(list(gammas), dtype=torch.float64)
    t_r = torch.tensor([float(target_progress)], dtype=torch.float64)
    g_r = torch.tensor([float(target_gamma)], dtype=torch.float64)
    gram = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t[:, None], g[:, None], t_r[None, :], g_r[None, :])
    target = profile_inner(t_r, g_r, t_r, g_r)[0]
    labels = list(labels) if labels is not None else [f"source {i}" for i in range(len(t))]
    if not bool(target.isfinite() & (target > 0)):
        raise ValueError(
            f"swa_fast.posthoc: the requested profile at progress {float(target_progress)!r} has no finite "
            "norm: it needs a progress > 0, and not so small that 1 / progress overflows"
        )
    _check_solvable(gram, b, labels, t, g)
    x = _least_squares(gram, b, labels)
    residual = (x @ gram @ x - 2 * x @ b[:, 0] + target).clamp_min(0.0)
    return x, math.sqrt(float(residual / target))


def _check_solvable(gram: Tensor, b: Tensor, labels: list[str], t: Tensor, g: Tensor) -> None:
    """Raise a ValueError naming the sources whose inner products are not finite numbers (LAPACK
    fails, or asserts, on such a system)."""
    bad = (~gram.isfinite().all(dim=1) | ~b.isfinite().all(dim=1)).nonzero().flatten().tolist()
    if bad:
        described = ", ".join(f"{labels[i]} (progress {float(t[i])!r}, gamma {float(g[i]):.6g})" for i in bad)
        raise ValueError(
            f"swa_fast.posthoc: the least squares cannot be solved: the profiles of {described} have "
            "inner products that are not finite numbers (a snapshot needs a progress > 0, and not so "
            "small that 1 / progress overflows)"
        )


def _least_squares(gram: Tensor, b: Tensor, labels: list[str]) -> Tensor:
    """The minimum-norm least-squares solution of gram x = b, or a ValueError naming the sources
    when it has no finite one."""
    try:
        x = torch.linalg.lstsq(gram, b, driver="gelsd").solution[:, 0]
    except RuntimeError as error:  # the SVD did not converge
        raise _unsolvable(labels, str(error)) from error
    if not bool(x.isfinite().all()):
        raise _unsolvable(labels, "its solution is not finite")
    return x


def _unsolvable(labels: list[str], why: str) -> ValueError:
    return ValueError(
        f"swa_fast.posthoc: the least squares over the profiles of {', '.join(labels)} cannot be solved "
        f"({why}): their progress or gammas are too far apart to be combined"
    )
