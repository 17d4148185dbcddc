"""timm's model EMAs on swa_fast's fused path: change the import, keep the code.

    from swa_fast.integrations.timm import ModelEmaV3   # was: from timm.utils import ModelEmaV3

`ModelEmaV3` and `ModelEmaV2` are subclasses of timm's, with the same arguments, attributes,
`module`, `get_decay`, `update`, `set` and `forward`; checkpoints are `ema.module.state_dict()` as
in timm. What changes is the storage of `module`'s averaged tensors (views of one flat buffer per
(device, dtype)) and the update: one `swa_fast.lerp_` per buffer instead of timm's state_dict walk
and per-tensor or `_foreach` ops. Stochastic rounding of bfloat16 averages (timm's default) runs
timm's own arithmetic and random draws on the flat buffer, chunk by chunk as timm does, so a seeded
run gives timm's bits. See docs/integrations.md for what differs.
"""

from __future__ import annotations

import operator

import torch
from timm.utils import model_ema as _timm
from torch import Tensor
from torch.nn import Module

from ..flat import check_same_shapes, copy_lists
from ..model_tensors import save_own_bytes
from ..weighting import count
from ._common import FlatShadow, check_count, pick, state_tensors

__all__ = ["ModelEmaV2", "ModelEmaV3"]

_OWNER = "integrations.timm.ModelEma"

# timm's chunk of stochastically rounded elements (the default of its _lerp_stochastic_round_bf16_)
_SR_CHUNK_NUMEL = 2**22


