"""Triton kernels of the four ops, one launch per list (per dtype group of a mixed list).

Each launch reads a pointer table: the data pointers of every tensor as int64, cast back to typed
pointers inside the kernel, and a block map (program -> tensor, first element). The tables of a
list seen before are reused from a small cache. The ops register as `swa_fast::<op>_triton`; their
bodies run the reference when the tensors are not on CUDA and the interpreter is off, so `opcheck`
and `torch.compile` work on any machine. Arithmetic is in fp32 (fp64 for fp64 destinations);
bf16/fp16 values are upcast right after loading.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from . import checks, reference

try:
    import triton
    import triton.language as tl

    TRITON_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None
    TRITON_ERROR = f"triton is not importable ({e})"

BLOCK = 4096


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
    }

    @triton.jit
    def _locate(block_tensor, block_start, numels, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        offs = tl.load(block_start + pid) + tl.arange(0, BLOCK)
        return t, offs, offs < tl.load(numels + t)

    @triton.jit
    def _ptr(ptrs, t, k: tl.constexpr, K: tl.constexpr, DTYPE: tl.constexpr):
        return tl.load(ptrs + t * K + k).to(tl.pointer_type(DTYPE))

    @triton.jit
    def _lerp(start, end, w):
        # PyTorch's lerp: exact at both ends, accurate on either side of 0.5; weight 0 keeps start
        # even where end is not finite.
        mixed = tl.where(w < 0.5, start + w * (end - start), end - (end - start) * (1 - w))
        return tl.where(w == 0, start, mixed)

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

    # One signature line per kernel: the plan's tensors, then the dtypes.
    # fmt: off
    @triton.jit
    def _lerp_kernel(ptrs, block_tensor, block_start, numels, w_ptr,
                     DST: tl.constexpr, SRC: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
        t, offs, mask = _locate(block_tensor, block_start, numels, BLOCK)
        avg = _ptr(ptrs, t, 0, 2, DST)
        a = tl.load(avg + offs, mask=mask).to(ACC)
        s = tl.load(_ptr(ptrs, t, 1, 2, SRC) + offs, mask=mask).to(ACC)
        w = tl.load(w_ptr).to(ACC)
        tl.store(avg + offs, _rounded(_lerp(a, s, w), DST), mask=mask)

    @triton.jit
    def _moments_kernel(ptrs, block_tensor, block_start, numels, w_ptr,
                        DST: tl.constexpr, SRC: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
        t, offs, mask = _locate(block_tensor, block_start, numels, BLOCK)
        mean = _ptr(ptrs, t, 0, 3, DST)
        sq = _ptr(ptrs, t, 1, 3, DST)
        x = tl.load(_ptr(ptrs, t, 2, 3, SRC) + offs, mask=mask).to(ACC)
        m = tl.load(mean + offs, mask=mask).to(ACC)
        q = tl.load(sq + offs, mask=mask).to(ACC)
        w = tl.load(w_ptr).to(ACC)
        tl.store(mean + offs, _rounded(_lerp(m, x, w), DST), mask=mask)
        tl.store(sq + offs, _rounded(_lerp(q, x * x, w), DST), mask=mask)

    @triton.jit
    def _copy_kernel(ptrs, block_tensor, block_start, numels,
                     DST: tl.constexpr, SRC: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
        t, offs, mask = _locate(block_tensor, block_start, numels, BLOCK)
        s = tl.load(_ptr(ptrs, t, 1, 2, SRC) + offs, mask=mask).to(ACC)
        tl.store(_ptr(ptrs, t, 0, 2, DST) + offs, _rounded(s, DST), mask=mask)

    @triton.jit
    def _swap_kernel(ptrs, block_tensor, block_start, numels,
                     DST: tl.constexpr, SRC: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
        t, offs, mask = _locate(block_tensor, block_start, numels, BLOCK)
        a = _ptr(ptrs, t, 0, 2, DST)
        b = _ptr(ptrs, t, 1, 2, SRC)
        x = tl.load(a + offs, mask=mask)
        y = tl.load(b + offs, mask=mask)
        tl.store(a + offs, y, mask=mask)
        tl.store(b + offs, x, mask=mask)

    # fmt: on


_PLAN_CACHE: OrderedDict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = OrderedDict()
_PLAN_CACHE_SIZE = 32


def _plan(lists: Sequence[Sequence[Tensor]], indices: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(pointer table, block -> tensor, block -> first element, numels) on the tensors' device."""
    key = tuple((tuple(lst[i].data_ptr() for lst in lists), lists[0][i].numel()) for i in indices)
    key = (lists[0][indices[0]].device, key)
    plan = _PLAN_CACHE.get(key)
    if plan is not None:
        _PLAN_CACHE.move_to_end(key)
        return plan
    ptrs, numels, block_tensor, block_start = [], [], [], []
    for j, i in enumerate(indices):
        ptrs += [lst[i].data_ptr() for lst in lists]
        n = lists[0][i].numel()
        numels.append(n)
        starts = range(0, n, BLOCK)
        block_tensor += [j] * len(starts)
        block_start += starts
    device = lists[0][indices[0]].device
    plan = tuple(
        torch.tensor(v, dtype=torch.int64).to(device) for v in (ptrs, block_tensor, block_start, numels)
    )
    _PLAN_CACHE[key] = plan
    if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return plan


