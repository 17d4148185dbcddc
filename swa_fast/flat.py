"""FlatBuffer: tensors stored in one contiguous buffer per (device, dtype) group.

Every tensor gets a view with its own shape inside its group's buffer, so a whole group is one
allocation and one fused op call, and the views can stand in for a model's parameters
(`param.data = view`) without changing what the model computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops


@torch.no_grad()
def copy_lists(
    dst: Sequence[Tensor], src: Sequence[Tensor], non_blocking: bool = False, backend: str | None = None
) -> None:
    """dst[i] = src[i]: one fused swa_fast.copy_ when both sides are floating and on one device,
    else torch's per-tensor copies (across devices; with `non_blocking`, asynchronous where pinned
    memory allows: the caller waits before the host reads `dst`)."""
    if not dst:
        return
    device = dst[0].device
    if dst[0].is_floating_point() and all(t.device == device for t in src):
        ops.copy_(dst, src, backend=backend)
    else:
        torch._foreach_copy_(dst, src, non_blocking=non_blocking)


@dataclass
class FlatGroup:
    device: torch.device
    dtype: torch.dtype
    buffer: Tensor  # 1-D, contiguous
    indices: list[int]  # positions, in the input order, of the tensors stored here


class FlatBuffer:
    """Copies of `tensors` (values included) in one contiguous buffer per (device, dtype);
    `views[i]` has the shape of `tensors[i]`.

    Args:
        tensors: what to copy.
        dtype, device: when given, replace every tensor's own dtype / device (for example an fp32
            average of a bf16 model).
        pin_memory: pin CPU buffers, so that copies between them and a GPU are asynchronous.
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        pin_memory: bool = False,
    ) -> None:
        placement: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(tensors):
            key = (torch.device(device) if device is not None else t.device, dtype or t.dtype)
            placement.setdefault(key, []).append(i)
        self.views: list[Tensor] = [torch.empty(0)] * len(tensors)
        self.groups: list[FlatGroup] = []
        for (dev, dt), indices in placement.items():
            numels = [tensors[i].numel() for i in indices]
            buffer = torch.empty(sum(numels), dtype=dt, device=dev, pin_memory=pin_memory)
            for i, part in zip(indices, buffer.split(numels)):
                self.views[i] = part.view(tensors[i].shape)
            self.groups.append(FlatGroup(dev, dt, buffer, indices))
        for _, views, src in self.pairs(tensors):
            copy_lists(views, src)

    def __len__(self) -> int:
        return len(self.views)

    def nbytes(self) -> int:
        return sum(g.buffer.numel() * g.buffer.element_size() for g in self.groups)

    def group_views(self, group: int) -> list[Tensor]:
        """The views of the `group`-th group's tensors."""
        if len(self.groups) == 1:
            return self.views
        return [self.views[i] for i in self.groups[group].indices]

    def views_of(self, group: FlatGroup, flat: Tensor) -> list[Tensor]:
        """Views with the shapes of `group`'s tensors into `flat`, a 1-D tensor of the group's
        length laid out like the group (a row of a SWAG deviation matrix, a SWAG sample)."""
        shapes = [self.views[i].shape for i in group.indices]
        return [part.view(shape) for part, shape in zip(flat.split([s.numel() for s in shapes]), shapes)]

    def pairs(self, tensors: Sequence[Tensor]) -> list[tuple[FlatGroup, list[Tensor], list[Tensor]]]:
        """(group, its views, the matching `tensors`) per group; `tensors` are in the input order of
        the buffer's tensors. With one group (the common case) no list is built."""
        if len(self.groups) == 1:
            return [(self.groups[0], self.views, list(tensors))]
        return [(g, [self.views[i] for i in g.indices], [tensors[i] for i in g.indices]) for g in self.groups]
