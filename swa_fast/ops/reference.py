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

from . import pass_stats
from .rounding import StochasticRounding


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in for a destination of `dtype`: fp32, fp64 for fp64; copy_'s
    integer and bool tensors are moved in their own."""
    if not dtype.is_floating_point:
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_as(weight: Tensor | float, like: Tensor) -> Tensor:
    """The weight as a 0-dim tensor in like's accumulation dtype, on its device."""
    if isinstance(weight, Tensor):
        return weight.to(device=like.device, dtype=acc_dtype(like.dtype))
    return torch.tensor(float(weight), dtype=acc_dtype(like.dtype), device=like.device)


def _read(t: Tensor, dtype: torch.dtype) -> Tensor:
    # torch's fp16 -> fp32 copy ignores a lazily negated view's sign bit: resolve it first.
    return t.resolve_neg().to(dtype)


def lerp_value(start: Tensor, end: Tensor, weight: Tensor, exact: bool = False) -> Tensor:
    """torch.lerp(start, end, weight), except that weight 0 gives start and weight 1 gives end
    whatever the other holds. `exact`: an fp32 value is the kernels' one fused multiply-add,
    (weight - 1 or weight) * (end - start) + (end or start), rounded once, rather than what torch's
    kernel of the moment computes (fused in its AVX2 and AVX-512 code, not in its default code):
    the value that stochastic rounding stores the same on every backend (rounding.py)."""
    if exact and start.dtype == torch.float32:
        upper = ~((weight < 0.5) & (weight > -0.5))  # torch.lerp's side: |weight| >= 0.5
        mixed = fma(torch.where(upper, weight - 1, weight), end - start, torch.where(upper, end, start))
    else:
        mixed = torch.lerp(start, end, weight)
    return torch.where(weight == 0, start, torch.where(weight == 1, end, mixed))


