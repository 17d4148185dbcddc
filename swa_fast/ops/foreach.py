"""The torch._foreach_* fallback of every op, made from its row: each list the op writes is moved
towards its target by the weight, or set to it when the op takes no weight (OpSpec.targets). It
runs wherever PyTorch does.

The same contract as the kernels: arithmetic in each destination's accumulation dtype (fp32, fp64
for fp64), the weight rounded to it first, one rounding into the destination; every target read
before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import pass_stats, reference
from .rounding import StochasticRounding

if TYPE_CHECKING:
    from .table import OpSpec


def fallback(spec: OpSpec) -> Callable[..., None]:
    """spec's op on torch._foreach_*, called as the op is, on arguments already checked."""
    n_lists = len(spec.params)
    targets_of, weight = spec.targets, spec.weight

    def run(*args) -> None:
        # the optional `rounding` and `stats` after the weight (rows with rounds)
        rounding, stats = (*args[n_lists + 1 :], None, None)[:2]
        args = args[: n_lists + 1]
        lists = spec.kernel_lists(*args)
        n_written = spec.kernel_written(*args)  # multi_lerp_ writes K lists
        written, read = lists[:n_written], lists[n_written:]
        if weight is None:
            for dst, target in zip(written, _read_before_writes(targets_of(*lists), written)):
                torch._foreach_copy_(dst, [t.resolve_neg() for t in target])
            return
        given = args[n_lists:] if weight.targets_take_weights else ()
        targets = _read_before_writes(_targets_in_acc(targets_of, written, read, given), written)
        weights = weight.each(args[n_lists], n_written)
        if rounding is not None or stats is not None:
            key = StochasticRounding.of(rounding) if rounding is not None else None
            _lerp_each(written, targets, weights, key, stats)
            return
        for dst, target, w in zip(written, targets, weights):
            _lerp_into(dst, target, w)

    run.__name__ = run.__qualname__ = f"foreach_{spec.name}"
    return run


def _lerp_each(
    written: list,
    targets: list[list[Tensor]],
    weights: list,
    key: StochasticRounding | None,
    stats: Tensor | None,
) -> None:
    """Each written list j moved towards its target by its weight, in new tensors of the
    accumulation dtype, then stored tensor by tensor: with stochastic rounding (written list j's
    stream) when `key` is given, else to nearest; what each write did added to row j of `stats`."""
    for j, (dst, target, w) in enumerate(zip(written, targets, weights)):
        if not isinstance(w, Tensor) and float(w) == 0:  # (as the kernels, weight 0 writes nothing)
            continue
        for i, (d, value) in enumerate(zip(dst, lerped(dst, target, w, exact=key is not None))):
            old = d.clone() if stats is not None else None
            if key is None:
                d.copy_(value)
            else:
                key.store(d, value, i, j)
            if stats is not None:  # a weight on the device counts where it is not 0, with no sync
                counted = w != 0 if isinstance(w, Tensor) else None
                pass_stats.record(stats[j], old, value, d, counted)


def weighted_sum(dst: Sequence[Tensor], srcs: Sequence[Tensor], weights: Tensor | Sequence[float]) -> None:
    """weighted_sum_'s fallback, its own rather than one made from its row: its dst is set to a sum
    added in the dtype of every list at an index (fp64 where any source is, even for an fp32 dst),
    where a row's targets are computed from sources already cast to the written list's dtype.
    Called as the op is, on arguments already checked. Each index's terms are added in order from the
    first, in new tensors, and dst is written last (a source may be dst itself)."""
    n = len(dst)
    lists = [srcs[k * n : (k + 1) * n] for k in range(len(weights))]
    groups: dict[torch.dtype, list[int]] = {}
    for i, d in enumerate(dst):
        dtypes = [d.dtype] + [lst[i].dtype for lst in lists]
        groups.setdefault(reference.sum_acc_dtype(dtypes), []).append(i)
    for acc, indices in groups.items():
        w = _weights_in(weights, acc)
        total = torch._foreach_mul(_cast([lists[0][i] for i in indices], acc), w[0])
        for k in range(1, len(lists)):
            torch._foreach_add_(total, torch._foreach_mul(_cast([lists[k][i] for i in indices], acc), w[k]))
        out = [dst[i] for i in indices]
        torch._foreach_copy_(out, [reference.rounded_once(t, d.dtype) for t, d in zip(total, out)])


def _weights_in(weights: Tensor | Sequence[float], acc: torch.dtype) -> list:
    """Each weight as the kernels read it, rounded to `acc`: a number, or a 0-dim tensor of the
    device's (no host synchronisation)."""
    if isinstance(weights, Tensor) and weights.device.type != "cpu":
        return list(weights.to(acc).unbind())
    values = weights.tolist() if isinstance(weights, Tensor) else [float(w) for w in weights]
    return [v if acc == torch.float64 else torch.tensor(v, dtype=acc).item() for v in values]


def _cast(tensors: list[Tensor], acc: torch.dtype) -> list[Tensor]:
    """The tensors in `acc`: themselves where they already are (_foreach_mul makes new ones), else a
    copy (which also resolves a lazily negated view)."""
    return [t if t.dtype == acc and not t.is_neg() else t.resolve_neg().to(acc) for t in tensors]


