"""The op table: one row (OpSpec) per op, which every backend, registration and test reads. A row
names the op, describes its lists and weight (checks.py), gives what each written list moves
towards (the foreach fallback follows from it) and its reference; its check, Triton launcher,
Triton custom op and fake kernel follow from the row."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import checks, reference, triton_kernels
from .backends import _C
from .checks import (
    ONE_WEIGHT,
    WEIGHT_PER_LIST,
    WEIGHT_PER_SOURCE_LIST,
    ListParam,
    NamedWeights,
    OneWeight,
    WeightPerList,
    read,
    written,
)
from .foreach import fallback, lerped, weighted_sum


@dataclass(frozen=True)
class OpSpec:
    """One op, as every backend, registration and test sees it: its row in OP_TABLE. Its compiled
    kernels are the schema line of csrc/ops.cpp and a functor of csrc/functors.h; its Triton kernel
    is triton_kernels.KERNELS[name]. Its check, launcher and fake kernel follow from the row."""

    name: str  # as in torch.ops.swa_fast and swa_fast's public functions
    params: tuple[ListParam, ...]  # its tensor lists, in order: the written ones first
    weight: OneWeight | WeightPerList | NamedWeights | None  # the weight that follows the lists, if any
    # What each written list moves towards by the weight, or becomes without one, as torch._foreach_*
    # over the lists as the kernels see them (kernel_lists), those read in the written list's
    # accumulation dtype: the functor's math, from which foreach.py makes the fallback. None for an
    # op whose fallback is its own (own_foreach).
    targets: Callable[..., list[list[Tensor]]] | None
    reference: Callable[..., None]  # reference.py: per-tensor PyTorch, the tests' oracle
    # foreach.py's fallback of an op its targets cannot describe (weighted_sum_'s), else None
    own_foreach: Callable[..., None] | None = field(default=None, repr=False)
    # Whether two last, optional arguments follow the weight: `rounding`, which may ask for stochastic
    # rounding into its bf16 and fp16 written tensors (rounding.py), then `stats`, what the pass
    # sees (pass_stats.py): lerp_, moments_, multi_lerp_.
    rounds: bool = False
    foreach: Callable[..., None] = field(init=False, repr=False)  # the torch._foreach_* fallback
    triton: Callable[..., None] = field(init=False, repr=False)  # check, then the Triton kernel

    def __post_init__(self) -> None:
        # What the launcher, the fallback and the schema take for granted of a row.
        flags = [p.written for p in self.params]
        if flags != sorted(flags, reverse=True):
            raise ValueError(
                f"OpSpec {self.name}: expected the lists it writes before those it reads, got "
                + ", ".join(f"{p.name} ({'written' if p.written else 'read'})" for p in self.params)
            )
        if any(p.per_weight for p in self.params) != isinstance(self.weight, WeightPerList):
            raise ValueError(
                f"OpSpec {self.name}: expected a list of one list per weight (per_weight=True) exactly "
                f"when the weight is WEIGHT_PER_LIST, got lists {self.params} and weight {self.weight!r}"
            )
        if (self.targets is None) == (self.own_foreach is None):
            raise ValueError(
                f"OpSpec {self.name}: expected either targets or a fallback of its own (own_foreach), "
                f"got targets {self.targets!r} and own_foreach {self.own_foreach!r}"
            )
        object.__setattr__(self, "foreach", self.own_foreach or fallback(self))
        object.__setattr__(self, "triton", triton_kernels.launcher(self))

    @property
    def lists(self) -> tuple[str, ...]:
        """Its tensor lists' argument names, in order."""
        return tuple(p.name for p in self.params)

    @property
    def written(self) -> int:
        """How many of its lists, from the first, it writes in place."""
        return sum(p.written for p in self.params)

    @property
    def weighted(self) -> bool:
        """Whether a weight follows the lists."""
        return self.weight is not None

    @property
    def weight_name(self) -> str | None:
        """The weight argument's name: `weight`, or multi_lerp_'s and bema_'s 1-D `weights`."""
        return self.weight.name if self.weight is not None else None

    @property
    def lists_per_weight(self) -> bool:
        """Whether an argument holds one list per weight (multi_lerp_'s K lists of averages,
        weighted_sum_'s K lists of sources)."""
        return isinstance(self.weight, WeightPerList)

    def check(self, *args, max_count: int | None | object = checks.ONE_PASS) -> None:
        """Rejects what the C++ checks reject, with their messages, before anything is written.
        `max_count`: the most weights of a list per weight (ONE_PASS: one call of the compiled op's;
        None: any number, which the public function splits into several calls)."""
        checks.check_call(self, args, max_count)

    def kernel_lists(self, *args) -> list[Sequence[Tensor]]:
        """The lists of a call (lists..., weight) as the kernels see them, one dtype per list: the
        op's own, with a list per weight split apart (multi_lerp_'s K lists of averages,
        weighted_sum_'s K lists of sources)."""
        count = len(args[-1]) if self.lists_per_weight else None
        return [part for p, tensors in zip(self.params, args) for part in p.split(tensors, count)]

    def kernel_written(self, *args) -> int:
        """How many of kernel_lists(*args), from the first, the op writes."""
        count = len(args[-1]) if self.lists_per_weight else 1
        return sum(count if p.per_weight else 1 for p in self.params if p.written)

    @property
    def triton_op(self) -> str:
        """The name of its Triton custom op in torch.ops.swa_fast."""
        return self.name[:-1] + "_triton"

    @property
    def schema(self) -> str:
        """Its signature as csrc/ops.cpp declares it: each written list in an alias set of its own."""
        lists = [
            f"Tensor({chr(ord('a') + k)}!)[] {name}" if k < self.written else f"Tensor[] {name}"
            for k, name in enumerate(self.lists)
        ]
        rounding = ["Tensor? rounding=None", "Tensor(z!)? stats=None"] * self.rounds
        return f"({', '.join(lists + [f'Tensor {self.weight_name}'] * self.weighted + rounding)}) -> ()"


