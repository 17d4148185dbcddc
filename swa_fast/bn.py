"""update_bn: BatchNorm statistics for averaged weights.

Averaged weights never produced the activations that a model's BatchNorm running statistics were
collected on, so after SWA the statistics are recomputed with one pass over the training data
(Izmailov et al. 2018, section 3.2), exactly as torch.optim.swa_utils.update_bn does.

Under torch.distributed each rank sees its own part of the data; the ranks' statistics are then
combined into those of one pass over all of it, so every rank ends with the same ones.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.nn import Module
from torch.nn.modules.batchnorm import _BatchNorm

from . import distributed
from .model_tensors import module_tensors
from .wrappers import unwrap


@torch.no_grad()
def update_bn(
    loader: Iterable[Any],
    model: Module,
    device: torch.device | str | None = None,
    *,
    forward_fn: Callable[[Module, Any], Any] | None = None,
    sync: bool | None = None,
    group: Any = None,
    require_batches: bool = False,
) -> None:
    """Reset every BatchNorm's running statistics in `model` and recompute them as the plain
    average over one pass of `loader` (momentum None), then restore momenta and train/eval mode.

    A batch is fed as `model(batch)`, or `model(batch[0])` when it is a list or tuple, moved to
    `device` if given: torch's behaviour. `forward_fn(model, batch)` replaces that for batches of
    any other form (dicts, several inputs, ...).

    Several processes (torch.distributed): with `sync`, the ranks' statistics are combined, each
    weighted by its number of batches, into what one process that saw every rank's batches computes,
    and every rank gets them. `sync=None` (the default) syncs when the model is DDP-wrapped or
    FSDP2-sharded (its forward already needs every rank, so every rank is calling this), and leaves
    a plain model alone (rank 0 alone may be calling); `sync=True` syncs any model over `group`
    (default: all ranks), `sync=False` never. Wrappers (DDP, DataParallel, torch.compile) are looked
    through for the pass: a DDP forward would overwrite every rank's buffers with rank 0's before
    each batch.

    An empty `loader` resets the statistics and feeds nothing, as torch's does; with
    `require_batches` it raises a ValueError instead, before anything is reset: SWAG's per-sample
    passes set it, where an empty pass (a one-shot iterable's second one) would leave a sample
    with default statistics.
    """
    model, ddp = unwrap(model)
    groups = _sync_groups(model, ddp, sync, group)
    norms = [module for module in model.modules() if isinstance(module, _BatchNorm)]
    if not norms:
        return
    batches = _nonempty(loader) if require_batches else loader
    with _plain_averages(model, norms):
        for batch in batches:
            _feed(model, batch, device, forward_fn)
    if groups is not None:
        _combine_across_ranks([m for m in norms if m.track_running_stats], groups)


def _sync_groups(model: Module, ddp: Module | None, sync: bool | None, group: Any) -> list | None:
    """The process groups whose ranks' statistics are combined (update_bn's `sync`), or None when
    they are not. Raises before anything is reset when they should be and cannot."""
    groups = None if ddp is None else [ddp.process_group]
    if sync is None:
        if groups is None:  # an FSDP2 model: its mesh's groups (none for a plain model)
            groups = distributed.groups_of(
                model, [distributed.shards_of(t) for t in module_tensors(model, False)]
            )
        sync = bool(groups)
    if not sync:
        return None
    if distributed.dist is None or not distributed.dist.is_initialized():
        raise ValueError("swa_fast.update_bn: sync=True needs torch.distributed, which is not initialised")
    return [group] if group is not None else (groups or [None])


@contextlib.contextmanager
def _plain_averages(model: Module, norms: list[_BatchNorm]) -> Iterator[None]:
    """Inside, `norms` start from reset statistics and average the batches fed with equal weights
    (momentum None, train mode); their momenta and the model's mode are restored after, even on an
    error."""
    for module in norms:
        module.reset_running_stats()
    momenta = [module.momentum for module in norms]
    was_training = model.training
    model.train()
    for module in norms:
        module.momentum = None
    try:
        yield
    finally:
        for module, momentum in zip(norms, momenta):
            module.momentum = momentum
        model.train(was_training)


def _feed(
    model: Module,
    batch: Any,
    device: torch.device | str | None,
    forward_fn: Callable[[Module, Any], Any] | None,
) -> None:
    """One batch through `model`, as update_bn's docstring says."""
    if forward_fn is not None:
        forward_fn(model, batch)
        return
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if device is not None:
        batch = batch.to(device)
    model(batch)


def _nonempty(loader: Iterable[Any]) -> Iterator[Any]:
    """`loader`'s batches; raises a ValueError now, before any is used, when there are none."""
    batches = iter(loader)
    first = next(batches, _NO_BATCH)
    if first is _NO_BATCH:
        raise ValueError(
            "swa_fast.update_bn: the loader gave no batches; expected at least one (a generator or "
            "other iterator can be run only once: pass a list or a DataLoader)"
        )
    return itertools.chain([first], batches)


_NO_BATCH = object()


def _combine_across_ranks(norms: list[_BatchNorm], groups: list) -> None:
    """Replace each rank's statistics by the batch-count-weighted mean over all ranks: with momentum
    None a BatchNorm's running mean and variance are plain averages over its batches, so the sums
    sum_r n_r * stat_r over ranks, divided by sum_r n_r, are the averages over every batch. All
    norms travel in one float64 all-reduce per group (several groups: the dimensions of a mesh,
    whose successive sums cover all of it)."""
    if not norms:
        return
    counts = torch.stack([m.num_batches_tracked for m in norms]).double()
    packed = torch.cat(
        [
            *(
                torch.cat([m.running_mean.double(), m.running_var.double()]) * n
                for m, n in zip(norms, counts)
            ),
            counts,
        ]
    )
    for g in groups:
        distributed.dist.all_reduce(packed, group=g)
    totals = packed[-len(norms) :]
    sizes = [2 * m.running_mean.numel() for m in norms]
    for m, part, total in zip(norms, packed[: -len(norms)].split(sizes), totals):
        mean, var = (part / total.clamp(min=1)).chunk(2)
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(total)
