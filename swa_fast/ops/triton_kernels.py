"""Triton kernels of the ops, one launch per list (per dtype group of a mixed list).

Each launch reads a pointer table: the data pointers of every tensor as int64, cast back to typed
pointers inside the kernel, and a block map (program -> tensor, first element). The tables of a
list seen before are reused from a small cache. The op table (table.py) registers each op as
`swa_fast::<op>_triton` (register_op); their bodies run the reference when the tensors are not on
CUDA and the interpreter is off, so `opcheck` and `torch.compile` work on any machine. Arithmetic
is in fp32 (fp64 for fp64 destinations); bf16/fp16 values are upcast right after loading.
Given `rounding` (lerp_, moments_, multi_lerp_), bf16/fp16 results are rounded stochastically with
ops/rounding.py's bits: each tensor's first element in the flat average goes in the launch table,
seed, step and stream as int32 scalars, and the kernels' STOCHASTIC variant draws the bits.
Given `stats` (the same ops, pass_stats.py), every launch of the call passes the tensor to the
kernels' STATS variant, which adds each block's counts to it with atomics.

Triton itself is imported only when a kernel is needed (the kernels are in triton_jit.py): at the
first launch, or when the backend choice asks whether Triton runs on a GPU. `KERNELS`, `Blockwise`
and `triton` (None where it does not import) are read from here as before, importing it then.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from . import reference
from .rounding import STOCHASTIC_DTYPES, StochasticRounding

if TYPE_CHECKING:
    from .table import OpSpec

BLOCK = 4096
# BLOCK / (32 * NUM_WARPS) = 8 elements a thread and list: two 128-bit words of fp32. With Triton's
# default of 4 warps a thread held 32, which took 128-210 registers and spilled the fp64 kernels
# (tests/test_triton_compiled.py reads the compiled kernels' resources).
NUM_WARPS = 16


# Read once, as Triton does: whether @triton.jit makes interpreted kernels is decided when the
# kernels are defined, so setting it after importing swa_fast changes nothing.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Why Triton cannot run: known without importing it when it is not installed; otherwise set by the
# first import (`_jit()`), which may still fail.
TRITON_ERROR: str | None = None if importlib.util.find_spec("triton") else "triton is not installed"
_JIT: ModuleType | None = None


def _jit() -> ModuleType | None:
    """triton_jit (the kernels), imported at the first call; None where Triton does not import."""
    global _JIT, TRITON_ERROR
    if _JIT is None and TRITON_ERROR is None:
        try:
            _JIT = importlib.import_module(".triton_jit", __package__)
        except ImportError as e:  # pragma: no cover - triton ships with CUDA builds of torch
            TRITON_ERROR = f"triton is not importable ({e})"
    return _JIT


def __getattr__(name: str) -> Any:
    # The kernels' names, as when they were defined in this module (tests and tools read them).
    if name in ("KERNELS", "Blockwise"):
        jit = _jit()
        return getattr(jit, name) if jit is not None else {} if name == "KERNELS" else None
    if name == "triton":
        jit = _jit()
        return jit.triton if jit is not None else None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def unavailable() -> str | None:
    """Why the Triton kernels cannot run (None: they can), importing Triton to find out."""
    _jit()
    return TRITON_ERROR


def version() -> str:
    """Triton's version, or why it does not import (`swa_fast info`)."""
    jit = _jit()
    return jit.triton.__version__ if jit is not None else str(TRITON_ERROR)


def runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels (not the reference) run for tensors on `device`. Asked for a CPU
    device without the interpreter, it answers without importing Triton."""
    return (device.type == "cuda" or INTERPRETING) and unavailable() is None


_LAUNCH_TABLES: OrderedDict[tuple, LaunchTable] = OrderedDict()
_LAUNCH_TABLES_KEPT = 32
# The kernels' stochastic rounding scalars (int32 words), which they do not specialise on.
ROUNDING_SCALARS = ("seed_lo", "seed_hi", "step_lo", "step_hi", "stream")
# Stochastic rounding draws one Philox call per 8 consecutive elements of the flat average, which
# the ALIGNED kernels take whole when each block starts at a multiple of 8 there.
_PHILOX_GROUP = 8


class LaunchTable(NamedTuple):
    """A launch's tables on the tensors' device (pointers, block -> tensor, block -> first element,
    numels, each tensor's first element in the flat average for stochastic rounding, else None),
    and whether the launch is ALIGNED: every pointer 16-byte aligned (then so is every block's first
    element: BLOCK is a multiple of 16) and, with firsts, every first a multiple of 8."""

    ptrs: Tensor
    block_tensor: Tensor
    block_start: Tensor
    numels: Tensor
    firsts: Tensor | None
    aligned: bool


def _launch_table(
    lists: Sequence[Sequence[Tensor]], indices: list[int], firsts: Sequence[int] | None = None
) -> LaunchTable:
    """The launch table of the tensors at `indices` of every list; `firsts`: each index's first
    element in the flat average (stochastic rounding), or None."""
    key = tuple((tuple(lst[i].data_ptr() for lst in lists), lists[0][i].numel()) for i in indices)
    chosen = None if firsts is None else tuple(firsts[i] for i in indices)
    key = (lists[0][indices[0]].device, key, chosen)
    table = _LAUNCH_TABLES.get(key)
    if table is not None:
        _LAUNCH_TABLES.move_to_end(key)
        return table
    ptrs, numels, block_tensor, block_start = [], [], [], []
    for j, i in enumerate(indices):
        ptrs += [lst[i].data_ptr() for lst in lists]
        n = lists[0][i].numel()
        numels.append(n)
        starts = range(0, n, BLOCK)
        block_tensor += [j] * len(starts)
        block_start += starts
    device = lists[0][indices[0]].device

    def on_device(values: Sequence[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int64).to(device)

    table = LaunchTable(
        *map(on_device, (ptrs, block_tensor, block_start, numels)),
        None if chosen is None else on_device(chosen),
        all(p % 16 == 0 for p in ptrs) and all(f % _PHILOX_GROUP == 0 for f in chosen or ()),
    )
    _LAUNCH_TABLES[key] = table
    if len(_LAUNCH_TABLES) > _LAUNCH_TABLES_KEPT:
        _LAUNCH_TABLES.popitem(last=False)
    return table


def _int32_words(value: int) -> tuple[int, int]:
    """A 64-bit value's low and high 32-bit words as int32 values (bits kept), so that a kernel
    argument is int32 whatever the value."""

    def signed(word: int) -> int:
        return word - (1 << 32) if word >= 1 << 31 else word

    return signed(value & 0xFFFFFFFF), signed((value >> 32) & 0xFFFFFFFF)


def _rounding_args(table: LaunchTable, key: StochasticRounding | None) -> dict[str, Any]:
    """The kernel's rounding arguments: the firsts' table, seed and step as int32 words, the
    stream; without a key, placeholders the kernel does not read (any pointer fills firsts)."""
    if key is None:
        return dict(firsts=table.numels, **dict.fromkeys(ROUNDING_SCALARS, 0))
    words = (*_int32_words(key.seed), *_int32_words(key.step), key.stream)
    return dict(firsts=table.firsts, **dict(zip(ROUNDING_SCALARS, words)))


def _launch(
    kernel,
    lists: Sequence[Sequence[Tensor]],
    dtype_lists: tuple[int, int],
    *scalar_args,
    dtypes_arg=False,
    rounding: StochasticRounding | None = None,
    stats: Tensor | None = None,
) -> None:
    """One launch per group of non-empty tensors with the same dtype in each list. The kernel is
    given the dtypes of lists dtype_lists (destination, source) and, with `dtypes_arg`, of every
    list (DTYPES). `rounding`: stochastic rounding's key (a kernel that takes it: `firsts`), or
    None: to nearest. `stats`: the call's stats tensor (pass_stats.py), which every group's launch
    adds to (a kernel that takes it: its STATS variant), or None."""
    d, s = dtype_lists
    groups: dict[tuple[torch.dtype, ...], list[int]] = {}
    for i, t in enumerate(lists[0]):
        if t.numel():
            groups.setdefault(tuple(lst[i].dtype for lst in lists), []).append(i)
    takes_rounding = "firsts" in kernel.arg_names
    for dtypes, indices in groups.items():
        dst_dtype, src_dtype = dtypes[d], dtypes[s]
        tl_dtypes = _JIT.TL_DTYPES
        # A group with no bf16 or fp16 written list (those before the source, in the ops that round)
        # rounds to nearest: the nearest kernel serves it.
        key = rounding if any(dt in STOCHASTIC_DTYPES for dt in dtypes[:s]) else None
        table = _launch_table(lists, indices, None if key is None else key.firsts)
        extra = {"DTYPES": tuple(tl_dtypes[dtype] for dtype in dtypes)} if dtypes_arg else {}
        if takes_rounding:
            extra.update(_rounding_args(table, key), STOCHASTIC=key is not None)
            # without stats, any pointer fills `stats` (the kernel does not read it)
            extra.update(stats=table.numels if stats is None else stats, STATS=stats is not None)
        kernel[(table.block_tensor.numel(),)](
            table.ptrs,
            table.block_tensor,
            table.block_start,
            table.numels,
            *(scalar_args or (table.numels,)),  # copy_ and swap_ have no weight: any pointer fills w_ptr
            DST=tl_dtypes[dst_dtype],
            SRC=tl_dtypes[src_dtype],
            ACC=tl_dtypes[reference.acc_dtype(dst_dtype)],
            BLOCK=BLOCK,
            ALIGNED=table.aligned,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,  # a multiply and an add fused only where the kernel says so
            **extra,
        )


def _device_weight(weight: Tensor | float | Sequence[float], device: torch.device) -> Tensor:
    """The weight as the kernels load it: float32 or float64, on `device` (multi_lerp_'s weights:
    a contiguous vector)."""
    if isinstance(weight, Tensor):
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        return weight.to(device, dtype, non_blocking=True).resolve_neg().contiguous()
    if isinstance(weight, Sequence):
        return torch.tensor([float(w) for w in weight], dtype=torch.float64, device=device)
    return torch.full((), float(weight), dtype=torch.float64, device=device)


def _contiguous(src: Sequence[Tensor]) -> list[Tensor]:
    # The kernels read memory as it is: a lazily negated view is resolved first.
    return [s.resolve_neg().contiguous() for s in src]


def launcher(spec: OpSpec) -> Callable[..., None]:
    """The op's Triton launcher, called as the op is: its check, then its kernel over the lists.

    The lists the op writes are updated in place; those it only reads are made contiguous first.
    Launches are grouped by the dtypes of every list as the kernels see them (spec.kernel_lists:
    multi_lerp_'s K lists of averages apart, weighted_sum_'s K lists of sources); the kernel is given
    those of the first list and the last one (destination, source), and all of them when it takes
    DTYPES (_multi_lerp_kernel, _weighted_sum_kernel).
    Tests call launchers directly (on CPU tensors under TRITON_INTERPRET=1)."""
    n_lists, check = len(spec.params), spec.check
    n_weighted = n_lists + spec.weighted

    def launch(*args) -> None:
        check(*args)
        jit = _jit()  # Triton imported at the first launch
        kernel = jit.KERNELS.get(spec.name) if jit is not None else None
        if kernel is None:
            raise RuntimeError(f"swa_fast.{spec.name}: {TRITON_ERROR or 'no Triton kernel for this op'}")
        dtypes_arg = "DTYPES" in kernel.arg_names
        # the lists and the weight (if any), then the optional rounding and stats
        args, rounding, stats = args[:n_weighted], *(*args[n_weighted:], None, None)[:2]
        lists = spec.kernel_lists(*args)
        n_written = spec.kernel_written(*args)  # the lists read follow the written ones
        lists = [*lists[:n_written], *map(_contiguous, lists[n_written:])]
        if lists[0]:
            weight = [_device_weight(w, lists[0][0].device) for w in args[n_lists:]]
            key = None if rounding is None else StochasticRounding.of(rounding)
            _launch(
                kernel, lists, (0, len(lists) - 1), *weight, dtypes_arg=dtypes_arg, rounding=key, stats=stats
            )

    launch.__name__ = launch.__qualname__ = f"launch_{spec.name}"
    return launch


def _runs_here(tensors: Sequence[Tensor]) -> bool:
    return bool(tensors) and runs_on(tensors[0].device)


def register_op(spec: OpSpec) -> None:
    """Registers `swa_fast::<op>_triton` with the compiled op's schema. Its body runs the launcher
    where Triton runs, else the check and the reference; its fake kernel is the check. A custom op
    must not alias its inputs in its outputs: these return nothing."""
    launch, check, run_reference = spec.triton, spec.check, spec.reference

    def run(*args) -> None:
        if _runs_here(args[0]):
            launch(*args)
        else:
            check(*args)
            run_reference(*args)

    op = torch.library.custom_op(
        f"swa_fast::{spec.triton_op}",
        run,
        mutates_args=spec.lists[: spec.written] + ("stats",) * spec.rounds,
        schema=spec.schema,
    )
    op.register_fake(check)
