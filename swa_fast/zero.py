"""DeepSpeed ZeRO partitions: the piece of each parameter a rank holds, averaged where it lives.

Under ZeRO-3 a parameter is an empty placeholder between forwards; its values live in
`param.ds_tensor`, this rank's contiguous piece of the flattened parameter (padded at the end on
the last ranks), and the optimizer keeps an fp32 copy of the same piece (the master partition).
Under ZeRO-1 and ZeRO-2 every rank holds the whole parameter, but the optimizer's fp32 master
weights are partitioned: each rank has a contiguous piece of the flattened parameters (maybe none
of a given one), `param._hp_mapping`.

A `Partition` is the layout `model_tensors.TrackedModel` keeps for such a parameter, beside
FSDP2's `distributed.Shards`: where this rank's piece lies in the flattened parameter, what an
update reads (`local`: the parameter's partition, or the master partition with `source="master"`)
and what a read of the average writes (`target`: the parameter's own partition, or under ZeRO-1/2
this rank's slice of the whole parameter). An update reads and writes only this rank's piece: no
gather, no communication. Communication happens only where a whole parameter is needed: after the
average is written into the model (`after_write`: the gathered copies ZeRO-3 keeps of persistent
parameters, ZeRO-1/2's whole parameters from every rank's slice) and in `gather` (an export).

A parameter is recognised by the attributes DeepSpeed gives it; DeepSpeed itself is imported only
to find a ZeRO-3 parameter's master piece (its `safe_get_local_fp32_param`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

try:
    import torch.distributed as dist
except ImportError:  # a torch built without distributed support: no DeepSpeed either
    dist = None

SOURCES = ("master", "params")


def is_zero3(param: Tensor) -> bool:
    """A parameter partitioned by ZeRO-3 (`deepspeed.zero.Init` or a stage-3 engine)."""
    return hasattr(param, "ds_tensor") and hasattr(param, "ds_id")


class Partition:
    """This rank's piece of a ZeRO parameter: elements [start, start + numel) of the flattened
    parameter (the local tensors may be longer: ZeRO-3 pads the last pieces), for an average of
    `source` ("params": the parameter's own partition; "master": the optimizer's fp32 copy)."""

    def __init__(
        self, stage: int, source: str, start: int, numel: int, length: int, shape: torch.Size, group: Any
    ) -> None:
        self.stage, self.source = stage, source
        self.start, self.numel = start, numel
        self.length = length  # of the local tensors (numel, and ZeRO-3's padding)
        self.shape = torch.Size(shape)
        self.group = group
        self._found = True  # group and master piece read from the parameter (not after unpickling)
        self._master: Tensor | None = None  # the optimizer's fp32 piece (source "master")

    def __getstate__(self) -> dict:
        # A pickled manager keeps what was tracked, not the model or its optimizer (TrackedModel).
        return {k: v for k, v in self.__dict__.items() if k not in ("group", "_master")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, group=None, _master=None, _found=False)

    def describe(self) -> str:
        """The same words on every rank (the cross-rank check compares them)."""
        stage = "ZeRO-3" if self.stage == 3 else "ZeRO-1/2"
        return f"a {stage} partition ({self.source}) of a parameter of shape {list(self.shape)}"

    def local(self, param: Tensor) -> Tensor:
        """What an update reads: this rank's piece, as the optimizer left it."""
        if not self._found:  # unpickled: found again from the parameter
            found = partition_of(param, self.source)
            self.group, self._master, self._found = found.group, found._master, True
        return param.ds_tensor if self.source == "params" else self._master

    def target(self, param: Tensor) -> Tensor:
        """Where the average is written for evaluation: the parameter's own piece."""
        if self.stage == 3:
            return param.ds_tensor
        return param.data.view(-1).narrow(0, self.start, self.numel)

    def fits(self, param: Tensor) -> bool:
        """Whether another model's `param` is partitioned alike (the same piece of the same shape)."""
        other = partition_of(param, self.source)
        return other is not None and (other.stage, other.start, other.numel, other.shape) == (
            self.stage, self.start, self.numel, self.shape,
        )  # fmt: skip

    def saved_shapes(self) -> tuple[torch.Size, torch.Size]:
        """The shapes a state_dict may hold for this tensor: this rank's piece, or the whole."""
        return torch.Size([self.length]), self.shape

    def part_of(self, value: Tensor, name: str) -> Tensor:
        """This rank's part of a saved `value`: a saved piece as it is, or the piece of a whole
        parameter (an export), padded with zeros as ZeRO-3 pads."""
        if value.shape == (self.length,) and value.shape != self.shape:
            return value
        if value.shape != self.shape:
            raise ValueError(
                f"swa_fast: '{name}' has shape {list(value.shape)} in the state_dict, but this rank holds "
                f"{self.length} elements of {self.describe()}; load the state this rank saved, or a "
                "whole parameter of that shape"
            )
        piece = value.reshape(-1).narrow(0, self.start, self.numel)
        if self.length == self.numel:
            return piece
        return torch.cat([piece, piece.new_zeros(self.length - self.numel)])