def _targets_in_acc(
    targets_of: Callable[..., list], written: list, read: list, weights: tuple = ()
) -> list[list[Tensor]]:
    """Each written list's target, from the lists read in that list's accumulation dtypes (cast
    once per distinct dtypes, whatever the number of written lists), all before anything is
    written; `weights`: the op's, for targets that depend on them (bema_'s)."""
    if len(written) == 1:
        return targets_of(*written, *(_in_acc(r, written[0]) for r in read), *weights)
    computed: dict[tuple[torch.dtype, ...], list[list[Tensor]]] = {}
    out = []
    for j, dst in enumerate(written):
        key = tuple(reference.acc_dtype(t.dtype) for t in dst)
        if key not in computed:
            computed[key] = targets_of(*written, *(_in_acc(r, dst) for r in read), *weights)
        out.append(computed[key][j])
    return out


def _read_before_writes(targets: list[list[Tensor]], written: list) -> list[list[Tensor]]:
    """targets[j], with each tensor that is a tensor of a list written before written[j] read from
    a copy taken now, before anything is written: swap_'s `a` (the target of `b`), a source that is
    one of multi_lerp_'s averages. (The checks allow no other sharing of memory.)"""
    if len(written) == 1:
        return targets
    earlier: set[int] = set()  # the data of the lists written before this one
    copies: dict[int, Tensor] = {}  # one copy per tensor, whatever the number of lists reading it
    out = []
    for dst, target in zip(written, targets):
        if earlier:
            target = [_copy_once(t, copies) if t.data_ptr() in earlier else t for t in target]
        out.append(target)
        earlier.update(t.data_ptr() for t in dst if t.numel())
    return out


def _copy_once(t: Tensor, copies: dict[int, Tensor]) -> Tensor:
    if id(t) not in copies:
        copies[id(t)] = t.clone()
    return copies[id(t)]


def _in_acc(tensors: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """tensors[i] in like[i]'s accumulation dtype: itself where it already is, else a copy (which
    also resolves a lazily negated view)."""
    out = []
    for t, d in zip(tensors, like):
        acc = reference.acc_dtype(d.dtype)
        out.append(t if t.dtype == acc and not t.is_neg() else t.resolve_neg().to(acc))
    return out


def _by_dtype(dst: list[Tensor], end: list[Tensor]) -> list[tuple[torch.dtype, list[Tensor], list[Tensor]]]:
    """(dtype, dst part, end part) for each dtype of `end`: the lists themselves when there is one."""
    dtypes = {e.dtype for e in end}
    if len(dtypes) == 1:
        return [(dtypes.pop(), dst, end)]
    return [
        (dtype, [d for d, e in zip(dst, end) if e.dtype == dtype], [e for e in end if e.dtype == dtype])
        for dtype in dtypes
    ]


def lerped(
    start: list[Tensor], end: list[Tensor], weight: Tensor | float, exact: bool = False
) -> list[Tensor]:
    """lerp(start[i], end[i], weight) in start's accumulation dtype, as new tensors (end already in
    it): weight 0 gives start and weight 1 gives end, whatever the other holds. `exact`: each value
    the kernels' one fused multiply-add rounded once (reference.lerp_value), which stochastic
    rounding stores alike on every backend."""
    if exact:
        return [
            reference.lerp_value(s.to(e.dtype), e, reference.weight_as(weight, s), True)
            for s, e in zip(start, end)
        ]
    start = [s.to(reference.acc_dtype(s.dtype), copy=True) for s in start]
    _lerp_into(start, end, weight)
    return start


def _lerp_into(dst: list[Tensor], end: list[Tensor], weight: Tensor | float) -> None:
    """dst[i] = lerp(dst[i], end[i], weight), end in dst's accumulation dtype: weight 0 keeps dst and
    weight 1 writes end, whatever either holds."""
    if isinstance(weight, Tensor) and weight.device.type != "cpu":
        # A device weight decides on the device: no host synchronisation.
        weights = {dtype: weight.to(dtype) for dtype in {e.dtype for e in end}}
        for d, e in zip(dst, end):
            w, start = weights[e.dtype], d.to(e.dtype)
            d.copy_(torch.where(w == 0, start, torch.where(w == 1, e, torch.lerp(start, e, w))))
        return
    value = weight.item() if isinstance(weight, Tensor) else float(weight)
    for acc, dst_part, end_part in _by_dtype(dst, end):
        # The weight as the kernels see it: rounded to the accumulation dtype first (a subnormal
        # float64 weight is 0 in float32).
        w = value if acc == torch.float64 else torch.tensor(value, dtype=acc).item()
        if w == 1:
            torch._foreach_copy_(dst_part, end_part)
        elif w != 0:
            start = _in_acc(dst_part, dst_part)  # temporaries where dst is bf16/fp16
            torch._foreach_lerp_(start, end_part, w)
            rounded = [(d, s) for d, s in zip(dst_part, start) if s is not d]
            if rounded:
                torch._foreach_copy_([d for d, _ in rounded], [s for _, s in rounded])
