"""`unwrap`: the model inside the wrappers that training loops put around it."""

from __future__ import annotations

from torch.nn import DataParallel, Module
from torch.nn.parallel import DistributedDataParallel


def unwrap(model: Module) -> tuple[Module, DistributedDataParallel | None]:
    """The model inside DDP, DataParallel and torch.compile wrappers, nested in any order (its
    names carry no wrapper prefix), and the DDP wrapper met on the way (None if there is none:
    its process group is the one the ranks share). FSDP2's `fully_shard` wraps nothing (it
    changes the module's class in place), so a sharded model is its own inner model."""
    ddp = None
    while True:
        if isinstance(model, DistributedDataParallel):
            ddp = ddp or model
            model = model.module
        elif isinstance(model, DataParallel):
            model = model.module
        elif isinstance(model._modules.get("_orig_mod"), Module):  # torch.compile's wrapper
            model = model._modules["_orig_mod"]
        else:
            return model, ddp