class _FlatModule:
    """The part both EMAs share: `module`'s averaged tensors re-pointed into flat buffers, rebuilt
    when something (a `.to()`, `load_state_dict(assign=True)`) gave them new storage."""

    module: Module
    device: torch.device | None

    def _averaged(self) -> list[Tensor]:
        """The tensors of `module` the update blends, in timm's order."""
        return state_tensors(self.module)

    def _init_flat(self, model: Module) -> None:
        averaged = self._averaged()
        self._floating = [i for i, t in enumerate(averaged) if t.is_floating_point()]
        self._integer = [i for i, t in enumerate(averaged) if not t.is_floating_point()]
        self._flat = FlatShadow(pick(self._floating, averaged), owner="integrations.timm")
        save_own_bytes(self.module)  # a saved part of its state holds only its own bytes, as timm's
        self._other_device = self.device is not None and any(
            t.device != torch.device(self.device) for t in self._sources(model)
        )

    def _sources(self, model: Module) -> list[Tensor]:
        return state_tensors(model)

    def _split(self, model: Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """(floating averaged, floating sources, integer averaged, integer sources), checked to pair up."""
        owner = f"swa_fast.integrations.timm.{type(self).__name__}"
        averaged, sources = self._averaged(), self._sources(model)
        check_count(owner, "tensors in the model (as many as its EMA copy)", len(averaged), len(sources))
        if not self._integer:
            floating_avg, floating_src = averaged, sources
        else:
            floating_avg, floating_src = pick(self._floating, averaged), pick(self._floating, sources)
        if not self._flat.holds(floating_avg):
            self._flat = FlatShadow(floating_avg, owner="integrations.timm")
            self.__dict__.pop("_sr_scratch", None)
        integer_avg, integer_src = pick(self._integer, averaged), pick(self._integer, sources)
        # copied (or blended) after the averages are written: their shapes are checked before
        _check_pairs("state_dict tensor", self._integer, integer_src, integer_avg)
        return floating_avg, floating_src, integer_avg, integer_src

    @torch.no_grad()
    def set(self, model: Module) -> None:
        """Copy every state_dict tensor of `model` into the EMA copy, as timm does."""
        ours, theirs = state_tensors(self.module), state_tensors(model)
        owner = f"swa_fast.integrations.timm.{type(self).__name__}.set"
        check_count(owner, "tensors", len(ours), len(theirs))
        torch._foreach_copy_(ours, theirs)  # integer and floating alike, across devices too


class ModelEmaV3(_FlatModule, _timm.ModelEmaV3):
    """timm's `ModelEmaV3`, updated by one fused swa_fast op per flat buffer.

    Args:
        model: the model to average (deep-copied into `module`, put in eval mode).
        decay: the EMA decay (after warmup).
        min_decay: the lowest decay the warmup gives.
        update_after_step: with `update(model, step)`, steps up to `update_after_step + 1` copy the
            model (decay 0).
        use_warmup: decay `1 - (1 + t / warmup_gamma) ** -warmup_power`, clamped to
            [min_decay, decay], at t = step - update_after_step - 1.
        warmup_gamma, warmup_power: the warmup's constants.
        device: keep the EMA copy on this device (the model's tensors are copied there each update).
        dtype: keep the EMA copy in this dtype (an fp32 average of a bf16 model).
        stochastic_rounding: round bfloat16 averages stochastically, as timm does (seeded by
            `stochastic_rounding_seed`, with timm's draws).
        stochastic_rounding_seed: the seed of the private generator of those draws.
        foreach: accepted as timm's; it changes only how timm chunks its stochastic rounding,
            which is kept.
        exclude_buffers: average the parameters only and copy every buffer.
    """

    def __init__(
        self,
        model: Module,
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        stochastic_rounding: bool = True,
        stochastic_rounding_seed: int = 0,
        foreach: bool = True,
        exclude_buffers: bool = False,
    ) -> None:
        # timm's arguments, spelled out for IDEs and type checkers, handed on as they came
        _timm.ModelEmaV3.__init__(
            self, model, decay, min_decay, update_after_step, use_warmup, warmup_gamma, warmup_power,
            device, dtype, stochastic_rounding, stochastic_rounding_seed, foreach, exclude_buffers,
        )  # fmt: skip
        # (timm takes any number, and 12.34 would shift its warmup by a fraction of a step)
        self.update_after_step = count(self.update_after_step, f"{_OWNER}V3: update_after_step", 0)
        self._init_flat(model)

    def _averaged(self) -> list[Tensor]:
        return _each_parameter(self.module) if self.exclude_buffers else state_tensors(self.module)

    def _sources(self, model: Module) -> list[Tensor]:
        return _each_parameter(model) if self.exclude_buffers else state_tensors(model)

    def apply_update_(self, model: Module, decay: float) -> None:
        self._blend(model, decay)

    def apply_update_no_buffers_(self, model: Module, decay: float) -> None:
        self._blend(model, decay)

    def _blend(self, model: Module, decay: float) -> None:
        weight = 1.0 - decay
        floating_avg, floating_src, integer_avg, integer_src = self._split(model)
        if self.exclude_buffers:  # before anything is written: the buffers must pair up too
            ours, theirs = list(self.module.buffers()), list(model.buffers())
            check_count("swa_fast.integrations.timm.ModelEmaV3", "buffers", len(ours), len(theirs))
            _check_pairs("buffer", range(len(ours)), theirs, ours)
        groups = self._flat.buffer.groups
        if self.stochastic_rounding and any(g.dtype == torch.bfloat16 for g in groups):
            self._rounded_update(floating_src, weight)
        else:
            self._flat.lerp_(floating_src, weight, self._other_device)
        if integer_avg:
            torch._foreach_copy_(integer_avg, integer_src)
        if self.exclude_buffers and ours:
            torch._foreach_copy_(ours, theirs)

    def _rounded_update(self, sources: list[Tensor], weight: float) -> None:
        """bfloat16 buffers: timm's stochastic rounding, on the flat buffer; the others: lerp_."""
        buffer = self._flat.buffer
        buffer.check_shapes(sources)  # every group before the first is written (each is a call)
        scratch = self.__dict__.get("_sr_scratch")
        # timm's chunks hold the model's tensors as they are now (a `model.float()` since changes
        # the dtype they are rounded through): the temporaries are made anew when it changed, else
        # kept (timm allocates them on every update)
        dtypes = list(map(_dtype, sources))
        if scratch is None or scratch.source_dtypes != dtypes:
            scratch = self._sr_scratch = _RoundingScratch(buffer, dtypes, self.foreach)
        if scratch.rest:
            self._flat.lerp_(sources, weight, self._other_device, part=scratch.rest)
        for g, (group, _, src) in enumerate(buffer.pairs(sources)):
            if group.dtype == torch.bfloat16:
                scratch.update(g, src, weight, self._sr_generator)


class _RoundingScratch:
    """timm's `_lerp_stochastic_round_bf16_` over a flat bfloat16 buffer: the same chunks (timm's
    rule over the tensors in order; one tensor per chunk without `foreach`), the same fp32
    arithmetic and the same draws from the generator, with the temporaries allocated once."""

    def __init__(self, buffer, source_dtypes: list[torch.dtype], foreach: bool) -> None:
        self.source_dtypes = source_dtypes  # the model's floating tensors' dtypes, as the buffer's
        self.chunks: dict[int, list[tuple[int, int, int, int, torch.dtype]]] = {}
        # the positions of the tensors in other buffers (an fp32 norm of a bf16 model): lerp_ there
        self.rest = [i for g in buffer.groups if g.dtype != torch.bfloat16 for i in g.indices]
        longest = 0
        for g, group in enumerate(buffer.groups):
            if group.dtype != torch.bfloat16:
                continue
            sizes = [buffer.views[i].numel() for i in group.indices]
            dtypes = [source_dtypes[i] for i in group.indices]
            chunks, first, start, numel = [], 0, 0, 0
            for k, size in enumerate(sizes):
                if numel and (not foreach or numel + size > _SR_CHUNK_NUMEL):
                    chunks.append((first, k, start, start + numel, _promoted(dtypes[first:k])))
                    first, start, numel = k, start + numel, 0
                numel += size
            if sizes:
                chunks.append((first, len(sizes), start, start + numel, _promoted(dtypes[first:])))
            self.chunks[g] = chunks
            longest = max([longest] + [end - begin for _, _, begin, end, _ in chunks])
            device = group.device
        self.mixed = torch.empty(longest, dtype=torch.float32, device=device)
        self.noise = torch.empty(longest, dtype=torch.int32, device=device)
        self.models: dict[torch.dtype, Tensor] = {}
        # per chunk: the model's tensors packed as timm's torch.cat, the mixed values packed alike,
        # and the average's views (not packed: the flat buffer pads between views)
        self.chunk_views: dict[tuple[int, int], tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]] = {}
        for g, chunks in self.chunks.items():
            views = buffer.group_views(g)
            for c, (first, last, begin, end, dtype) in enumerate(chunks):
                model = self.models.setdefault(dtype, torch.empty(longest, dtype=dtype, device=device))
                flat = model[: end - begin]
                self.chunk_views[(g, c)] = (
                    flat,
                    _packed_views(flat, views[first:last]),
                    _packed_views(self.mixed[: end - begin], views[first:last]),
                    views[first:last],
                )

    def update(self, g: int, sources: list[Tensor], weight: float, generator) -> None:
        for c, (first, last, begin, end, _) in enumerate(self.chunks[g]):
            n = end - begin
            mixed, noise = self.mixed[:n], self.noise[:n]
            model_flat, model_views, mixed_views, average_views = self.chunk_views[(g, c)]
            copy_lists(model_views, sources[first:last])  # timm: torch.cat of the model's tensors
            copy_lists(mixed_views, average_views)
            mixed.mul_(1.0 - weight).add_(model_flat, alpha=weight)
            bits = mixed.view(torch.int32)
            torch.randint(0, 1 << 16, (n,), dtype=torch.int32, generator=generator, out=noise)
            bits.add_(noise)
            bits.bitwise_and_(-(1 << 16))
            copy_lists(average_views, mixed_views)  # exact: the low 16 bits are zero


