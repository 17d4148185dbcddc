"""`unwrap`: the model inside the wrappers that training loops put around it; `hooked`: the
optimizer inside an optimizer wrapper whose own step runs no step hooks."""

from __future__ import annotations

from torch.nn import DataParallel, Module
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer


def unwrap(model: Module) -> tuple[Module, DistributedDataParallel | None]:
    """The model inside DDP, DataParallel, DeepSpeed's engine and torch.compile wrappers, nested in
    any order (its names carry no wrapper prefix), and the DDP wrapper met on the way (None if there
    is none: its process group is the one the ranks share). FSDP2's `fully_shard` wraps nothing (it
    changes the module's class in place), so a sharded model is its own inner model."""
    ddp = None
    while True:
        if isinstance(model, DistributedDataParallel):
            ddp = ddp or model
            model = model.module
        elif isinstance(model, DataParallel) or _is_deepspeed_engine(model):
            model = model.module
        elif isinstance(model._modules.get("_orig_mod"), Module):  # torch.compile's wrapper
            model = model._modules["_orig_mod"]
        else:
            return model, ddp


def hooked(optimizer: Optimizer, owner: str) -> Optimizer:
    """The optimizer whose step post-hooks run after each step of `optimizer`: itself, or for an
    optimizer that wraps another without torch's Optimizer machinery (`swa_fast.optim.SWA` and
    torchcontrib's `SWA` do not call `Optimizer.__init__`, so their own `step` runs no hook), the
    one it wraps, whose `step` its own calls once. Raise, naming `owner`, for anything else."""
    if not isinstance(optimizer, Optimizer):
        raise ValueError(
            f"swa_fast.{owner}: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if hasattr(optimizer, "_optimizer_step_post_hooks"):  # (made by Optimizer.__init__)
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, Optimizer):
        return hooked(inner, owner)
    raise ValueError(
        f"swa_fast.{owner}: {type(optimizer).__name__} runs no step hooks (it did not call "
        "torch.optim.Optimizer.__init__) and wraps no optimizer (`.optimizer`) that does"
    )


def _is_deepspeed_engine(model: Module) -> bool:
    """A DeepSpeed engine (recognised by its class name: importing DeepSpeed costs seconds)."""
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)
