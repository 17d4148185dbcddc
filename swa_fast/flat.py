"""FlatBuffer: tensors stored in one contiguous buffer per (device, dtype) group.

Every tensor gets a view with its own shape inside its group's buffer, so a whole group is one
allocation and one fused op call, and the views can stand in for a model's parameters
(`param.data = view`) without changing what the model computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils import dlpack

from . import ops


@torch.no_grad()
def copy_lists(
    dst: Sequence[Tensor], src: Sequence[Tensor], non_blocking: bool = False, backend: str | None = None
) -> None:
    """dst[i] = src[i]: one fused swa_fast.copy_ when both sides are floating and on one device, or
    integer lists (a model's `num_batches_tracked`) that the op takes as they are (each pair of one
    dtype, on one device, the destination contiguous); else torch's per-tensor copies (across
    devices; with `non_blocking`, asynchronous where pinned memory allows: the caller waits before
    the host reads `dst`)."""
    if not dst:
        return
    device = dst[0].device
    fused = all(t.device == device for t in src) and (
        dst[0].is_floating_point()
        or all(d.dtype == s.dtype and d.device == device and d.is_contiguous() for d, s in zip(dst, src))
    )
    if fused:
        ops.copy_(dst, src, backend=backend)
    else:
        torch._foreach_copy_(dst, src, non_blocking=non_blocking)


@torch.no_grad()
def write_through_strides(
    dst: Sequence[Tensor], write: Callable[[list[Tensor]], None], keep_values: bool = False
) -> None:
    """`write(dst)` for a fused op that writes only contiguous tensors, when `dst` may hold strided
    ones (a channels_last convolution, a transposed parameter): each strided tensor is replaced by a
    contiguous temporary (holding its values when `keep_values`, as `swap_` needs), which is copied
    back through the tensor's own strides after `write` returned. Should `write` raise, nothing is
    copied back, so `dst` stays as the op left it (as it was: the ops check before writing). A list
    of contiguous tensors goes straight through."""
    stand_ins = contiguous_stand_ins(dst, keep_values)
    write(stand_ins)
    for t, stand_in in zip(dst, stand_ins):
        if stand_in is not t:
            t.copy_(stand_in)


def contiguous_stand_ins(tensors: Sequence[Tensor], keep_values: bool = False) -> list[Tensor]:
    """`tensors`, each strided one replaced by a new contiguous tensor of its shape and dtype
    (holding its values when `keep_values`): what a fused op writes in its place."""
    return [t if t.is_contiguous() else _stand_in(t, keep_values) for t in tensors]


def _stand_in(t: Tensor, keep_values: bool) -> Tensor:
    if keep_values:
        return t.contiguous()
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def copy_into_strided(dst: Sequence[Tensor], src: Sequence[Tensor], backend: str | None = None) -> None:
    """`copy_lists(dst, src)` where `dst` may hold strided tensors (a model's): each receives its
    value through its own strides, rounded once, as a contiguous one would."""
    write_through_strides(dst, lambda stand_ins: copy_lists(stand_ins, src, backend=backend))


# The device types whose tensors DLPack exports (a meta stand-in, say, stays a view).
_DLPACK_DEVICES = ("cpu", "cuda")


def own_bytes(t: Tensor) -> Tensor:
    """`t` for a state dict: where it is a contiguous part of a larger storage (a view of a flat
    buffer), a tensor over the very same memory whose storage is its own bytes only (through DLPack:
    no copy). torch.save writes a tensor's whole storage, so a saved state, or any part of one, then
    holds only its own tensors' bytes, while its entries are still the averages (a load into them,
    DCP's in place too, writes the flat buffer). Anything else (a Parameter, a DTensor, a tensor of
    its own storage) is given back as it is."""
    if type(t) is not Tensor or t.requires_grad or not t.is_contiguous():
        return t
    if t.device.type not in _DLPACK_DEVICES or t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return dlpack.from_dlpack(dlpack.to_dlpack(t))


# Every view of a flat buffer starts at a multiple of this many elements: 16 bytes for 2-byte dtypes,
# more for wider ones, so the fused ops' vector paths (128-bit accesses) take every average. In
# elements, not bytes, so that the layout depends on the shapes only: a flat tensor of another dtype
# laid out like a group (a staging copy, a snapshot, a SWAG deviation row) cuts into the same views.
# The padding between views is zero in the buffers and never read by a view.
ALIGN_ELEMENTS = 8


def padded_numel(numel: int) -> int:
    """The elements a tensor of `numel` elements takes in a flat buffer, padding included."""
    return -(-numel // ALIGN_ELEMENTS) * ALIGN_ELEMENTS


def flat_numel(shapes: Sequence[torch.Size]) -> int:
    """The length of a flat buffer holding tensors of `shapes`."""
    return sum(padded_numel(s.numel()) for s in shapes)


def _shaped_parts(flat: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Views of the 1-D `flat` with `shapes`, each starting at a multiple of ALIGN_ELEMENTS."""
    parts = flat.split([padded_numel(s.numel()) for s in shapes])
    return [part[: shape.numel()].view(shape) for part, shape in zip(parts, shapes)]


