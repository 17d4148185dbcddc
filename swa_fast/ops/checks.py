"""What an op's arguments may be, as its row in the op table describes them (`ListParam`, the weight
kinds), and the one check that reads a row (`check_call`): the check of the Python backends
(Triton, foreach, reference) and of the fake kernels.

It mirrors csrc/multi_tensor.h word for word, so every backend rejects the same calls with the
same message, before anything is written.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from . import pass_stats, rounding

if TYPE_CHECKING:
    from .table import OpSpec

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# What copy_ also moves, bit for bit, between tensors of one dtype (csrc/multi_tensor.h:
# is_supported_integer)
INTEGER_DTYPES = (
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
)
_CPU = torch.device("cpu")
# Averages one call of the compiled op updates (csrc/ops_impl.h); swa_fast.multi_lerp_ splits more.
MAX_AVERAGES_PER_PASS = 4
# Lists of sources one call of the compiled weighted_sum_ sums (csrc/ops_impl.h); swa_fast.weighted_sum_
# splits more.
MAX_SOURCES_PER_PASS = 8


class _OnePass:
    """`max_count`'s default: the most weights one call of the compiled op takes (the row's)."""

    def __repr__(self) -> str:
        return "ONE_PASS"


ONE_PASS = _OnePass()


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
    for i in range(len(first.tensors)):
        for arg in lists:
            at = f"swa_fast.{op}: `{arg.name}[{i}]`"
            t = arg.tensors[i]
            _check_kind(at, t, arg.integers)
            _check_like_first(at, t, first, i)
            if arg.written:
                _check_writable(at, t, has_memory)
            _check_dtype_pair(at, t, arg, first, i)
    if has_memory:
        check_no_overlap(op, lists)


def _check_kind(at: str, t, integers: bool) -> None:
    """A dense tensor of a dtype the ops take (`integers`: copy_'s integer and bool ones too)."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{at} is a {type(t).__name__}, expected a Tensor")
    if t.layout != torch.strided:
        raise ValueError(f"{at} has layout {t.layout}; expected a strided (dense) tensor")
    if t.dtype not in FLOAT_DTYPES and not (integers and t.dtype in INTEGER_DTYPES):
        expected = "float32, float64, float16 or bfloat16"
        if integers:
            expected = "float32, float64, float16, bfloat16, or an integer or bool dtype"
        raise ValueError(f"{at} has dtype {t.dtype}; expected {expected}")


def _check_like_first(at: str, t: Tensor, first: ListArg, i: int) -> None:
    """On the device of the call's first tensor, with the shape of the first list's tensor at i."""
    device, ref = first.tensors[0].device, first.tensors[i]
    if t.device != device:
        raise ValueError(
            f"{at} is on {t.device} but `{first.name}[0]` is on {device}; "
            "all tensors of one call must be on one device"
        )
    if t.shape != ref.shape:
        raise ValueError(
            f"{at} has shape {list(t.shape)} but `{first.name}[{i}]` has shape {list(ref.shape)}"
        )


def _check_writable(at: str, t: Tensor, has_memory: bool) -> None:
    """A tensor written in place: contiguous, and not a lazily negated view (whose sign bit only
    a tensor with memory has)."""
    if not t.is_contiguous():
        raise ValueError(
            f"{at} is written in place and must be contiguous "
            f"(got strides {list(t.stride())} for shape {list(t.shape)})"
        )
    if has_memory and t.is_neg():
        raise ValueError(
            f"{at} is written in place and must not be a negated view (is_neg()); "
            "write into the tensor it views"
        )


def _check_dtype_pair(at: str, t: Tensor, arg: ListArg, first: ListArg, i: int) -> None:
    """`same_dtype`: the first list's dtype at i; `integers`: an integer or bool tensor only with
    its own dtype on the other side."""
    ref = first.tensors[i]
    if arg.same_dtype and t.dtype != ref.dtype:
        raise ValueError(
            f"{at} has dtype {t.dtype} but `{first.name}[{i}]` has dtype {ref.dtype}; "
            "both sides must have the same dtype"
        )
    both_floating = t.dtype in FLOAT_DTYPES and ref.dtype in FLOAT_DTYPES
    if arg.integers and t.dtype != ref.dtype and not both_floating:
        raise ValueError(
            f"{at} has dtype {t.dtype} but `{first.name}[{i}]` has dtype {ref.dtype}; "
            "an integer or bool tensor is copied only to and from its own dtype"
        )


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


def weight_count(op: str, weights: Tensor | Sequence, meaning: str) -> int:
    """How many weights a vector of weights holds: a sequence of real numbers, or a 1-D floating
    tensor (`meaning`: what each element is, for the message). Its device is checked with the lists."""
    if isinstance(weights, Tensor):
        if not weights.is_floating_point():
            raise ValueError(f"swa_fast.{op}: `weights` must be a floating-point tensor, got {weights.dtype}")
        if weights.dim() != 1:
            raise ValueError(
                f"swa_fast.{op}: `weights` must be a 1-D tensor ({meaning}), got shape {list(weights.shape)}"
            )
        return weights.shape[0]
    return len(_real_numbers(op, weights))


def _real_numbers(op: str, weights) -> list:
    """The weights given as numbers: any iterable but a string, as the compiled entry point takes it."""
    try:
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
            raise ValueError(f"swa_fast.{op}: `weights[{k}]` must be a real number, got {type(w).__name__}")
    return values


# --- what a row says of its arguments ----------------------------------------------------------


@dataclass(frozen=True)
class ListParam:
    """One list argument of an op, as its row in the op table describes it; `bind` gives the
    ListArgs of a call."""

    name: str
    written: bool = False  # written in place: must be contiguous, and share no memory
    same_dtype: bool = False  # must have the first list's dtype at every index
    # may also hold integer and bool tensors (copy_), each with the first list's dtype at its index
    integers: bool = False
    # holds one list per weight, concatenated (multi_lerp_'s `avgs`: avgs[k * n + i], n tensors each)
    per_weight: bool = False

    def split(self, tensors: Sequence[Tensor], count: int | None) -> list[Sequence[Tensor]]:
        """The lists this argument holds: itself, or its `count` lists when it holds one per weight."""
        if not self.per_weight:
            return [tensors]
        n = len(tensors) // count
        return [tensors[k * n : (k + 1) * n] for k in range(count)]

    def bind(
        self, op: str, tensors: Sequence[Tensor], count: int | None, first: tuple[str, int] | None = None
    ) -> list[ListArg]:
        """The ListArgs check_lists reads: one, or one per weight named `name[k]`. `first`: the name
        and length of the call's first list, when this argument is not it (weighted_sum_'s `srcs`,
        one list as long as `dst` per weight)."""
        if not self.per_weight:
            return [ListArg(self.name, tensors, self.written, self.same_dtype, self.integers)]
        if first is not None and len(tensors) != count * first[1]:
            raise ValueError(
                f"swa_fast.{op}: `{self.name}` has {len(tensors)} tensors but `{first[0]}` has {first[1]}; "
                f"expected {count} lists of {first[1]} (one per weight), concatenated: the lists must have "
                "equal lengths"
            )
        if len(tensors) % count:
            raise ValueError(
                f"swa_fast.{op}: `{self.name}` has {len(tensors)} tensors, which is not a multiple of the "
                f"{count} weights; expected one list of averages per weight, concatenated"
            )
        return [
            ListArg(f"{self.name}[{k}]", part, self.written, self.same_dtype, self.integers)
            for k, part in enumerate(self.split(tensors, count))
        ]


def written(name: str, **admits) -> ListParam:
    """A list the op writes in place; `admits`: ListParam's same_dtype, integers, per_weight."""
    return ListParam(name, written=True, **admits)


def read(name: str, **admits) -> ListParam:
    """A list the op only reads."""
    return ListParam(name, **admits)


class OneWeight:
    """One weight for every written list: any real number, or a 0-dim floating tensor on the
    tensors' device or on the CPU; checked after the lists."""

    name = "weight"
    targets_take_weights = False

    def __repr__(self) -> str:
        return "ONE_WEIGHT"

    def count(self, op: str, weight, max_count: int | None) -> None:
        return None  # nothing to split the lists by

    def check(self, op: str, weight, device: torch.device) -> None:
        check_weight(op, weight, device)

    def each(self, weight, lists: int) -> list:
        """The weight of each of `lists` written lists."""
        return [weight] * lists


class WeightPerList:
    """One weight per list of the op's `per_weight` argument (multi_lerp_'s averages, weighted_sum_'s
    lists of sources): real numbers, or a 1-D floating tensor on the tensors' device or on the CPU.
    Their count, checked before the lists, splits that argument; one call of the compiled op takes
    1 to `per_pass` of them (the public function splits more).

    Args:
        per_pass: the most weights one call of the compiled op takes (csrc/ops_impl.h's).
        each_list: what each list is, for the messages ("average").
        lists: the lists, for the messages ("averages").
        does: what the op does to them, for the messages ("updates").
        label: its name in the op table (its repr).
    """

    name = "weights"
    targets_take_weights = False

    def __init__(self, per_pass: int, each_list: str, lists: str, does: str, label: str) -> None:
        self.per_pass, self.each_list, self.lists, self.does, self.label = (
            per_pass,
            each_list,
            lists,
            does,
            label,
        )

    def __repr__(self) -> str:
        return self.label

    def count(self, op: str, weights, max_count: int | None | _OnePass) -> int:
        """Their count K, 1 to `max_count` (ONE_PASS: `per_pass`; None: no upper bound)."""
        count = weight_count(op, weights, f"one weight per {self.each_list}")
        bound = self.per_pass if max_count is ONE_PASS else max_count
        if count < 1 or (bound is not None and count > bound):
            raise ValueError(
                f"swa_fast.{op}: `weights` has {count} elements; the op {self.does} 1 to {self.per_pass} "
                f"{self.lists} per call (swa_fast.{op} splits more into several calls)"
            )
        return count

    def check(self, op: str, weights, device: torch.device) -> None:
        if isinstance(weights, Tensor) and weights.device not in (device, _CPU):
            raise ValueError(
                f"swa_fast.{op}: `weights` is on {weights.device} but the tensors are on {device}; "
                f"pass them on {device} (or on the CPU)"
            )

    def each(self, weights, lists: int) -> list:
        """The weight of each of the `lists` written lists (one per weight)."""
        return list(weights)


class NamedWeights:
    """A fixed number of weights, each with its own role (bema_'s `weights`: the EMA's weight, then
    the correction's scale): real numbers, or a 1-D floating tensor of that many elements on the
    tensors' device or on the CPU. Their count is checked before the lists, their device after.
    The first written list moves towards its target by the first weight; the others are set to
    theirs, which the row's targets work out from the weights too (`targets_take_weights`)."""

    name = "weights"
    targets_take_weights = True

    def __init__(self, *roles: str) -> None:
        self.roles = roles

    def __repr__(self) -> str:
        return f"NamedWeights{self.roles}"

    def count(self, op: str, weights, max_count: int | None) -> None:
        count = weight_count(op, weights, ", ".join(self.roles))
        if count != len(self.roles):
            raise ValueError(
                f"swa_fast.{op}: `weights` has {count} elements; expected {len(self.roles)} "
                f"({', '.join(self.roles)})"
            )

    def check(self, op: str, weights, device: torch.device) -> None:
        WEIGHT_PER_LIST.check(op, weights, device)

    def each(self, weights, lists: int) -> list:
        """The first written list's weight, then 1 (set to its target) for each other one."""
        return [weights[0]] + [1.0] * (lists - 1)


ONE_WEIGHT = OneWeight()
# multi_lerp_'s: one weight per list of averages, which it writes
WEIGHT_PER_LIST = WeightPerList(MAX_AVERAGES_PER_PASS, "average", "averages", "updates", "WEIGHT_PER_LIST")
# weighted_sum_'s: one weight per list of sources, which it reads
WEIGHT_PER_SOURCE_LIST = WeightPerList(
    MAX_SOURCES_PER_PASS, "list of sources", "lists of sources", "sums", "WEIGHT_PER_SOURCE_LIST"
)


def check_call(spec: OpSpec, args: Sequence, max_count: int | None | _OnePass = ONE_PASS) -> None:
    """The arguments of a call of spec's op, as its row describes them, checked in csrc's order:
    a weight per list (which splits its argument) first, then the lists' lengths, then the lists
    index by index, then a weight's device. `max_count`: the most weights one call takes (ONE_PASS:
    one call of the compiled op's; None: any number, as swa_fast.multi_lerp_ and
    swa_fast.weighted_sum_ split them)."""
    expected = len(spec.params) + (spec.weight is not None)
    if len(args) != expected and not (spec.rounds and len(args) in (expected + 1, expected + 2)):
        raise TypeError(f"swa_fast.{spec.name} takes {expected} positional arguments ({len(args)} given)")
    lists, weight = args[: len(spec.params)], args[len(spec.params) : expected]
    kind = spec.weight
    count = kind.count(spec.name, *weight, max_count) if kind else None
    first = (spec.params[0].name, len(lists[0]))
    bound = [
        arg
        for k, (p, t) in enumerate(zip(spec.params, lists))
        for arg in p.bind(spec.name, t, count, first if k else None)
    ]
    check_lists(spec.name, bound)
    if kind and lists[0]:
        kind.check(spec.name, *weight, lists[0][0].device)
    if len(args) > expected:
        # one first element per index of the lists; the written lists' count, K for multi_lerp_
        written_lists = spec.kernel_written(*args[:expected])
        rounding.check_rounding(spec.name, args[expected], len(lists[-1]), written_lists)
        if len(args) > expected + 1:
            device = lists[0][0].device if lists[0] else None
            pass_stats.check_stats(spec.name, args[expected + 1], written_lists, device)
