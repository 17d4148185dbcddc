"""`BufferCopy`: torch's `dst[i].copy_(src[i])` over two lists of buffers, for a caller that makes
it on every update (`swa_utils.AveragedModel` copies the model's buffers into its averaged copy at
every update, as torch's does with `use_buffers=False`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import ops
from .model_tensors import pick


class BufferCopy:
    """Copies `src` into `dst`, index by index, at a fraction of `torch._foreach_copy_`'s cost
    (a microsecond of dispatch, then a third of one per tensor on the CPU):

    - the floating pairs on the op's device (`device`) by one `swa_fast.copy_`, which casts with
      one rounding, as `Tensor.copy_` does;
    - 0-dim integer CPU pairs of one dtype (BatchNorm's `num_batches_tracked`, one per layer)
      through numpy views of their memory, a twentieth of a microsecond each;
    - the rest by `torch._foreach_copy_`.

    `dst` is the caller's own list, the same object for as long as it holds the same tensors (a
    new list when one changed); `src` is read anew on every call (a walk of a model). Which pair
    goes where is worked out at the first call and again when `dst` is another list, `src` has
    another length, or a 0-dim pair is not the tensors it was made for (a `.to()` replaces
    buffers) or their memory moved (`.data = ...`). Should the op refuse its pairs (shapes that
    differ, buffers that share memory), that call and the next ones with this `dst` are torch's
    `_foreach_copy_` of both lists, which copies what torch copies and raises what torch raises.

    A numpy write does not bump the tensor's version counter (`Tensor.copy_` does): nothing reads
    that of an averaged copy's `num_batches_tracked`."""

    def __init__(self, device: torch.device) -> None:
        self._copy = ops.BoundOp("copy_", device)
        self._eager = self._copy.eager
        self._dst: list[Tensor] | None = None  # the list the layout below was worked out for
        self._length = 0
        self._fused_dst: list[Tensor] = []  # dst's floating tensors the op writes
        self._fused_src: Callable[[list], list] | None = None  # src's tensors at the same places
        # per 0-dim integer CPU pair: (index, src, its data_ptr, dst, its data_ptr, dst's numpy view, src's)
        self._scalars: list[tuple] = []
        self._rest: Callable[[list], list] | None = None  # the places torch copies

    def __call__(self, dst: list[Tensor], src: list[Tensor], eager: bool = False) -> None:
        """`eager`: the caller has found that torch.compile is not tracing, so the op's entry point
        in the extension is called straight."""
        if dst is not self._dst or len(src) != self._length:
            self._lay_out(dst, src)
        if self._fused_src is not None:
            copy = self._eager if eager and self._eager is not None else self._copy
            try:
                copy(self._fused_dst, self._fused_src(src))
            except ValueError:  # refused before anything was written: torch copies, from now on
                self._fused_src, self._scalars = None, []
                self._rest = pick(list(range(len(dst))))
                torch._foreach_copy_(dst, src)
                return
        for i, s, s_ptr, d, d_ptr, dst_view, src_view in self._scalars:
            if src[i] is not s or s.data_ptr() != s_ptr or d.data_ptr() != d_ptr:
                self._lay_out(dst, src)  # copied again from the start: a copy twice is the same copy
                return self(dst, src, eager)
            dst_view[()] = src_view
        if self._rest is not None:
            torch._foreach_copy_(self._rest(dst), self._rest(src))

    def _lay_out(self, dst: list[Tensor], src: list[Tensor]) -> None:
        fused, scalars, rest = [], [], []
        device = self._copy.device
        for i, (d, s) in enumerate(zip(dst, src)):
            floating = d.is_floating_point() and s.is_floating_point()
            if floating and d.device == device == s.device and d.is_contiguous():
                fused.append(i)
            elif (views := _numpy_views(d, s)) is not None:
                scalars.append((i, s, s.data_ptr(), d, d.data_ptr(), *views))
            else:
                rest.append(i)
        self._dst, self._length = dst, len(src)
        self._fused_dst = [dst[i] for i in fused]
        self._fused_src = pick(fused) if fused else None
        self._scalars = scalars
        self._rest = pick(rest) if rest else None


def numpy_view(t: Tensor):
    """A numpy view of a plain 0-dim integer (or bool) CPU tensor's memory, else None: reading it
    and writing it cost a twentieth of a microsecond, against a dispatch for the tensor's own
    methods. The view keeps that memory alive, so while `t.data_ptr()` is the one the view was
    made at, it is still `t`'s memory (a `.data = ...` moves it)."""
    plain = type(t) is Tensor and not t.dim() and t.is_cpu and not t.requires_grad
    if not plain or t.is_floating_point() or t.is_complex():
        return None
    try:
        return t.numpy()
    except (TypeError, RuntimeError):  # a dtype numpy does not hold
        return None


def _numpy_views(dst: Tensor, src: Tensor) -> tuple | None:
    """Numpy views of two such tensors of one dtype, else None."""
    if dst.dtype != src.dtype:
        return None
    views = numpy_view(dst), numpy_view(src)
    return None if views[0] is None or views[1] is None else views
