"""`BufferCopy`: torch's `dst[i].copy_(src[i])` over two lists of buffers, for a caller that makes
it on every update (`swa_utils.AveragedModel` copies the model's buffers into its averaged copy at
every update, as torch's does with `use_buffers=False`)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops


class BufferCopy:
    """Copies `src` into `dst`, index by index, by one `swa_fast.copy_` on `device`: floating
    buffers cast with one rounding, as `Tensor.copy_` does, integer and bool ones (BatchNorm's
    `num_batches_tracked`) bit for bit, without `torch._foreach_copy_`'s dispatch per tensor on
    the CPU.

    What the op refuses (it checks before writing) is what only torch copies: another device,
    an integer from another dtype, a shape torch broadcasts, a strided destination, buffers that
    share memory. That call and every later one are then `torch._foreach_copy_`, which copies what
    torch copies and raises what torch raises (`by_op` is False). A caller makes a new BufferCopy
    when its lists are other tensors."""

    def __init__(self, device: torch.device) -> None:
        self._copy = ops.BoundOp("copy_", device)
        self._eager = self._copy.eager
        self.by_op = True  # until the op refuses the lists

    def __call__(self, dst: list[Tensor], src: list[Tensor], eager: bool = False) -> None:
        """`eager`: the caller has found that torch.compile is not tracing, so the op's entry point
        in the extension is called straight."""
        if self.by_op:
            copy = self._eager if eager and self._eager is not None else self._copy
            try:
                copy(dst, src)
                return
            except ValueError:
                self.by_op = False
        torch._foreach_copy_(dst, src)
