"""torch.distributed: DDP, FSDP2 / DTensor local shards, checks across ranks, full state dicts.

DDP keeps the same weights on every rank, so every rank's manager keeps the same average without
any communication. FSDP2 (`fully_shard`) parameters are DTensors: a manager averages each rank's
own local shard with the fused ops (again no communication on update), and its state_dict exposes
the average as DTensors with the parameters' mesh, placements and global shapes, so
`torch.distributed.checkpoint` saves and loads it sharded. `full_state_dict` gathers it into plain
tensors on rank 0.

The handling lives in `model_tensors.TrackedModel` / `ModelCopy`, which every manager is built on;
this module holds the pieces they call: layouts of DTensors, local parts of saved states, checks
across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn import Module

from . import zero
from .wrappers import unwrap

try:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # a torch built without distributed support: no DTensor can exist
    dist = FSDPModule = FullyShardedDataParallel = DTensor = Shard = distribute_tensor = None


class Shards(NamedTuple):
    """How a DTensor parameter is laid out over ranks: what a local shard needs to become a DTensor
    again."""

    mesh: Any  # DeviceMesh
    placements: tuple
    shape: torch.Size  # global
    stride: tuple  # global

    def with_lead(self, lead: tuple[int, ...]) -> Shards:
        """The layout of a tensor of shape (*lead, *shape) whose trailing dims are laid out as this
        one (say a stack of per-parameter rows, SWAG's deviations): shard dims move by len(lead)."""
        if not lead:
            return self
        placements = []
        for p in self.placements:
            if p.is_shard() and type(p) is not Shard:
                raise ValueError(f"swa_fast: cannot stack tensors placed {p} (only Shard / Replicate)")
            placements.append(Shard(p.dim + len(lead)) if p.is_shard() else p)
        shape = torch.Size((*lead, *self.shape))
        return Shards(self.mesh, tuple(placements), shape, torch.empty(shape, device="meta").stride())

    def describe(self) -> str:
        return f"a DTensor of global shape {list(self.shape)} placed {list(self.placements)} on {self.mesh}"

    def local(self, tensor: Tensor) -> Tensor:
        """The local shard, which an update reads and a read of the average writes. `_local_tensor`
        rather than `to_local()`: the latter is an autograd Function call per tensor, a cost on the
        update path that grows with the number of parameters."""
        return tensor._local_tensor

    target = local


def shards_of(tensor: Tensor) -> Shards | None:
    """The layout of a DTensor; None for a plain tensor."""
    if DTensor is None or not isinstance(tensor, DTensor):
        return None
    return Shards(tensor.device_mesh, tuple(tensor.placements), tensor.shape, tuple(tensor.stride()))


Layout = Shards | zero.Partition | None  # how a rank holds its part of a tensor; None: whole


def layout_of(tensor: Tensor, source: str = "params") -> Layout:
    """A DTensor's layout, a DeepSpeed ZeRO parameter's partition (the part of it `source` says
    an average follows: see zero.py), or None for a tensor every rank holds whole."""
    return shards_of(tensor) or zero.partition_of(tensor, source)


def with_lead(layout: Layout, lead: tuple[int, ...]) -> Layout:
    """`layout.with_lead(lead)`, and None for a plain tensor's (None) layout."""
    if layout is None or not lead:
        return layout
    if isinstance(layout, zero.Partition):
        raise ValueError(
            "swa_fast: stacks of per-parameter rows (SWAG's deviations, FGE's snapshots) of DeepSpeed "
            "ZeRO partitions are not supported; average with SWA, EMA or PostHocEMA"
        )
    return layout.with_lead(tuple(lead))


def check_layouts(
    names: Sequence[str], tensors: Sequence[Tensor], layouts: Sequence[Layout], owner: str
) -> None:
    """Raise unless `tensors` (another model's) are sharded as `layouts` (the tracked model's):
    local shards of other layouts do not line up with the stored ones."""
    for name, t, layout in zip(names, tensors, layouts):
        if isinstance(layout, zero.Partition):
            if not layout.fits(t):
                raise ValueError(
                    f"swa_fast: '{name}' is not {layout.describe()} holding the same piece on this rank as "
                    f"in the model this {owner} was made for; partition both models alike"
                )
            continue
        got = shards_of(t)
        if got is None and layout is None:
            continue
        if got is None or layout is None or got[:3] != layout[:3]:
            said = "a plain tensor" if got is None else got.describe()
            expected = "a plain tensor" if layout is None else layout.describe()
            raise ValueError(
                f"swa_fast: '{name}' is {said} in this model but was {expected} in the model this "
                f"{owner} was made for; shard both models alike (or load a full state dict "
                "from swa_fast.distributed.full_state_dict into an unsharded one)"
            )


def local_tensors(tensors: Sequence[Tensor], layouts: Sequence[Layout]) -> list[Tensor]:
    """What an update reads of each tensor: a DTensor's local shard (which shares its storage:
    writes reach the parameter), a ZeRO parameter's partition, other tensors as they are."""
    return [t if s is None else s.local(t) for t, s in zip(tensors, layouts)]


def local_targets(tensors: Sequence[Tensor], layouts: Sequence[Layout]) -> list[Tensor]:
    """Where a read of the average writes each tensor: the same as `local_tensors` but for a ZeRO
    average of the optimizer's master partition, written into the parameter's own piece."""
    return [t if s is None else s.target(t) for t, s in zip(tensors, layouts)]


def as_dtensor(local: Tensor, layout: Layout) -> Tensor:
    """`local` (a rank's shard) as a DTensor laid out as `layout`, sharing its storage; a plain
    tensor when `layout` is None or a ZeRO partition (saved as the rank's own piece)."""
    if layout is None or isinstance(layout, zero.Partition):
        return local
    with torch.no_grad():  # a view made under autograd could not be written in place (DCP load does)
        return DTensor.from_local(
            local, layout.mesh, layout.placements, run_check=False, shape=layout.shape, stride=layout.stride
        )


def local_part(value: Tensor, layout: Layout, name: str) -> Tensor:
    """This rank's part of a saved `value` for a tensor laid out as `layout`: the local shard of a
    DTensor laid out the same way, or the slice of a full (gathered) tensor that is this rank's (no
    communication). Raises ValueError for a DTensor laid out otherwise."""
    if isinstance(layout, zero.Partition):
        return layout.part_of(value, name)
    if layout is None:
        if shards_of(value) is not None:
            raise ValueError(
                f"swa_fast: '{name}' is {shards_of(value).describe()} in the state_dict, but a plain "
                "tensor here; load a full state dict (swa_fast.distributed.full_state_dict) instead"
            )
        return value
    saved = shards_of(value)
    if saved is None:  # a full tensor (a gathered state dict): keep this rank's part
        return distribute_tensor(value, layout.mesh, layout.placements, src_data_rank=None)._local_tensor
    if saved.mesh != layout.mesh or saved.placements != layout.placements:
        raise ValueError(
            f"swa_fast: '{name}' is {saved.describe()} in the state_dict, but {layout.describe()} "
            "here; torch.distributed.checkpoint.load "
            "reshards a saved checkpoint into this manager's state_dict"
        )
    return value._local_tensor


def reshard(model: Module) -> bool:
    """Put the sharded parameters back into every FSDP2 module of `model` (after a forward without
    backward, the root keeps its gathered ones) and free what FSDP1 modules keep gathered; no
    communication. False if there are none."""
    if FSDPModule is None:
        return False
    found = False
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
            found = True
        elif isinstance(module, FullyShardedDataParallel):
            _free_fsdp1_gathered(module)
            found = True
    return found


def _free_fsdp1_gathered(module: Module) -> None:
    """FSDP1 (`FullyShardedDataParallel`) keeps a forward's gathered flat parameter when no backward
    follows (the root's, always), and its next forward uses that copy without gathering again, so
    it would not see values written into the shards since: free it, as FSDP1 does after a backward.
    FSDP1 has no public call for this; `_reshard` is the one its own runtime calls."""
    handle = module._handle
    if handle is None or not handle.uses_sharded_strategy:
        return
    # (the gathered flat parameter exists from the first forward on)
    if hasattr(handle.flat_param, "_full_param_padded") and not handle.needs_unshard():
        from torch.distributed.fsdp._runtime_utils import _reshard

        _reshard(module, handle, free_unsharded_flat_param=True)


def groups_of(wrapper: Module, layouts: Sequence[Layout]) -> list:
    """The process groups over which a model must be the same on every rank: the DDP wrapper's, or
    each dimension of its DTensors' mesh (ranks along any one dimension hold the same module, and
    the dimensions together connect the whole mesh). Empty for a model on one process."""
    if dist is None or not dist.is_initialized():
        return []
    ddp = unwrap(wrapper)[1]
    if ddp is not None:
        return [ddp.process_group]
    partition = next((s for s in layouts if isinstance(s, zero.Partition)), None)
    if partition is not None:
        return [partition.group]
    mesh = next((s.mesh for s in layouts if s is not None), None)
    if mesh is None:
        return []
    return [mesh.get_group(d) for d in range(mesh.ndim)]


def check_same_on_all_ranks(fingerprint: list, groups: Sequence, owner: str) -> None:
    """Raise ValueError on every rank (so none is left waiting in a collective) unless every rank of
    `groups` has the same `fingerprint`: a list of (what, value) pairs describing its model."""
    for group in groups:
        if dist.get_world_size(group) == 1:
            continue
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, fingerprint, group=group)
        ranks = dist.get_process_group_ranks(group)
        for rank, other in zip(ranks, gathered):
            if other == gathered[0]:
                continue
            differing = [(a, b) for a, b in zip(gathered[0], other) if a != b]
            if not differing:
                what = f"{len(gathered[0])} vs {len(other)} entries"
            elif differing[0][0][0] == differing[0][1][0]:  # same name, other value
                (what, mine), (_, theirs) = differing[0]
                what = f"{what}: {mine} vs {theirs}"
            else:
                what = f"{': '.join(map(str, differing[0][0]))} vs {': '.join(map(str, differing[0][1]))}"
            raise ValueError(
                f"swa_fast: the {owner} on rank {ranks[0]} and on rank {rank} were given different models "
                f"({what}). Every rank must pass the same (DDP or FSDP2) model and options, or the "
                "averages would not fit together."
            )


