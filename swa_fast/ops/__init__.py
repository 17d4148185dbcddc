"""The ops' public functions, and the op layer's names: the op table (table.py: OP_TABLE, one row
per op), backend choice (backends.py), the check of one op's call (`check`), `BoundOp`.

    lerp_(avg, src, weight)          avg += weight * (src - avg)
    moments_(mean, sq, src, weight)  mean += w (src - mean); sq += w (src^2 - sq)
    multi_lerp_(avgs, src, weights)  avgs[k] += weights[k] * (src - avgs[k]), K averages in one pass
    bema_(ema, out, start, src, weights)  ema += w0 (src - ema); out = ema + w1 (src - start)
    weighted_sum_(dst, srcs, weights)      dst = sum_k weights[k] * srcs[k]   (dst only written)
    copy_(dst, src)                  dst = src (cast; integer and bool tensors bit for bit, own dtype)
    swap_(a, b)                      a <-> b

Every op takes lists of tensors and updates them in place; each side may have its own dtype and
the arithmetic is done in fp32 (fp64 for fp64 destinations; weighted_sum_: where any of its lists
is fp64), with one rounding into the destination. `weight` is any real number (numpy scalars
included) or a 0-dim floating tensor on the destination's device (no host synchronisation,
CUDA-graph capturable) or on the CPU. A tensor
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

from . import checks, reference
from .backends import _C, BACKENDS, backend_status, choose_backend
from .backends import BUILD_INFO as BUILD_INFO
from .backends import ENV_BACKEND as ENV_BACKEND
from .backends import EXTENSION_ERROR as EXTENSION_ERROR
from .backends import usable_backends as usable_backends
from .rounding import StochasticRounding as StochasticRounding
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
    "weighted_sum_",
]

_run_lerp = runner(OP_TABLE["lerp_"])
_run_moments = runner(OP_TABLE["moments_"])
_run_multi_lerp = runner(OP_TABLE["multi_lerp_"])
_run_bema = runner(OP_TABLE["bema_"])
_run_weighted_sum = runner(OP_TABLE["weighted_sum_"])
_run_copy = runner(OP_TABLE["copy_"])
_run_swap = runner(OP_TABLE["swap_"])


def _rounded(
    weight: tuple, rounding: StochasticRounding | Tensor | str | None, src, stats: Tensor | None = None
) -> tuple:
    """The op's arguments after the lists: the weight, then `rounding` as the op takes it (a tensor
    of seed, step, stream and each index's first element) where it asks for stochastic rounding,
    then `stats` where it is given."""
    if rounding is None or (isinstance(rounding, str) and rounding == "nearest"):
        rounding = None
    elif isinstance(rounding, StochasticRounding):
        rounding = rounding.tensor(src)
    # else a tensor, or what the op's check refuses with its message
    if stats is not None:
        return (*weight, rounding, stats)
    return weight if rounding is None else (*weight, rounding)


def lerp_(
    avg: Sequence[Tensor],
    src: Sequence[Tensor],
    weight: Tensor | float,
    *,
    rounding: StochasticRounding | Tensor | None = None,
    stats: Tensor | None = None,
    backend: str | None = None,
) -> None:
    """avg[i] += weight * (src[i] - avg[i]) for every i, in place: SWA with weight 1/(n+1)
    (Izmailov et al. 2018), EMA with weight 1 - decay. Computed as torch.lerp (exact at weights 0
    and 1); weight 0 leaves avg untouched even where src is inf or NaN, weight 1 writes src even
    where avg is.

    `rounding`: None (or "nearest") rounds the fp32 result to nearest; a `StochasticRounding`
    (swa_fast.ops) rounds it stochastically into bf16 and fp16 averages (docs/low-precision.md).
    `stats`: None, or an int64 tensor [1, 4] on the tensors' device (`pass_stats.stats_tensor(1,
    device)`) to which the pass adds what it saw: elements written, unchanged, non-finite, and the
    largest |update| (swa_fast.ops.pass_stats), with no host synchronisation."""
    src = as_list(src)
    _run_lerp([avg, src], _rounded((weight,), rounding, src, stats), backend)


def moments_(
    mean: Sequence[Tensor],
    sq: Sequence[Tensor],
    src: Sequence[Tensor],
    weight: Tensor | float,
    *,
    rounding: StochasticRounding | Tensor | None = None,
    stats: Tensor | None = None,
    backend: str | None = None,
) -> None:
    """SWAG's running moments in one pass (Maddox et al. 2019):
    mean += w (src - mean), sq += w (src^2 - sq), src^2 taken in the arithmetic dtype. Weights 0
    and 1 behave as in lerp_ (1 writes src and src^2). `rounding` as in lerp_ (sq's stream is
    mean's + 1); `stats` as in lerp_, of shape [2, 4] (mean's row, then sq's)."""
    src = as_list(src)
    _run_moments([mean, sq, src], _rounded((weight,), rounding, src, stats), backend)


def _weight_values(weights) -> Tensor | list:
    """A vector of weights (multi_lerp_'s, bema_'s, weighted_sum_'s) as a tensor or a list (a
    generator or a numpy array read once)."""
    if isinstance(weights, Tensor):
        return weights
    if isinstance(weights, (str, bytes)):
        return weights  # refused by the op's check, with its message
    try:
        return list(weights)
    except TypeError:
        return weights  # not iterable: refused likewise


def _weight_count(weights: Tensor | list) -> int | None:
    """How many weights a vector holds, None where the op's check will refuse it."""
    if isinstance(weights, Tensor):
        return weights.shape[0] if weights.dim() == 1 else None
    return len(weights) if isinstance(weights, list) else None


def _concatenated(
    op: str, name: str, nested, count: int | None, each: str, first: tuple[str, int] | None = None
) -> list[Tensor] | tuple[Tensor, ...]:
    """The K lists of the op's argument `name` (multi_lerp_'s averages, weighted_sum_'s sources) as
    one list, k-major (as the op takes them); a list already concatenated passes as it is. `each`:
    what each list is, for the messages. `first`: the name and length of the list each of them must
    be as long as, where that is another argument (weighted_sum_'s dst)."""
    nested = as_list(nested)
    if not nested or isinstance(nested[0], Tensor):
        return nested
    lists = [as_list(lst) for lst in nested]
    if count is not None and len(lists) != count:
        raise ValueError(
            f"swa_fast.{op}: `{name}` has {len(lists)} lists but `weights` has {count} elements; "
            f"expected one {each} per weight"
        )
    like, length = first if first is not None else (f"{name}[0]", len(lists[0]))
    for k, lst in enumerate(lists):
        if len(lst) != length:
            raise ValueError(
                f"swa_fast.{op}: `{name}[{k}]` has {len(lst)} tensors but `{like}` has {length}; "
                "the lists must have equal lengths"
            )
    return list(itertools.chain.from_iterable(lists))


def multi_lerp_(
    avgs: Sequence[Sequence[Tensor]],
    src: Sequence[Tensor],
    weights: Tensor | Sequence[float],
    *,
    rounding: StochasticRounding | Tensor | None = None,
    stats: Tensor | None = None,
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
        rounding: as for lerp_; average k's stream is the first's + k.
        stats: as for lerp_, of shape [K, 4] (average k's row k).
        backend: as for lerp_.
    """
    weights = _weight_values(weights)
    count = _weight_count(weights)
    src = as_list(src)
    flat = _concatenated("multi_lerp_", "avgs", avgs, count, "list of averages")
    tail = _rounded((weights,), rounding, src, stats)
    if count is None or count <= checks.MAX_AVERAGES_PER_PASS:
        _run_multi_lerp([flat, src], tail, backend)
        return
    # More averages than one pass holds: the whole call is checked first, so that a bad one writes
    # nothing; a source that is one of the averages is read from a copy by the later passes.
    OP_TABLE["multi_lerp_"].check(flat, src, *tail, max_count=None)
    written = {a.data_ptr() for a in flat}
    src = [s.clone() if s.data_ptr() in written else s for s in src]
    n = len(src)
    for first in range(0, count, checks.MAX_AVERAGES_PER_PASS):
        last = min(first + checks.MAX_AVERAGES_PER_PASS, count)
        rounded = () if len(tail) == 1 else (_later_streams(tail[1], first),)
        if stats is not None:
            rounded = (rounded[0] if rounded else None, stats[first:last])
        _run_multi_lerp([flat[first * n : last * n], src], (weights[first:last], *rounded), backend)


def _later_streams(rounding: Tensor | None, by: int) -> Tensor | None:
    """A `rounding` tensor whose first written list's stream is `by` later (a later pass's averages)."""
    if rounding is None:
        return None
    out = rounding.clone()
    out[2] += by
    return out


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


def weighted_sum_(
    dst: Sequence[Tensor],
    srcs: Sequence[Sequence[Tensor]],
    weights: Tensor | Sequence[float],
    *,
    backend: str | None = None,
) -> None:
    """dst[i] = weights[0] * srcs[0][i] + ... + weights[K-1] * srcs[K-1][i] for every i, written
    into dst: K checkpoints merged in one pass (a uniform or weighted model soup, Wortsman et al.
    2022; LAWA's average of the last K checkpoints; task arithmetic, base + sum of scaled task
    vectors, as the base and each fine-tuned model with their weights).

    Each source element is read once; the terms are added in order k = 0..K-1 in fp32 (fp64 at an
    index where dst or any source is fp64), from the first term, and rounded once into dst's dtype
    (into bf16 or fp16 from an fp64 sum too: not through fp32, as torch's conversion rounds). dst
    is only written, never read: what it held does not matter (NaN included), but a source may be
    dst itself (the same tensor at its own index), read before it is written: weights (1, 0.5) over
    [[base], [delta]] with dst base updates it in place. A weight of 0 still reads its source (0 *
    inf is NaN). Any mix of fp32, bf16, fp16 and fp64 between dst and the sources, and between the
    sources at one index.

    The compiled op sums up to 8 lists of sources per call. More are summed in several calls with
    the same result: the whole call is checked first, then the first 8 lists are summed into an
    accumulator of the arithmetic dtype (dst itself where it already has that dtype, else a new
    tensor), each later call adds up to 7 more lists to it (given as its first source, of weight 1,
    which changes nothing), and the last one writes dst; a source that is dst itself is read from a
    copy taken first.

    Args:
        dst: the tensors written.
        srcs: K lists of sources, each as long as `dst` (or the K lists concatenated,
            srcs[k * len(dst) + i], as torch.ops.swa_fast.weighted_sum_ takes them).
        weights: K real numbers, or a 1-D floating tensor of K elements on the CPU (read on the
            host) or on the tensors' device (read by the kernels: no host synchronisation).
        backend: as for lerp_.
    """
    weights = _weight_values(weights)
    count = _weight_count(weights)
    dst = as_list(dst)
    flat = _concatenated("weighted_sum_", "srcs", srcs, count, "list of sources", ("dst", len(dst)))
    if count is None or count <= checks.MAX_SOURCES_PER_PASS:
        _run_weighted_sum([dst, flat], (weights,), backend)
        return
    _weighted_sum_in_passes(dst, flat, weights, count, backend)


def _weighted_sum_in_passes(
    dst: Sequence[Tensor], flat: Sequence[Tensor], weights: Tensor | list, count: int, backend: str | None
) -> None:
    """weighted_sum_ of more lists than one call of the op sums, in calls of at most
    MAX_SOURCES_PER_PASS lists, into accumulators of the arithmetic dtype (see weighted_sum_)."""
    OP_TABLE["weighted_sum_"].check(dst, flat, weights, max_count=None)
    n, per_pass = len(dst), checks.MAX_SOURCES_PER_PASS
    written = {d.data_ptr() for d in dst if d.numel()}
    flat = [s.clone() if s.numel() and s.data_ptr() in written else s for s in flat]
    acc = []
    for i, d in enumerate(dst):
        dtype = reference.sum_acc_dtype([d.dtype] + [flat[k * n + i].dtype for k in range(count)])
        acc.append(d if d.dtype == dtype else torch.empty(d.shape, dtype=dtype, device=d.device))
    _run_weighted_sum([acc, flat[: per_pass * n]], (weights[:per_pass],), backend)
    for first in range(per_pass, count, per_pass - 1):
        last = min(first + per_pass - 1, count)
        out = dst if last == count else acc
        _run_weighted_sum(
            [out, [*acc, *flat[first * n : last * n]]], (_with_one(weights[first:last]),), backend
        )


def _with_one(weights: Tensor | list) -> Tensor | list:
    """1, then these weights: the accumulator's weight before the next lists' (a tensor stays where
    it is)."""
    if isinstance(weights, Tensor):
        return torch.cat([torch.ones(1, dtype=weights.dtype, device=weights.device), weights])
    return [1.0, *weights]


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

    __slots__ = ("op", "device", "backend", "eager", "_public", "_arguments")

    def __init__(self, op: str, device: torch.device | str, backend: str | None = None) -> None:
        self.op, self.device, self.backend = op, torch.device(device), backend
        self._public = _BINDABLE[op]
        spec = OP_TABLE[op]
        self._arguments = len(spec.params) + spec.weighted  # before the optional `rounding`, `stats`
        try:
            chosen = choose_backend(self.device, backend)
        except (RuntimeError, ValueError):
            chosen = None  # the public function raises it at the call, as it always would
        self.eager = getattr(_C, op) if chosen in _COMPILED else None

    def __call__(self, *args) -> None:
        if self.eager is not None and not _is_compiling():
            self.eager(*args)
        elif len(args) > self._arguments:  # the public function takes `rounding`, `stats` by name
            tail = dict(zip(("rounding", "stats"), args[self._arguments :]))
            self._public(*args[: self._arguments], **tail, backend=self.backend)
        else:
            self._public(*args, backend=self.backend)

    def __reduce__(self):
        return BoundOp, (self.op, self.device, self.backend)
