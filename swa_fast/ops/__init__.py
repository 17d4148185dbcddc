"""The ops' public functions, and the op layer's names: the op table (table.py: OP_TABLE, one row
per op), backend choice (backends.py), the check of one op's call (`check`), `BoundOp`.

    lerp_(avg, src, weight)          avg += weight * (src - avg)
    moments_(mean, sq, src, weight)  mean += w (src - mean); sq += w (src^2 - sq)
    multi_lerp_(avgs, src, weights)  avgs[k] += weights[k] * (src - avgs[k]), K averages in one pass
    bema_(ema, out, start, src, weights)  ema += w0 (src - ema); out = ema + w1 (src - start)
    copy_(dst, src)                  dst = src (cast; integer and bool tensors bit for bit, own dtype)
    swap_(a, b)                      a <-> b

Every op takes lists of tensors and updates them in place; each side may have its own dtype and
the arithmetic is done in fp32 (fp64 for fp64 destinations), with one rounding into the
destination. `weight` is any real number (numpy scalars included) or a 0-dim floating tensor on the
destination's device (no host synchronisation, CUDA-graph capturable) or on the CPU. A tensor
written in place must be contiguous and share no memory with another tensor of the call, except a
source that is its own destination (the same view at the same index); sources may be strided or
lazily negated views. Every backend follows this contract and raises the same ValueError before
writing anything when a call breaks it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from . import checks
from .backends import _C, BACKENDS, backend_status, choose_backend
from .backends import BUILD_INFO as BUILD_INFO
from .backends import ENV_BACKEND as ENV_BACKEND
from .backends import EXTENSION_ERROR as EXTENSION_ERROR
from .backends import usable_backends as usable_backends
from .runner import _COMPILED, _is_compiling, as_list, runner
from .table import OP_TABLE
from .table import OpSpec as OpSpec

# What `import swa_fast` exports of the op layer (swa_fast/__init__.py takes it as it is): the
# backend choice and one public function per op. The rest (OP_TABLE, BoundOp, check, ...) is
# swa_fast.ops'.
__all__ = [
    "BACKENDS",
    "backend_status",
    "bema_",
    "choose_backend",
    "copy_",
    "lerp_",
    "moments_",
    "multi_lerp_",
    "swap_",
]

_run_lerp = runner(OP_TABLE["lerp_"])
_run_moments = runner(OP_TABLE["moments_"])
_run_multi_lerp = runner(OP_TABLE["multi_lerp_"])
_run_bema = runner(OP_TABLE["bema_"])
_run_copy = runner(OP_TABLE["copy_"])
_run_swap = runner(OP_TABLE["swap_"])


def lerp_(
    avg: Sequence[Tensor], src: Sequence[Tensor], weight: Tensor | float, *, backend: str | None = None
) -> None:
    """avg[i] += weight * (src[i] - avg[i]) for every i, in place: SWA with weight 1/(n+1)
    (Izmailov et al. 2018), EMA with weight 1 - decay. Computed as torch.lerp (exact at weights 0
    and 1); weight 0 leaves avg untouched even where src is inf or NaN, weight 1 writes src even
    where avg is."""
    _run_lerp([avg, src], (weight,), backend)


def moments_(
    mean: Sequence[Tensor],
    sq: Sequence[Tensor],
    src: Sequence[Tensor],
    weight: Tensor | float,
    *,
    backend: str | None = None,
) -> None:
    """SWAG's running moments in one pass (Maddox et al. 2019):
    mean += w (src - mean), sq += w (src^2 - sq), src^2 taken in the arithmetic dtype. Weights 0
    and 1 behave as in lerp_ (1 writes src and src^2)."""
    _run_moments([mean, sq, src], (weight,), backend)


def _weight_values(weights) -> Tensor | list:
    """multi_lerp_'s weights as a tensor or a list (a generator or a numpy array read once)."""
    if isinstance(weights, Tensor):
        return weights
    if isinstance(weights, (str, bytes)):
        return weights  # refused by the op's check, with its message
    try:
        return list(weights)
    except TypeError:
        return weights  # not iterable: refused likewise