def _launch(kernel, lists: Sequence[Sequence[Tensor]], dtype_lists: tuple[int, int], *scalar_args) -> None:
    """One launch per (destination dtype, source dtype) group of non-empty tensors."""
    d, s = dtype_lists
    groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, t in enumerate(lists[0]):
        if t.numel():
            groups.setdefault((lists[d][i].dtype, lists[s][i].dtype), []).append(i)
    for (dst_dtype, src_dtype), indices in groups.items():
        ptrs, block_tensor, block_start, numels = _plan(lists, indices)
        kernel[(block_tensor.numel(),)](
            ptrs,
            block_tensor,
            block_start,
            numels,
            *scalar_args,
            DST=_TL_DTYPES[dst_dtype],
            SRC=_TL_DTYPES[src_dtype],
            ACC=_TL_DTYPES[reference.acc_dtype(dst_dtype)],
            BLOCK=BLOCK,
        )


def _device_weight(weight: Tensor | float, device: torch.device) -> Tensor:
    if isinstance(weight, Tensor):
        return weight.to(device, non_blocking=True)
    return torch.full((), weight, dtype=torch.float64, device=device)


def _contiguous(src: Sequence[Tensor]) -> list[Tensor]:
    return [s.contiguous() for s in src]


# Launchers: check, then run the kernels. Tests call these directly (on CPU tensors under
# TRITON_INTERPRET=1).
def launch_lerp_(avg: Sequence[Tensor], src: Sequence[Tensor], weight: Tensor | float) -> None:
    checks.check_lerp(avg, src, weight)
    if avg:
        _launch(_lerp_kernel, [avg, _contiguous(src)], (0, 1), _device_weight(weight, avg[0].device))


def launch_moments_(
    mean: Sequence[Tensor], sq: Sequence[Tensor], src: Sequence[Tensor], weight: Tensor | float
) -> None:
    checks.check_moments(mean, sq, src, weight)
    if mean:
        _launch(_moments_kernel, [mean, sq, _contiguous(src)], (0, 2), _device_weight(weight, mean[0].device))


def launch_copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    checks.check_copy(dst, src)
    _launch(_copy_kernel, [dst, _contiguous(src)], (0, 1))


def launch_swap_(a: Sequence[Tensor], b: Sequence[Tensor]) -> None:
    checks.check_swap(a, b)
    _launch(_swap_kernel, [a, b], (0, 1))


def _runs_here(tensors: Sequence[Tensor]) -> bool:
    return bool(tensors) and runs_on(tensors[0].device)


# The registered ops. A custom op must not alias its inputs in its outputs; these return nothing.
@torch.library.custom_op("swa_fast::lerp_triton", mutates_args=("avg",))
def lerp_triton(avg: list[Tensor], src: list[Tensor], weight: Tensor) -> None:
    (launch_lerp_ if _runs_here(avg) else _checked(checks.check_lerp, reference.lerp_))(avg, src, weight)


@torch.library.custom_op("swa_fast::moments_triton", mutates_args=("mean", "sq"))
def moments_triton(mean: list[Tensor], sq: list[Tensor], src: list[Tensor], weight: Tensor) -> None:
    (launch_moments_ if _runs_here(mean) else _checked(checks.check_moments, reference.moments_))(
        mean, sq, src, weight
    )


@torch.library.custom_op("swa_fast::copy_triton", mutates_args=("dst",))
def copy_triton(dst: list[Tensor], src: list[Tensor]) -> None:
    (launch_copy_ if _runs_here(dst) else _checked(checks.check_copy, reference.copy_))(dst, src)


@torch.library.custom_op("swa_fast::swap_triton", mutates_args=("a", "b"))
def swap_triton(a: list[Tensor], b: list[Tensor]) -> None:
    (launch_swap_ if _runs_here(a) else _checked(checks.check_swap, reference.swap_))(a, b)


def _checked(check, impl):
    def run(*args):
        check(*args)
        impl(*args)

    return run


# Fake kernels: the same checks on shapes and dtypes, nothing to compute.
lerp_triton.register_fake(checks.check_lerp)
moments_triton.register_fake(checks.check_moments)
copy_triton.register_fake(checks.check_copy)
swap_triton.register_fake(checks.check_swap)
