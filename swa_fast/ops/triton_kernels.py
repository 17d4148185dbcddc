"""Triton kernels of the ops, one launch per list (per dtype group of a mixed list).

Each launch reads a pointer table: the data pointers of every tensor as int64, cast back to typed
pointers inside the kernel, and a block map (program -> tensor, first element). The tables of a
list seen before are reused from a small cache. The op table (table.py) registers each op as
`swa_fast::<op>_triton` (register_op); their bodies run the reference when the tensors are not on
CUDA and the interpreter is off, so `opcheck` and `torch.compile` work on any machine. Arithmetic
is in fp32 (fp64 for fp64 destinations); bf16/fp16 values are upcast right after loading.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import reference

if TYPE_CHECKING:
    from .table import OpSpec

try:
    import triton
    import triton.language as tl

    TRITON_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None
    TRITON_ERROR = f"triton is not importable ({e})"

BLOCK = 4096
# BLOCK / (32 * NUM_WARPS) = 8 elements a thread and list: two 128-bit words of fp32. With Triton's
# default of 4 warps a thread held 32, which took 128-210 registers and spilled the fp64 kernels
# (tests/test_triton_compiled.py reads the compiled kernels' resources).
NUM_WARPS = 16


# Read once, as Triton does: whether @triton.jit makes interpreted kernels is decided when the
# kernels below are defined, so setting it later changes nothing.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels (not the reference) run for tensors on `device`."""
    return triton is not None and (device.type == "cuda" or INTERPRETING)