def _bema_targets(ema, out, start, src, weights) -> list[list[Tensor]]:
    """bema_'s: the EMA moves towards src by weights[0]; out is set to the moved EMA plus
    weights[1] times (src - start), each weight rounded to the EMA's accumulation dtype."""
    moved = lerped(ema, src, weights[0])
    scale = weights[1]
    if isinstance(scale, Tensor) and scale.device.type == "cpu":
        scale = scale.item()
    if not isinstance(scale, Tensor):  # a host number, rounded per tensor as the kernels read it
        scale = [torch.tensor(float(scale), dtype=m.dtype).item() for m in moved]
    return [src, torch._foreach_add(moved, torch._foreach_mul(torch._foreach_sub(src, start), scale))]


# One row per op: its name, its lists (what each admits), its weight, its targets, its reference.
# fmt: off
OP_TABLE: dict[str, OpSpec] = {spec.name: spec for spec in (
    OpSpec("lerp_",
           (written("avg"), read("src")), ONE_WEIGHT,
           lambda avg, src: [src],
           reference.lerp_, rounds=True),
    OpSpec("moments_",
           (written("mean"), written("sq", same_dtype=True), read("src")), ONE_WEIGHT,
           lambda mean, sq, src: [src, torch._foreach_mul(src, src)],  # in fp32: 300^2 overflows fp16
           reference.moments_, rounds=True),
    OpSpec("multi_lerp_",
           (written("avgs", per_weight=True), read("src")), WEIGHT_PER_LIST,
           lambda *avgs_then_src: [avgs_then_src[-1]] * (len(avgs_then_src) - 1),  # each average to src
           reference.multi_lerp_, rounds=True),
    OpSpec("bema_",
           (written("ema"), written("out", same_dtype=True), read("start", same_dtype=True), read("src")),
           NamedWeights("ema_weight", "correction"),
           _bema_targets,
           reference.bema_),
    OpSpec("weighted_sum_",
           (written("dst"), read("srcs", per_weight=True)), WEIGHT_PER_SOURCE_LIST,
           None,  # dst is set to a sum in the dtype of every list at its index: its own fallback
           reference.weighted_sum_,
           own_foreach=weighted_sum),
    OpSpec("copy_",
           (written("dst", integers=True), read("src", integers=True)), None,
           lambda dst, src: [src],
           reference.copy_),
    OpSpec("swap_",
           (written("a"), written("b", same_dtype=True)), None,
           lambda a, b: [b, a],
           reference.swap_),
)}
# fmt: on

for _spec in OP_TABLE.values():
    triton_kernels.register_op(_spec)
    if _C is not None:
        # Fake kernels: shape/dtype checks only, so torch.compile and fake tensors can trace the ops.
        torch.library.register_fake(f"swa_fast::{_spec.name}")(_spec.check)