def partition_of(param: Tensor, source: str) -> Partition | None:
    """The partition of a ZeRO parameter (None for any other tensor, and under ZeRO-1/2 for
    `source="params"`, whose whole parameters every rank holds alike, as under DDP). A parameter
    without a master copy (a frozen one) is averaged from its own partition."""
    if is_zero3(param):
        size = param.ds_tensor.numel()
        start = dist.get_rank(param.ds_process_group) * size
        numel = max(0, min(size, param.ds_numel - start))
        out = Partition(3, "params", start, numel, size, param.ds_shape, param.ds_process_group)
        if source == "master" and getattr(param, "_z3_optimizer", None) is not None:
            out._master = _master_piece(param, param._z3_optimizer.fp32_partitioned_groups_flat)
            out.source = "params" if out._master is None else "master"
        return out
    if source != "master" or not hasattr(param, "_hp_mapping"):
        return None
    mapping = param._hp_mapping  # None: this rank holds no piece of this parameter
    held = None if mapping is None else mapping.lp_fragment_address
    start, numel = (0, 0) if held is None else (held.start, held.numel)
    out = Partition(2, source, start, numel, numel, param.shape, param._dp_group)
    none = torch.empty(0, dtype=torch.float32, device=param.device)
    out._master = none if mapping is None else mapping.get_hp_fragment()
    return out


def _master_piece(param: Tensor, flat_groups: Sequence[Tensor]) -> Tensor | None:
    """The optimizer's fp32 piece of a ZeRO-3 parameter, as a view of its flat fp32 partition (None
    for a parameter the optimizer does not step). The view stays valid while the optimizer keeps
    that partition; an offloaded optimizer hands out copies, which an average cannot follow."""
    from deepspeed.utils import safe_get_local_fp32_param

    piece = safe_get_local_fp32_param(param)
    if piece is None:
        return None
    owners = {g.untyped_storage().data_ptr() for g in flat_groups}
    if piece.untyped_storage().data_ptr() not in owners:
        raise ValueError(
            "swa_fast: DeepSpeed hands out copies of this optimizer's fp32 partitions (offload_optimizer "
            "keeps them elsewhere), so an average of source='master' would not see its steps; use "
            "source='params' (the parameters' own partitions)"
        )
    return piece


def _pieces(partitions: Sequence[Partition]) -> list[list[tuple[int, int]]]:
    """Every rank's (start, numel) of each partition, rank by rank: one collective per `gather`
    (an export or a write, never an update)."""
    mine = [(p.start, p.numel) for p in partitions]
    group = partitions[0].group
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, mine, group=group)
    return out


def gather(locals_: Sequence[Tensor], partitions: Sequence[Partition]) -> list[Tensor]:
    """Whole tensors from every rank's pieces (`locals_[i]` this rank's of `partitions[i]`, as long
    as the partition's or longer), on every rank of the partitions' group: a collective. Each is
    gathered in its own dtype and shaped as its parameter."""
    if not partitions:
        return []
    pieces = _pieces(partitions)
    out = []
    for i, (local, part) in enumerate(zip(locals_, partitions)):
        longest = max(rank[i][1] for rank in pieces)
        sent = local.reshape(-1)[: part.numel]
        padded = torch.cat([sent, sent.new_zeros(longest - part.numel)]) if part.numel < longest else sent
        received = [padded.new_empty(longest) for _ in pieces]
        dist.all_gather(received, padded.contiguous(), group=part.group)
        whole = padded.new_empty(part.shape.numel())
        for (start, numel), got in zip((rank[i] for rank in pieces), received):
            whole[start : start + numel] = got[:numel]
        out.append(whole.view(part.shape))
    return out


@torch.no_grad()
def after_write(params: Sequence[Tensor], partitions: Sequence[Partition]) -> None:
    """After this rank's pieces of `params` were written: make the whole parameters the forward
    uses agree with them. ZeRO-3 keeps some parameters gathered between forwards (persistent ones,
    and those a forward left gathered): they are gathered again from the partitions, as DeepSpeed
    does after a step. Under ZeRO-1/2 each rank wrote its slice of the whole parameters: the slices
    are exchanged so every rank holds the whole written parameters."""
    zero3 = [p for p, part in zip(params, partitions) if part.stage == 3 and p.ds_status.name == "AVAILABLE"]
    if zero3:
        zero3[0].partition(zero3)  # drops the stale gathered copies (nothing is lost: they are copies)
        zero3[0].all_gather(zero3)
    sliced = [(p, part) for p, part in zip(params, partitions) if part.stage != 3]
    if sliced:
        targets = [part.target(p) for p, part in sliced]
        wholes = gather(targets, [part for _, part in sliced])
        for (p, _), whole in zip(sliced, wholes):
            p.data.copy_(whole)


@torch.no_grad()
def whole_state(named: dict[str, Tensor], layouts: dict[str, Any]) -> dict[str, Tensor]:
    """A manager's named state (`ModelCopy.named()`) with every ZeRO piece gathered into its whole
    tensor (a collective: every rank calls it), the other entries as they are."""
    parts = [(n, layouts[n]) for n in named if isinstance(layouts.get(n), Partition)]
    wholes = gather([named[n] for n, _ in parts], [p for _, p in parts])
    out = dict(named)
    out.update(zip((n for n, _ in parts), wholes))
    return out