def _concatenated(avgs, count: int | None) -> list[Tensor] | tuple[Tensor, ...]:
    """The K lists of averages as one list, k-major (as the op takes them); a list already
    concatenated passes as it is."""
    avgs = as_list(avgs)
    if not avgs or isinstance(avgs[0], Tensor):
        return avgs
    lists = [as_list(lst) for lst in avgs]
    if count is not None and len(lists) != count:
        raise ValueError(
            f"swa_fast.multi_lerp_: `avgs` has {len(lists)} lists but `weights` has {count} elements; "
            "expected one list of averages per weight"
        )
    for k, lst in enumerate(lists):
        if len(lst) != len(lists[0]):
            raise ValueError(
                f"swa_fast.multi_lerp_: `avgs[{k}]` has {len(lst)} tensors but `avgs[0]` has "
                f"{len(lists[0])}; the lists must have equal lengths"
            )
    return list(itertools.chain.from_iterable(lists))


def multi_lerp_(
    avgs: Sequence[Sequence[Tensor]],
    src: Sequence[Tensor],
    weights: Tensor | Sequence[float],
    *,
    backend: str | None = None,
) -> None:
    """avgs[k][i] += weights[k] * (src[i] - avgs[k][i]) for every average k and every i, in one pass
    that reads each source element once: K EMAs of one model (post-hoc EMA, Karras et al. 2024)
    for the memory traffic of K + 1 tensors read and K written, instead of 2K read and K written.

    Each k is exactly lerp_(avgs[k], src, weights[k]): fp32 arithmetic (fp64 for fp64 averages),
    one rounding, weight 0 leaves that average untouched, weight 1 writes src. Each average may have
    its own dtype per tensor; the averages at one index are updated in one pass when they share a
    dtype, else one pass each.

    Args:
        avgs: K lists of averages, each as long as `src` (or the K lists concatenated,
            avgs[k * len(src) + i], as torch.ops.swa_fast.multi_lerp_ takes them).
        src: the tensors averaged.
        weights: K real numbers, or a 1-D floating tensor of K elements on the CPU (read on the
            host) or on the tensors' device (read by the kernels: no host synchronisation, CUDA-graph
            capturable). The compiled op updates up to 4 averages per pass; more are split into
            passes of at most 4 (each reading src again), after checking the whole call.
        backend: as for lerp_.
    """
    weights = _weight_values(weights)
    if isinstance(weights, Tensor):
        count = weights.shape[0] if weights.dim() == 1 else None
    else:
        count = len(weights) if isinstance(weights, list) else None
    src = as_list(src)
    flat = _concatenated(avgs, count)
    if count is None or count <= checks.MAX_AVERAGES_PER_PASS:
        _run_multi_lerp([flat, src], (weights,), backend)
        return
    # More averages than one pass holds: the whole call is checked first, so that a bad one writes
    # nothing; a source that is one of the averages is read from a copy by the later passes.
    OP_TABLE["multi_lerp_"].check(flat, src, weights, max_count=None)
    written = {a.data_ptr() for a in flat}
    src = [s.clone() if s.data_ptr() in written else s for s in src]
    n = len(src)
    for first in range(0, count, checks.MAX_AVERAGES_PER_PASS):
        last = min(first + checks.MAX_AVERAGES_PER_PASS, count)
        _run_multi_lerp([flat[first * n : last * n], src], (weights[first:last],), backend)