def fma(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """a * b + c rounded once, for fp32 tensors (broadcast), as a fused multiply-add instruction
    gives it, on any CPU. In fp64 the product is exact (24 + 24 bits); the sum's rounding error comes
    exactly from Two-Sum (Knuth), and where it is not 0 the sum is rounded to odd instead (its last
    bit set by a step towards the exact value), which then rounds to fp32 correctly, since fp64 has
    at least 24 + 2 bits (Boldo and Melquiond, IEEE Trans. Computers 2008). (triton_jit._fma writes
    the same steps in Triton for the interpreter.)"""
    product, addend = a.double() * b.double(), c.double()
    total = product + addend
    back = total - product
    error = (product - (total - back)) + (addend - back)
    bits = total.view(torch.int64)
    to_odd = (error != 0) & ((bits & 1) == 0) & total.isfinite()  # (not finite: no error to keep)
    away_from_zero = (error > 0) == (total > 0)
    stepped = (bits + torch.where(away_from_zero, 1, -1)).view(torch.float64)
    return torch.where(to_odd, stepped, total).float()


def _store(
    dst: Tensor,
    value: Tensor,
    rounding: Tensor | None,
    i: int,
    written_list: int,
    stats: Tensor | None = None,
) -> None:
    """dst (index i of the call's written list `written_list`) set to value: rounded to nearest, or
    stochastically into bf16/fp16 by the op's `rounding` (rounding.py); what the write did added to
    that list's row of `stats` (pass_stats.py)."""
    old = dst.clone() if stats is not None else None
    if rounding is None:
        dst.copy_(value)
    else:
        StochasticRounding.of(rounding).store(dst, value, i, written_list)
    if stats is not None:
        pass_stats.record(stats[written_list], old, value, dst)


def _skipped(weight: Tensor) -> bool:
    """Whether weight 0 leaves a tensor unwritten, as the kernels do (its NaN payloads, its random
    bits and its stats unchanged)."""
    return bool(weight == 0)


@torch.no_grad()
def lerp_(
    avg: Sequence[Tensor],
    src: Sequence[Tensor],
    weight: Tensor | float,
    rounding: Tensor | None = None,
    stats: Tensor | None = None,
) -> None:
    """avg += weight * (src - avg)   (SWA with weight 1/(n+1), EMA with 1 - decay)"""
    for i, (a, s) in enumerate(zip(avg, src)):
        acc = acc_dtype(a.dtype)
        w = weight_as(weight, a)
        if not _skipped(w):
            _store(a, lerp_value(a.to(acc), _read(s, acc), w, rounding is not None), rounding, i, 0, stats)


@torch.no_grad()
def moments_(
    mean: Sequence[Tensor],
    sq: Sequence[Tensor],
    src: Sequence[Tensor],
    weight: Tensor | float,
    rounding: Tensor | None = None,
    stats: Tensor | None = None,
) -> None:
    """mean += w (src - mean);  sq += w (src^2 - sq)   (SWAG, Maddox et al. 2019)"""
    for i, (m, q, s) in enumerate(zip(mean, sq, src)):
        acc = acc_dtype(m.dtype)
        x, w = _read(s, acc), weight_as(weight, m)
        if _skipped(w):
            continue
        # Both computed before either is written: src may be mean or sq itself.
        exact = rounding is not None
        new_mean, new_sq = lerp_value(m.to(acc), x, w, exact), lerp_value(q.to(acc), x * x, w, exact)
        _store(m, new_mean, rounding, i, 0, stats)
        _store(q, new_sq, rounding, i, 1, stats)


@torch.no_grad()
def multi_lerp_(
    avgs: Sequence[Tensor],
    src: Sequence[Tensor],
    weights: Tensor | Sequence[float],
    rounding: Tensor | None = None,
    stats: Tensor | None = None,
) -> None:
    """avgs[k * len(src) + i] += weights[k] * (src[i] - avgs[k * len(src) + i])   (K = len(weights)
    averages of one source, concatenated in `avgs`)"""
    n = len(src)
    for i, s in enumerate(src):
        # All K computed before any is written: src may be one of the averages itself.
        new = []
        for k in range(len(weights)):
            a = avgs[k * n + i]
            acc = acc_dtype(a.dtype)
            w = weight_as(weights[k], a)
            new.append(None if _skipped(w) else lerp_value(a.to(acc), _read(s, acc), w, rounding is not None))
        for k, value in enumerate(new):
            if value is not None:
                _store(avgs[k * n + i], value, rounding, i, k, stats)


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
        new_ema = lerp_value(e.to(acc), x, weight_as(weights[0], e))
        new_out = new_ema + weight_as(weights[1], e) * (x - _read(s0, acc))
        e.copy_(new_ema)
        o.copy_(new_out)


def sum_acc_dtype(dtypes) -> torch.dtype:
    """The dtype weighted_sum_ adds in at one index, from the dtypes of dst and its sources there:
    fp64 when any is fp64, else fp32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def rounded_once(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x, to be rounded into `dtype` by a copy, such that the copy rounds it once: an fp64 x bound
    for bf16 or fp16 is first rounded to fp32 to odd (towards zero, the last bit set where that
    dropped anything), since torch's conversion goes through fp32 to nearest and can round twice
    (1 + 2^-8 + 2^-40 to the tie 1 + 2^-8, then to 1)."""
    if x.dtype != torch.float64 or dtype not in (torch.float16, torch.bfloat16):
        return x
    nearest = x.to(torch.float32)
    back = nearest.double()
    inexact = (back != x) & ~x.isnan()
    away = torch.where(x > 0, back > x, back < x) & inexact  # rounded away from zero
    bits = nearest.view(torch.int32) - away.to(torch.int32)
    return torch.where(inexact, bits | 1, bits).view(torch.float32)


@torch.no_grad()
def weighted_sum_(dst: Sequence[Tensor], srcs: Sequence[Tensor], weights: Tensor | Sequence[float]) -> None:
    """dst[i] = sum_k weights[k] * srcs[k * len(dst) + i]   (K = len(weights) lists of sources,
    concatenated in `srcs`; dst only written), added in order from the first term, rounded once"""
    n = len(dst)
    for i, d in enumerate(dst):
        sources = [srcs[k * n + i] for k in range(len(weights))]
        acc = sum_acc_dtype([d.dtype] + [s.dtype for s in sources])
        like = torch.empty(0, dtype=acc, device=d.device)
        total = weight_as(weights[0], like) * _read(sources[0], acc)
        for k in range(1, len(sources)):
            total = total + weight_as(weights[k], like) * _read(sources[k], acc)
        d.copy_(rounded_once(total, d.dtype))  # (every source read first: a source may be dst itself)


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
