"""update_bn: BatchNorm statistics for averaged weights.

Averaged weights never produced the activations that a model's BatchNorm running statistics were
collected on, so after SWA the statistics are recomputed with one pass over the training data
(Izmailov et al. 2018, section 3.2), exactly as torch.optim.swa_utils.update_bn does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.nn import Module
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def update_bn(
    loader: Iterable[Any],
    model: Module,
    device: torch.device | str | None = None,
    *,
    forward_fn: Callable[[Module, Any], Any] | None = None,
) -> None:
    """Reset every BatchNorm's running statistics in `model` and recompute them as the plain
    average over one pass of `loader` (momentum None), then restore momenta and train/eval mode.

    A batch is fed as `model(batch)`, or `model(batch[0])` when it is a list or tuple, moved to
    `device` if given: torch's behaviour. `forward_fn(model, batch)` replaces that for batches of
    any other form (dicts, several inputs, ...).
    """
    momenta = {}
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.reset_running_stats()
            momenta[module] = module.momentum
    if not momenta:
        return
    was_training = model.training
    model.train()
    for module in momenta:
        module.momentum = None
    try:
        for batch in loader:
            if forward_fn is not None:
                forward_fn(model, batch)
                continue
            if isinstance(batch, (list, tuple)):
                batch = batch[0]
            if device is not None:
                batch = batch.to(device)
            model(batch)
    finally:
        for module, momentum in momenta.items():
            module.momentum = momentum
        model.train(was_training)