def _packed_views(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Consecutive views of `flat` with the shapes of `like`."""
    parts = flat.split([v.numel() for v in like])
    return [p.view(v.shape) for p, v in zip(parts, like)]


def _promoted(dtypes: list[torch.dtype]) -> torch.dtype:
    """The dtype of `torch.cat` of tensors of these dtypes."""
    result = dtypes[0]
    for d in dtypes[1:]:
        result = torch.promote_types(result, d)
    return result


_dtype = operator.attrgetter("dtype")
_shape = operator.attrgetter("shape")


def _check_pairs(what: str, positions, sources: list[Tensor], kept: list[Tensor]) -> None:
    """Raise, naming the first source whose shape is not its kept tensor's (no device work; the
    names are made only then)."""
    if list(map(_shape, sources)) != list(map(_shape, kept)):
        check_same_shapes([f"{what} {i}" for i in positions], sources, kept)


def _each_parameter(module: Module) -> list[Tensor]:
    return list(module.parameters())


class ModelEmaV2(_FlatModule, _timm.ModelEmaV2):
    """timm's `ModelEmaV2`, updated by one fused swa_fast op per flat buffer.

    Args:
        model: the model to average (deep-copied into `module`, put in eval mode).
        decay: the EMA decay, from the first update on (no warmup, no first-update copy: call
            `set(model)` for that, as with timm).
        device: keep the EMA copy on this device.
    """

    def __init__(self, model: Module, decay: float = 0.9999, device: torch.device | str | None = None):
        _timm.ModelEmaV2.__init__(self, model, decay=decay, device=device)
        self._init_flat(model)

    @torch.no_grad()
    def update(self, model: Module) -> None:
        """ema = decay * ema + (1 - decay) * model for every state_dict tensor. Integer buffers
        (BatchNorm's num_batches_tracked) keep timm's arithmetic: blended in fp32 and truncated
        back, so they lag the model's count, as timm's do."""
        floating_avg, floating_src, integer_avg, integer_src = self._split(model)
        self._flat.lerp_(floating_src, 1.0 - self.decay, self._other_device)
        if integer_avg:
            if self._other_device:
                integer_src = [t.to(self.device) for t in integer_src]
            blended = torch._foreach_mul(integer_avg, self.decay)
            torch._foreach_add_(blended, torch._foreach_mul(integer_src, 1.0 - self.decay))
            torch._foreach_copy_(integer_avg, blended)
