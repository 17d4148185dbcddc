"""Argument checks for the Python backends (Triton, foreach, reference).

They mirror csrc/multi_tensor.h word for word, so every backend rejects the same calls with the
same message, before anything is written.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# What copy_ also moves, bit for bit, between tensors of one dtype (csrc/multi_tensor.h:
# is_supported_integer)
INTEGER_DTYPES = (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
    torch.uint64,
)
_CPU = torch.device("cpu")


class ListArg(NamedTuple):
    """One list argument of an op, as csrc/multi_tensor.h's ListArg."""

    name: str
    tensors: Sequence[Tensor]
    written: bool  # written in place: must be contiguous, and share no memory
    same_dtype: bool = False  # must have the first list's dtype at every index
    # may also hold integer and bool tensors (copy_), each with the first list's dtype at its index
    integers: bool = False


class _Span(NamedTuple):
    begin: int
    end: int
    list: int
    index: int
    written: bool


def _span(t: Tensor, k: int, i: int, written: bool) -> _Span:
    """From the first element of the non-empty tensor `t` to one past the last byte its elements
    touch."""
    elements = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    begin = t.data_ptr()
    return _Span(begin, begin + elements * t.element_size(), k, i, written)


def _is_own_destination(t: Tensor, written_here: list[Tensor]) -> bool:
    """Whether the read tensor `t` is the same view as a tensor written at its index: the one
    sharing of memory allowed (an average updated from itself)."""
    return (
        t.is_contiguous()
        and not t.is_neg()
        and any(w.data_ptr() == t.data_ptr() and w.dtype == t.dtype for w in written_here)
    )


def check_no_overlap(op: str, lists: Sequence[ListArg]) -> None:
    """A tensor written in place shares no byte with another tensor of the call, except a read
    tensor at its own index that is the same view. The first offending pair in the order of their
    starts is named, as csrc/multi_tensor.h's raise_overlap does. One sort: no pairwise loop."""
    spans = []
    for k, arg in enumerate(lists):
        for i, t in enumerate(arg.tensors):
            if t.numel() == 0:
                continue
            if not arg.written and _is_own_destination(t, [w.tensors[i] for w in lists if w.written]):
                continue
            spans.append(_span(t, k, i, arg.written))
    any_end = written_end = None  # the spans reaching furthest so far: of all, of the written ones
    for s in sorted(spans, key=lambda s: s.begin):
        other = any_end if s.written else written_end
        if other is not None and other.end > s.begin:
            a, b = sorted((other, s), key=lambda x: (x.list, x.index))
            raise ValueError(
                f"swa_fast.{op}: `{lists[a.list].name}[{a.index}]` and `{lists[b.list].name}[{b.index}]` "
                "overlap in memory; a tensor written in place must not share memory with another tensor "
                "of the call (a source may only be its own destination, the same view at the same index)"
            )
        if any_end is None or s.end > any_end.end:
            any_end = s
        if s.written and (written_end is None or s.end > written_end.end):
            written_end = s


def check_lists(op: str, lists: Sequence[ListArg]) -> None:
    """Checks in csrc/multi_tensor.h's order: list lengths, then index by index, list by list."""
    first = lists[0]
    for arg in lists:
        if len(arg.tensors) != len(first.tensors):
            raise ValueError(
                f"swa_fast.{op}: `{arg.name}` has {len(arg.tensors)} tensors but `{first.name}` has "
                f"{len(first.tensors)}; the lists must have equal lengths"
            )
    if not first.tensors:
        return
    device = first.tensors[0].device
    # Traced code (torch.compile) and fake tensors have no memory to compare or sign bits to read:
    # the op's own body checks those on the real tensors.
    has_memory = (
        not torch.compiler.is_compiling()
        and device.type != "meta"
        and not isinstance(first.tensors[0], FakeTensor)
    )
    for i, ref in enumerate(first.tensors):
        for name, tensors, written, same_dtype, integers in lists:
            t = tensors[i]
            if not isinstance(t, Tensor):
                raise ValueError(f"swa_fast.{op}: `{name}[{i}]` is a {type(t).__name__}, expected a Tensor")
            if t.layout != torch.strided:
                raise ValueError(
                    f"swa_fast.{op}: `{name}[{i}]` has layout {t.layout}; expected a strided (dense) tensor"
                )
            if t.dtype not in FLOAT_DTYPES and not (integers and t.dtype in INTEGER_DTYPES):
                expected = "float32, float64, float16 or bfloat16"
                if integers:
                    expected = "float32, float64, float16, bfloat16, or an integer or bool dtype"
                raise ValueError(f"swa_fast.{op}: `{name}[{i}]` has dtype {t.dtype}; expected {expected}")
            if t.device != device:
                raise ValueError(
                    f"swa_fast.{op}: `{name}[{i}]` is on {t.device} but `{first.name}[0]` is on {device}; "
                    "all tensors of one call must be on one device"
                )
            if t.shape != ref.shape:
                raise ValueError(
                    f"swa_fast.{op}: `{name}[{i}]` has shape {list(t.shape)} but `{first.name}[{i}]` "
                    f"has shape {list(ref.shape)}"
                )
            if written and not t.is_contiguous():
                raise ValueError(
                    f"swa_fast.{op}: `{name}[{i}]` is written in place and must be contiguous "
                    f"(got strides {list(t.stride())} for shape {list(t.shape)})"
                )
            if written and has_memory and t.is_neg():
                raise ValueError(
                    f"swa_fast.{op}: `{name}[{i}]` is written in place and must not be a negated view "
                    "(is_neg()); write into the tensor it views"
                )
            if same_dtype and t.dtype != ref.dtype:
                raise ValueError(
                    f"swa_fast.{op}: `{name}[{i}]` has dtype {t.dtype} but `{first.name}[{i}]` has dtype "
                    f"{ref.dtype}; both sides must have the same dtype"
                )
            both_floating = t.dtype in FLOAT_DTYPES and ref.dtype in FLOAT_DTYPES
            if integers and t.dtype != ref.dtype and not both_floating:
                raise ValueError(
                    f"swa_fast.{op}: `{name}[{i}]` has dtype {t.dtype} but `{first.name}[{i}]` has dtype "
                    f"{ref.dtype}; an integer or bool tensor is copied only to and from its own dtype"
                )
    if has_memory:
        check_no_overlap(op, lists)