def shared_draw(draw: Tensor, layouts: Sequence[Layout]) -> Tensor:
    """`draw` (a random tensor) replaced in place by the first rank's, on every rank of the
    DTensors' mesh (along each of its dimensions): for a draw that multiplies whole parameter
    vectors, such as SWAG's low-rank noise, which every rank's shards must share. As is without
    DTensors."""
    mesh = next((s.mesh for s in layouts if isinstance(s, Shards)), None)
    if mesh is None:
        return draw
    for d in range(mesh.ndim):
        group = mesh.get_group(d)
        dist.broadcast(draw, src=dist.get_global_rank(group, 0), group=group)
    return draw


def rank_in(wrapper: Module) -> int:
    """This process's rank in the DDP wrapper's group (or the default group); 0 without
    torch.distributed."""
    if dist is None or not dist.is_initialized():
        return 0
    ddp = unwrap(wrapper)[1]
    return dist.get_rank(ddp.process_group if ddp is not None else None)


def full_state_dict(state: dict, *, rank0_only: bool = True, cpu: bool = True) -> dict:
    """A manager's `state_dict()` with every DTensor gathered into a plain full tensor (on the CPU
    with `cpu=True`): what a single-process manager of the unsharded model saves and loads.

    A collective: every rank must call it with its own manager's state_dict. With `rank0_only`,
    rank 0 gets the result and the other ranks an empty dict (so a full copy never sits on every
    rank). Every manager's `load_state_dict` accepts the result on any rank, sharded or not, and
    keeps each rank's part.

        full = swa_fast.distributed.full_state_dict(ema.state_dict())
        if dist.get_rank() == 0:
            torch.save(full, "ema_full.pt")
    """
    keep = not rank0_only or dist is None or not dist.is_initialized() or dist.get_rank() == 0

    def gather(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: gather(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(gather(v) for v in value)
        if not isinstance(value, Tensor):
            return value
        if shards_of(value) is not None:
            value = value.full_tensor()  # every rank takes part, in the same (dict) order
        return value.detach().to("cpu" if cpu else value.device, copy=True) if keep else None

    out = gather(state)
    return out if keep else {}


def element_firsts(shapes: Sequence[torch.Size], layouts: Sequence, owner: str) -> list[int]:
    """Where each tensor's local part starts in the whole model's flat layout (its tensors end to end
    in order, each padded as a flat buffer pads it): the index stochastic rounding draws by, so the
    same element gets the same bits whatever the sharding. `shapes` are the global shapes; a DTensor
    must be replicated or sharded along its first dim only (FSDP2's), whose local shard is one
    range of the global tensor; a ZeRO partition starts at its own offset."""
    from .flat import padded_numel

    firsts, at = [], 0
    for shape, layout in zip(shapes, layouts):
        firsts.append(at + _local_start(shape, layout, owner))
        at += padded_numel(shape.numel())
    return firsts


def _local_start(shape: torch.Size, layout, owner: str) -> int:
    """The index in the global tensor of the local part's first element."""
    if layout is None:
        return 0
    if isinstance(layout, zero.Partition):
        return layout.start
    if any(p.is_shard() and p.dim != 0 for p in layout.placements):
        raise ValueError(
            f"swa_fast.{owner}: rounding='stochastic' numbers each element by its place in the whole "
            f"model, which a shard along another dim than the first does not keep in one range; got "
            f"{layout.describe()}"
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(shape, layout.mesh, layout.placements)
    return offset[0] * (shape.numel() // shape[0]) if shape and shape[0] else 0