def bema_(
    ema: Sequence[Tensor],
    out: Sequence[Tensor],
    start: Sequence[Tensor],
    src: Sequence[Tensor],
    weights: Tensor | Sequence[float],
    *,
    backend: str | None = None,
) -> None:
    """BEMA's update in one pass (bias-corrected EMA, Block et al. 2025, arXiv 2508.00180):
    ema[i] += weights[0] * (src[i] - ema[i]), then out[i] = ema[i] + weights[1] * (src[i] - start[i]),
    reading src, the EMA and the starting weights once each.

    The EMA's update is exactly lerp_(ema, src, weights[0]) (weight 0 leaves it as it was, 1 writes
    src); `out` is written at every call, in the EMA's arithmetic dtype and rounded once.

    Args:
        ema: the EMA, updated in place.
        out: the bias-corrected weights, written (the EMA's dtype at each index).
        start: the weights at the start (the EMA's dtype at each index), read.
        src: the model's tensors now, read (any floating dtype).
        weights: (ema_weight, correction): two real numbers, or a 1-D floating tensor of two
            elements on the CPU or on the tensors' device (read by the kernels: no host
            synchronisation).
        backend: as for lerp_.
    """
    _run_bema([ema, out, start, src], (_weight_values(weights),), backend)


def copy_(dst: Sequence[Tensor], src: Sequence[Tensor], *, backend: str | None = None) -> None:
    """dst[i] = src[i], cast to dst[i]'s dtype: load or save a snapshot in one pass. Integer and
    bool tensors (a model's `num_batches_tracked`) are copied too, bit for bit, each from a tensor
    of its own dtype."""
    _run_copy([dst, src], (), backend)


def swap_(a: Sequence[Tensor], b: Sequence[Tensor], *, backend: str | None = None) -> None:
    """Exchange the contents of a[i] and b[i] (same dtypes): apply an average and restore."""
    _run_swap([a, b], (), backend)


def check(op: str, *args) -> None:
    """Raises the ValueError the op `op` (its name: "lerp_", ...) would raise for these arguments,
    the op's lists then its weight as it takes them, and returns None if it would run: for a
    caller that checks several calls before making any, so that a bad one writes nothing."""
    OP_TABLE[op].check(*args)


# The drop-in AveragedModel's eager update in one call to the extension (None without it):
# `eager_lerp_then_copy(avg, src, weight, dst, copy_src)` runs lerp_, then copy_ (the model's
# buffers), each checked before it writes, for less than two calls cost. A lerp_ refused raises;
# a copy_ refused returns False (the lerp_ done), True when both ran. Kept: the drop-in's update on
# a small model is its bare op plus little else (docs/benchmarks.md, "Measured costs behind design
# choices").
eager_lerp_then_copy = getattr(_C, "lerp_then_copy_", None)

_BINDABLE = {"lerp_": lerp_, "moments_": moments_, "bema_": bema_, "copy_": copy_, "swap_": swap_}


class BoundOp:
    """`op` (lerp_, moments_, bema_, copy_ or swap_) for a caller that runs it on every update with lists
    of one device it already holds (a manager's flat buffers): the backend is chosen once, here,
    and each call goes straight to the extension's entry point, as the public function does after
    choosing it per call (which costs a noticeable part of a small model's op). Same contract,
    same checks before writing. Under torch.compile, or on a backend outside the extension, a call is
    the public function's. Takes lists or tuples. Pickles as its arguments.

    `eager` is the extension's entry point itself (None on a backend outside it): a caller that
    makes several calls in one update asks `torch.compiler.is_compiling()` once and, when it is
    False, calls `eager` straight (a call through the BoundOp costs more)."""

    __slots__ = ("op", "device", "backend", "eager", "_public")

    def __init__(self, op: str, device: torch.device | str, backend: str | None = None) -> None:
        self.op, self.device, self.backend = op, torch.device(device), backend
        self._public = _BINDABLE[op]
        try:
            chosen = choose_backend(self.device, backend)
        except (RuntimeError, ValueError):
            chosen = None  # the public function raises it at the call, as it always would
        self.eager = getattr(_C, op) if chosen in _COMPILED else None

    def __call__(self, *args) -> None:
        if self.eager is not None and not _is_compiling():
            self.eager(*args)
        else:
            self._public(*args, backend=self.backend)

    def __reduce__(self):
        return BoundOp, (self.op, self.device, self.backend)