def check_same_shapes(names: Sequence[str], tensors: Sequence[Tensor], kept: Sequence[Tensor]) -> None:
    """Raise, naming the first tensor whose shape is not its kept copy's (a comparison of shapes,
    no device work)."""
    for name, t, copy in zip(names, tensors, kept):
        if t.shape != copy.shape:
            raise ValueError(
                f"swa_fast: '{name}' has shape {list(t.shape)}, but the copy of it kept here has shape "
                f"{list(copy.shape)} (another model, or a resized tensor?)"
            )


@dataclass
class FlatGroup:
    device: torch.device
    dtype: torch.dtype
    buffer: Tensor  # 1-D, contiguous
    indices: list[int]  # positions, in the input order, of the tensors stored here


class FlatBuffer:
    """Copies of `tensors` (values included) in one contiguous buffer per (device, dtype);
    `views[i]` has the shape of `tensors[i]` and starts at a multiple of ALIGN_ELEMENTS (zeros
    between views), so that the fused ops move it 128 bits at a time.

    Args:
        tensors: what to copy.
        dtype, device: when given, replace every tensor's own dtype / device (for example an fp32
            average of a bf16 model).
        pin_memory: pin CPU buffers, so that copies between them and a GPU are asynchronous.
        names: the tensors' names, for error messages (default: their positions).
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        pin_memory: bool = False,
        names: Sequence[str] | None = None,
    ) -> None:
        self.names = list(names) if names is not None else [f"tensor {i}" for i in range(len(tensors))]
        placement: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(tensors):
            key = (torch.device(device) if device is not None else t.device, dtype or t.dtype)
            placement.setdefault(key, []).append(i)
        self.views: list[Tensor] = [torch.empty(0)] * len(tensors)
        self.groups: list[FlatGroup] = []
        for (dev, dt), indices in placement.items():
            shapes = [tensors[i].shape for i in indices]
            buffer = torch.zeros(flat_numel(shapes), dtype=dt, device=dev, pin_memory=pin_memory)
            for i, view in zip(indices, _shaped_parts(buffer, shapes)):
                self.views[i] = view
            self.groups.append(FlatGroup(dev, dt, buffer, indices))
        for _, views, src in self.pairs(tensors):
            copy_lists(views, src)

    def __len__(self) -> int:
        return len(self.views)

    # Pickled, the views are rebuilt from the buffers: plain pickle saves each tensor on its own,
    # which would leave them copies that no longer see the buffers' updates.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "views": [v.shape for v in self.views]}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        shapes, self.views = self.views, [torch.empty(0)] * len(self.views)
        for g in self.groups:
            for i, view in zip(g.indices, _shaped_parts(g.buffer, [shapes[i] for i in g.indices])):
                self.views[i] = view

    def check_shapes(self, tensors: Sequence[Tensor]) -> None:
        """Raise, naming the first mismatch, unless `tensors` (in the input order) have the shapes
        of their copies here. Each group's op checks its own tensors before writing, but with
        several groups a later group's mismatch would be found after earlier groups were written:
        run this first then (a comparison of shapes, no device work)."""
        if len(tensors) != len(self.views):
            raise ValueError(f"swa_fast: expected {len(self.views)} tensors, got {len(tensors)}")
        check_same_shapes(self.names, tensors, self.views)

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
        return _shaped_parts(flat, [self.views[i].shape for i in group.indices])

    def pairs(self, tensors: Sequence[Tensor]) -> list[tuple[FlatGroup, list[Tensor], list[Tensor]]]:
        """(group, its views, the matching `tensors`) per group; `tensors` are in the input order of
        the buffer's tensors. With one group (the common case) no list is built."""
        if len(self.groups) == 1:
            return [(self.groups[0], self.views, list(tensors))]
        return [(g, [self.views[i] for i in g.indices], [tensors[i] for i in g.indices]) for g in self.groups]
