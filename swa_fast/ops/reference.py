"""Naive per-parameter implementations of the ops: the oracle of the tests and the baseline of the
benchmarks. One Python iteration and a few PyTorch ops per tensor, arithmetic in fp32 (fp64 when
the destination is fp64), exactly the math of the ops' docstrings (swa_fast/ops/__init__.py). The
interpolation is torch.lerp's (exact at weights 0 and 1), except that weight 0 keeps the destination
even where the source is not finite and weight 1 writes the source even where the destination is
not."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in for a destination of `dtype`: fp32, fp64 for fp64; copy_'s
    integer and bool tensors are moved in their own."""
    if not dtype.is_floating_point:
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weight(weight: Tensor | float, like: Tensor) -> Tensor:
    """The weight as a 0-dim tensor in like's accumulation dtype, on its device."""
    if isinstance(weight, Tensor):
        return weight.to(device=like.device, dtype=acc_dtype(like.dtype))
    return torch.tensor(float(weight), dtype=acc_dtype(like.dtype), device=like.device)


def _read(t: Tensor, dtype: torch.dtype) -> Tensor:
    # torch's fp16 -> fp32 copy ignores a lazily negated view's sign bit: resolve it first.
    return t.resolve_neg().to(dtype)


def _lerp(start: Tensor, end: Tensor, weight: Tensor) -> Tensor:
    return torch.where(weight == 0, start, torch.where(weight == 1, end, torch.lerp(start, end, weight)))


@torch.no_grad()
def lerp_(avg: Sequence[Tensor], src: Sequence[Tensor], weight: Tensor | float) -> None:
    """avg += weight * (src - avg)   (SWA with weight 1/(n+1), EMA with 1 - decay)"""
    for a, s in zip(avg, src):
        acc = acc_dtype(a.dtype)
        a.copy_(_lerp(a.to(acc), _read(s, acc), _weight(weight, a)))


@torch.no_grad()
def moments_(
    mean: Sequence[Tensor], sq: Sequence[Tensor], src: Sequence[Tensor], weight: Tensor | float
) -> None:
    """mean += w (src - mean);  sq += w (src^2 - sq)   (SWAG, Maddox et al. 2019)"""
    for m, q, s in zip(mean, sq, src):
        acc = acc_dtype(m.dtype)
        x, w = _read(s, acc), _weight(weight, m)
        # Both computed before either is written: src may be mean or sq itself.
        new_mean, new_sq = _lerp(m.to(acc), x, w), _lerp(q.to(acc), x * x, w)
        m.copy_(new_mean)
        q.copy_(new_sq)


@torch.no_grad()
def multi_lerp_(avgs: Sequence[Tensor], src: Sequence[Tensor], weights: Tensor | Sequence[float]) -> None:
    """avgs[k * len(src) + i] += weights[k] * (src[i] - avgs[k * len(src) + i])   (K = len(weights)
    averages of one source, concatenated in `avgs`)"""
    n = len(src)
    for i, s in enumerate(src):
        # All K computed before any is written: src may be one of the averages itself.
        new = []
        for k in range(len(weights)):
            a = avgs[k * n + i]
            acc = acc_dtype(a.dtype)
            new.append(_lerp(a.to(acc), _read(s, acc), _weight(weights[k], a)))
        for k, value in enumerate(new):
            avgs[k * n + i].copy_(value)


@torch.no_grad()
def bema_(
    ema: Sequence[Tensor],
    out: Sequence[Tensor],
    start: Sequence[Tensor],
    src: Sequence[Tensor],
    weights: Tensor | Sequence[float],
) -> None:
    """ema += weights[0] * (src - ema);  out = ema + weights[1] * (src - start)   (BEMA, Block et al.
    2025: an EMA and its bias correction, from the weights at the start)"""
    for e, o, s0, s in zip(ema, out, start, src):
        acc = acc_dtype(e.dtype)
        x = _read(s, acc)
        new_ema = _lerp(e.to(acc), x, _weight(weights[0], e))
        new_out = new_ema + _weight(weights[1], e) * (x - _read(s0, acc))
        e.copy_(new_ema)
        o.copy_(new_out)


@torch.no_grad()
def copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """dst = src, cast to dst's dtype"""
    for d, s in zip(dst, src):
        d.copy_(s.resolve_neg())


@torch.no_grad()
def swap_(a: Sequence[Tensor], b: Sequence[Tensor]) -> None:
    """a <-> b"""
    for x, y in zip(a, b):
        tmp = x.clone()
        x.copy_(y)
        y.copy_(tmp)