if triton is not None:
    _TL_DTYPES = {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        # copy_'s integer and bool tensors, moved as they are (a bool is a byte)
        torch.bool: tl.uint8,
        torch.uint8: tl.uint8,
        torch.int8: tl.int8,
        torch.int16: tl.int16,
        torch.int32: tl.int32,
        torch.int64: tl.int64,
        torch.uint16: tl.uint16,
        torch.uint32: tl.uint32,
        torch.uint64: tl.uint64,
    }

    @triton.jit
    def _locate_block(block_tensor, block_start, numels, BLOCK: tl.constexpr):
        """(tensor, offsets, mask, whether the block is full). A block starts at a multiple of BLOCK
        (the hint lets the compiler vectorise); a full block needs no mask, and a masked access
        whose mask the compiler cannot prove constant over a vector is split into single elements."""
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        start = tl.multiple_of(tl.load(block_start + pid), BLOCK)
        offs = start + tl.arange(0, BLOCK)
        n = tl.load(numels + t)
        return t, offs, offs < n, start + BLOCK <= n

    @triton.jit
    def _locate(block_tensor, block_start, numels, BLOCK: tl.constexpr):
        t, offs, mask, _ = _locate_block(block_tensor, block_start, numels, BLOCK)
        return t, offs, mask

    @triton.jit
    def _ptr(ptrs, t, k: tl.constexpr, K: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr = False):
        """The k-th of K pointers of tensor t. ALIGNED: the launch found every pointer 16-byte
        aligned, and says so to the compiler, which then loads and stores 128 bits at a time."""
        p = tl.load(ptrs + t * K + k).to(tl.pointer_type(DTYPE))
        if ALIGNED:  # on the pointer: the compiler drops a hint on the integer at the cast
            p = tl.multiple_of(p, 16)
        return p

    @triton.jit
    def _widened(ptr, offs, mask, DTYPE: tl.constexpr, ACC: tl.constexpr):
        """Elements of the DTYPE tensor at ptr, exactly in ACC.

        bf16 is widened with integer ops on its bits: Triton's interpreter flushes bf16 subnormals
        to zero in its cast, and this gives the same values compiled and interpreted."""
        if DTYPE == tl.bfloat16:
            bits = tl.load(ptr.to(tl.pointer_type(tl.uint16), bitcast=True) + offs, mask=mask)
            return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True).to(ACC)
        else:
            return tl.load(ptr + offs, mask=mask).to(ACC)

    @triton.jit
    def _lerp(start, end, w):
        # PyTorch's lerp: exact at both ends, accurate on either side of 0.5; weight 0 keeps start
        # even where end is not finite, weight 1 gives end even where start is not.
        mixed = tl.where(tl.abs(w) < 0.5, start + w * (end - start), end - (end - start) * (1 - w))
        return tl.where(w == 0, start, tl.where(w == 1, end, mixed))

    @triton.jit
    def _rounded(x, DST: tl.constexpr):
        """x (fp32, or fp64 for fp64 destinations) rounded to nearest even in DST, as PyTorch does.

        bf16 is rounded with integer ops on the fp32 bits: Triton's interpreter truncates in its
        fp32 -> bf16 cast, and this gives the same bits compiled and interpreted."""
        if DST == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays NaN (the carry could make it inf)
            return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DST)

    # An op's block, given its mask (None: a full block), all with one signature: _blockwise_kernel
    # runs it unmasked on full blocks and masked on a tensor's last one.
    # (their shared signature kept on two lines each)
    # fmt: off
    @triton.jit
    def _lerp_block(ptrs, t, offs, mask, w_ptr, DST: tl.constexpr, SRC: tl.constexpr, ACC: tl.constexpr,
                    ALIGNED: tl.constexpr):
        avg = _ptr(ptrs, t, 0, 2, DST, ALIGNED)
        a = _widened(avg, offs, mask, DST, ACC)
        s = _widened(_ptr(ptrs, t, 1, 2, SRC, ALIGNED), offs, mask, SRC, ACC)
        w = tl.load(w_ptr).to(ACC)
        tl.store(avg + offs, _rounded(_lerp(a, s, w), DST), mask=mask)

    @triton.jit
    def _moments_block(ptrs, t, offs, mask, w_ptr, DST: tl.constexpr, SRC: tl.constexpr, ACC: tl.constexpr,
                       ALIGNED: tl.constexpr):
        mean = _ptr(ptrs, t, 0, 3, DST, ALIGNED)
        sq = _ptr(ptrs, t, 1, 3, DST, ALIGNED)
        x = _widened(_ptr(ptrs, t, 2, 3, SRC, ALIGNED), offs, mask, SRC, ACC)
        m = _widened(mean, offs, mask, DST, ACC)
        q = _widened(sq, offs, mask, DST, ACC)
        w = tl.load(w_ptr).to(ACC)
        tl.store(mean + offs, _rounded(_lerp(m, x, w), DST), mask=mask)
        tl.store(sq + offs, _rounded(_lerp(q, x * x, w), DST), mask=mask)

    @triton.jit
    def _copy_block(ptrs, t, offs, mask, w_ptr, DST: tl.constexpr, SRC: tl.constexpr, ACC: tl.constexpr,
                    ALIGNED: tl.constexpr):
        s = _widened(_ptr(ptrs, t, 1, 2, SRC, ALIGNED), offs, mask, SRC, ACC)
        tl.store(_ptr(ptrs, t, 0, 2, DST, ALIGNED) + offs, _rounded(s, DST), mask=mask)

    @triton.jit
    def _swap_block(ptrs, t, offs, mask, w_ptr, DST: tl.constexpr, SRC: tl.constexpr, ACC: tl.constexpr,
                    ALIGNED: tl.constexpr):
        a = _ptr(ptrs, t, 0, 2, DST, ALIGNED)
        b = _ptr(ptrs, t, 1, 2, SRC, ALIGNED)
        x = tl.load(a + offs, mask=mask)
        y = tl.load(b + offs, mask=mask)
        tl.store(a + offs, y, mask=mask)
        tl.store(b + offs, x, mask=mask)
    # fmt: on

    # Signatures: the launch table's tensors, then the dtypes and variants.
    # fmt: off
    @triton.jit
    def _blockwise_kernel(ptrs, block_tensor, block_start, numels, w_ptr, OP: tl.constexpr,
                          DST: tl.constexpr, SRC: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                          ALIGNED: tl.constexpr):
        # OP: an op's block function (_lerp_block, ...); w_ptr is unused by those without a weight.
        t, offs, mask, full = _locate_block(block_tensor, block_start, numels, BLOCK)
        if full:
            OP(ptrs, t, offs, None, w_ptr, DST, SRC, ACC, ALIGNED)
        else:
            OP(ptrs, t, offs, mask, w_ptr, DST, SRC, ACC, ALIGNED)

    @triton.jit
    def _multi_lerp_kernel(ptrs, block_tensor, block_start, numels, w_ptr,
                           DST: tl.constexpr, SRC: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                           DTYPES: tl.constexpr, ALIGNED: tl.constexpr = False):
        # DTYPES: each list's dtype, the K averages' then the source's.
        K: tl.constexpr = len(DTYPES) - 1
        t, offs, mask = _locate(block_tensor, block_start, numels, BLOCK)
        # The source read once, exactly (fp64 stays fp64), then rounded once per average's dtype.
        SRC_WIDE: tl.constexpr = tl.float64 if SRC == tl.float64 else tl.float32
        s = _widened(_ptr(ptrs, t, K, K + 1, SRC, ALIGNED), offs, mask, SRC, SRC_WIDE)
        for k in tl.static_range(K):
            # a function per average: the compiler refuses a constexpr assigned in each iteration
            _multi_lerp_average(ptrs, t, offs, mask, w_ptr, s, k, K, DTYPES[k], BLOCK, ALIGNED)

    @triton.jit
    def _multi_lerp_average(ptrs, t, offs, mask, w_ptr, s, k: tl.constexpr, K: tl.constexpr, D: tl.constexpr,
                            BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        A: tl.constexpr = tl.float64 if D == tl.float64 else tl.float32
        avg = _ptr(ptrs, t, k, K + 1, D, ALIGNED)
        w = tl.load(w_ptr + k).to(A)
        # Weight 0 writes nothing to that average, as the compiled kernels. (Broadcast first:
        # the interpreter cannot `and` a scalar with a block.)
        store = mask & ((tl.zeros([BLOCK], A) + w) != 0)
        a = _widened(avg, offs, store, D, A)
        tl.store(avg + offs, _rounded(_lerp(a, s.to(A), w), D), mask=store)

    # fmt: on

    class Blockwise:
        """_blockwise_kernel bound to one op's block function: launched as a kernel is,
        `Blockwise(block)[grid](...)`."""

        kernel = _blockwise_kernel
        arg_names = _blockwise_kernel.arg_names

        def __init__(self, block) -> None:
            self.block = block

        def __getitem__(self, grid):
            return functools.partial(_blockwise_kernel[grid], OP=self.block)

    # Each op of ops.OP_TABLE by name.
    KERNELS = {
        "lerp_": Blockwise(_lerp_block),
        "moments_": Blockwise(_moments_block),
        "multi_lerp_": _multi_lerp_kernel,
        "copy_": Blockwise(_copy_block),
        "swap_": Blockwise(_swap_block),
    }
else:
    KERNELS = {}


_LAUNCH_TABLES: OrderedDict[tuple, tuple[Tensor, Tensor, Tensor, Tensor, bool]] = OrderedDict()
_LAUNCH_TABLES_KEPT = 32


def _launch_table(
    lists: Sequence[Sequence[Tensor]], indices: list[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
    """(pointer table, block -> tensor, block -> first element, numels) on the tensors' device, and
    whether every pointer is 16-byte aligned (then so is every block's first element: BLOCK is a
    multiple of 16)."""
    key = tuple((tuple(lst[i].data_ptr() for lst in lists), lists[0][i].numel()) for i in indices)
    key = (lists[0][indices[0]].device, key)
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
    table = (
        *(torch.tensor(v, dtype=torch.int64).to(device) for v in (ptrs, block_tensor, block_start, numels)),
        all(p % 16 == 0 for p in ptrs),
    )
    _LAUNCH_TABLES[key] = table
    if len(_LAUNCH_TABLES) > _LAUNCH_TABLES_KEPT:
        _LAUNCH_TABLES.popitem(last=False)
    return table


def _launch(
    kernel, lists: Sequence[Sequence[Tensor]], dtype_lists: tuple[int, int], *scalar_args, dtypes_arg=False
) -> None:
    """One launch per group of non-empty tensors with the same dtype in each list. The kernel is
    given the dtypes of lists dtype_lists (destination, source) and, with `dtypes_arg`, of every
    list (DTYPES)."""
    d, s = dtype_lists
    groups: dict[tuple[torch.dtype, ...], list[int]] = {}
    for i, t in enumerate(lists[0]):
        if t.numel():
            groups.setdefault(tuple(lst[i].dtype for lst in lists), []).append(i)
    for dtypes, indices in groups.items():
        dst_dtype, src_dtype = dtypes[d], dtypes[s]
        extra = {"DTYPES": tuple(_TL_DTYPES[dtype] for dtype in dtypes)} if dtypes_arg else {}
        ptrs, block_tensor, block_start, numels, aligned = _launch_table(lists, indices)
        kernel[(block_tensor.numel(),)](
            ptrs,
            block_tensor,
            block_start,
            numels,
            *(scalar_args or (numels,)),  # copy_ and swap_ have no weight: any pointer fills w_ptr
            DST=_TL_DTYPES[dst_dtype],
            SRC=_TL_DTYPES[src_dtype],
            ACC=_TL_DTYPES[reference.acc_dtype(dst_dtype)],
            BLOCK=BLOCK,
            ALIGNED=aligned,
            num_warps=NUM_WARPS,
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
    multi_lerp_'s K lists of averages apart); the kernel is given those of the first list and the
    last one (destination, source), and all of them when it takes DTYPES (_multi_lerp_kernel).
    Tests call launchers directly (on CPU tensors under TRITON_INTERPRET=1)."""
    n_lists, n_read, check = len(spec.params), len(spec.params) - spec.written, spec.check
    kernel = KERNELS.get(spec.name)
    dtypes_arg = kernel is not None and "DTYPES" in kernel.arg_names

    def launch(*args) -> None:
        check(*args)
        if kernel is None:
            raise RuntimeError(f"swa_fast.{spec.name}: {TRITON_ERROR or 'no Triton kernel for this op'}")
        lists = spec.kernel_lists(*args)
        n_written = len(lists) - n_read  # the lists read follow the written ones
        lists = [*lists[:n_written], *map(_contiguous, lists[n_written:])]
        if lists[0]:
            weight = [_device_weight(w, lists[0][0].device) for w in args[n_lists:]]
            _launch(kernel, lists, (0, len(lists) - 1), *weight, dtypes_arg=dtypes_arg)

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
        f"swa_fast::{spec.triton_op}", run, mutates_args=spec.lists[: spec.written], schema=spec.schema
    )
    op.register_fake(check)