def check_weight(op: str, weight: Tensor | float, device: torch.device) -> None:
    """Any real number (numpy's included), or a 0-dim floating tensor of any floating dtype on
    `device` or on the CPU."""
    if not isinstance(weight, Tensor):
        if not isinstance(weight, numbers.Real):
            raise ValueError(
                f"swa_fast.{op}: `weight` must be a real number or a 0-dim floating-point tensor, "
                f"got {type(weight).__name__}"
            )
        return
    if weight.dim() != 0:
        raise ValueError(f"swa_fast.{op}: `weight` must be a 0-dim tensor, got shape {list(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"swa_fast.{op}: `weight` must be a floating-point tensor, got {weight.dtype}")
    if weight.device != device and weight.device.type != "cpu":
        raise ValueError(
            f"swa_fast.{op}: `weight` is on {weight.device} but the tensors are on {device}; "
            f"pass it on {device} (or on the CPU)"
        )


def check_lerp(avg, src, weight) -> None:
    check_lists("lerp_", [ListArg("avg", avg, True), ListArg("src", src, False)])
    if avg:
        check_weight("lerp_", weight, avg[0].device)


def check_moments(mean, sq, src, weight) -> None:
    check_lists(
        "moments_", [ListArg("mean", mean, True), ListArg("sq", sq, True, True), ListArg("src", src, False)]
    )
    if mean:
        check_weight("moments_", weight, mean[0].device)


# Averages one call of the compiled op updates (csrc/ops_impl.h); swa_fast.multi_lerp_ splits more.
MAX_AVERAGES_PER_PASS = 4


def check_weights(weights: Tensor | Sequence, max_count: int | None = MAX_AVERAGES_PER_PASS) -> int:
    """multi_lerp_'s weights: a sequence of real numbers, or a 1-D floating tensor (its device is
    checked with the lists). Returns their count K, 1 to `max_count` (None: no upper bound)."""
    op = "multi_lerp_"
    if isinstance(weights, Tensor):
        if not weights.is_floating_point():
            raise ValueError(f"swa_fast.{op}: `weights` must be a floating-point tensor, got {weights.dtype}")
        if weights.dim() != 1:
            raise ValueError(
                f"swa_fast.{op}: `weights` must be a 1-D tensor (one weight per average), "
                f"got shape {list(weights.shape)}"
            )
        count = weights.shape[0]
    else:
        try:  # any iterable but a string, as the compiled entry point takes it
            values = None if isinstance(weights, (str, bytes)) else list(weights)
        except TypeError:
            values = None
        if values is None:
            raise ValueError(
                f"swa_fast.{op}: `weights` must be a sequence of real numbers or a 1-D floating-point "
                f"tensor, got {type(weights).__name__}"
            )
        for k, w in enumerate(values):
            if not isinstance(w, numbers.Real):
                raise ValueError(
                    f"swa_fast.{op}: `weights[{k}]` must be a real number, got {type(w).__name__}"
                )
        count = len(values)
    if count < 1 or (max_count is not None and count > max_count):
        raise ValueError(
            f"swa_fast.{op}: `weights` has {count} elements; the op updates 1 to {MAX_AVERAGES_PER_PASS} "
            "averages per call (swa_fast.multi_lerp_ splits more into several calls)"
        )
    return count


def average_lists(avgs: Sequence[Tensor], count: int) -> list[ListArg]:
    """The `count` lists of averages concatenated in `avgs`, as ListArgs named avgs[k]."""
    if len(avgs) % count:
        raise ValueError(
            f"swa_fast.multi_lerp_: `avgs` has {len(avgs)} tensors, which is not a multiple of the {count} "
            "weights; expected one list of averages per weight, concatenated"
        )
    n = len(avgs) // count
    return [ListArg(f"avgs[{k}]", avgs[k * n : (k + 1) * n], True) for k in range(count)]


def check_multi_lerp(avgs, src, weights, max_count: int | None = MAX_AVERAGES_PER_PASS) -> None:
    """avgs: the K lists of averages concatenated (avgs[k * len(src) + i]), K = len(weights)."""
    lists = average_lists(avgs, check_weights(weights, max_count))
    check_lists("multi_lerp_", [*lists, ListArg("src", src, False)])
    device = avgs[0].device if avgs else None
    if isinstance(weights, Tensor) and device is not None and weights.device not in (device, _CPU):
        raise ValueError(
            f"swa_fast.multi_lerp_: `weights` is on {weights.device} but the tensors are on {device}; "
            f"pass them on {device} (or on the CPU)"
        )


def check_copy(dst, src) -> None:
    check_lists(
        "copy_", [ListArg("dst", dst, True, integers=True), ListArg("src", src, False, integers=True)]
    )


def check_swap(a, b) -> None:
    check_lists("swap_", [ListArg("a", a, True), ListArg("b", b, True, True)])
