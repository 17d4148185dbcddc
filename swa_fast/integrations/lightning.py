"""Drop-ins for Lightning's weight-averaging callbacks: change the import, keep the code.

    from swa_fast.integrations.lightning import StochasticWeightAveraging, WeightAveraging, EMAWeightAveraging
    # was: from lightning.pytorch.callbacks import ...

Each class subclasses Lightning's own, so everything Lightning and its users rely on stays: the
arguments, `should_update`, the attributes (`_average_model`, `n_averaged`, `_swa_scheduler`,
...), the static helpers (`update_parameters`, `transfer_weights`, `avg_fn`), the SWALR scheduler
the SWA callback installs, the BatchNorm epoch, the checkpoint keys (`state_dict`,
`current_model_state`, `averaging_state`, and the callback state under the same class name).
Checkpoints written with ours resume Lightning's callbacks and back.

What changes is the update:
- `WeightAveraging` / `EMAWeightAveraging` build `swa_fast.swa_utils.AveragedModel`: one fused op
  per flat buffer. `EMAWeightAveraging` passes swa_fast's `get_ema_avg_fn(decay)` (Lightning
  passes torch's, which runs per tensor), which that AveragedModel runs fused. Swapping the
  average in for validation copies the model aside and back instead of swapping tensor by tensor,
  so an average kept in another dtype (`dtype=torch.float32` for a bf16 model) loses nothing.
- `StochasticWeightAveraging` averages the parameters of its LightningModule copy with one fused
  op per device (Lightning's loops over the parameters and reads the count on the host for each);
  a user's own `avg_fn` still runs as Lightning runs it.

Under Lightning's sharded strategies (ModelParallelStrategy with FSDP2 in `configure_model`,
DeepSpeedStrategy, FSDPStrategy), where Lightning's own callbacks refuse or copy the whole model,
each callback keeps a swa_fast manager of the sharded model instead (`ShardLocalAverage`, made in
`on_fit_start`): every rank averages its own shards, with no communication per update; validation
runs on the average (`average_applied`, the live weights restored exactly); the average goes into
the model at the end; and checkpoints keep every rank's part (`where_saved`). The rule must be
swa_fast's (the equal-weight average, or `get_ema_avg_fn(decay)` / EMAWeightAveraging): a user's own
`avg_fn` is refused there.
"""

from __future__ import annotations

import weakref
from itertools import chain
from typing import Any

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging as _LightningEMAWeightAveraging
from lightning.pytorch.callbacks import StochasticWeightAveraging as _LightningStochasticWeightAveraging
from lightning.pytorch.callbacks import WeightAveraging as _LightningWeightAveraging
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn import Module

from .. import distributed
from ..averaging import EMA, SWA, Averager
from ..engine import UpdatePlan
from ..flat import FlatBuffer, copy_into_strided
from ..model_tensors import ModulesWatch
from ..swa_utils import AveragedModel, get_ema_avg_fn
from ..weighting import count, ema_weight, swa_weight

__all__ = ["EMAWeightAveraging", "StochasticWeightAveraging", "WeightAveraging"]


@torch.no_grad()
def _copy_tensors(targets: list[Tensor], sources: list[Tensor]) -> None:
    """targets[i] = sources[i] (cast; through the targets' strides): the floating tensors of one
    device in one fused copy, the others (integer buffers, another device) as torch copies."""
    fused = [(t, s) for t, s in zip(targets, sources) if t.is_floating_point() and s.device == t.device]
    rest = [(t, s) for t, s in zip(targets, sources) if not (t.is_floating_point() and s.device == t.device)]
    if fused:
        copy_into_strided(*map(list, zip(*fused)))
    for target, source in rest:
        target.copy_(source)


# --- sharded strategies -------------------------------------------------------------------------
#
# Under ModelParallelStrategy (FSDP2), DeepSpeedStrategy (ZeRO) and FSDPStrategy, Lightning's
# `setup` runs before the strategy shards the model, so a deepcopy there (an AveragedModel) would be
# the whole unsharded model on every rank. Instead the callback keeps a swa_fast manager (SWA or
# EMA), made in `on_fit_start` once the model is sharded: each rank averages its own shards, with
# no communication per update.

SHARDED_STRATEGIES = (ModelParallelStrategy, DeepSpeedStrategy, FSDPStrategy)
# Where the sharded callbacks' states go in a checkpoint: {callback.state_key: state}.
CHECKPOINT_KEY = "swa_fast_averaging_state"
_OWNER = "swa_fast.integrations.lightning"


def is_sharded(trainer) -> bool:
    return trainer is not None and isinstance(trainer.strategy, SHARDED_STRATEGIES)


def averaging_rule(kwargs: dict, owner: str, strategy) -> tuple[str, float | None]:
    """("swa", None) or ("ema", decay): the callback's AveragedModel arguments as a manager's rule.
    A user's own avg_fn cannot run on shards through a manager: refused, saying what to pass."""
    known = {"avg_fn", "multi_avg_fn", "dtype"} | (
        {"source"} if isinstance(strategy, DeepSpeedStrategy) else set()
    )
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"{_OWNER}.{owner}: under {type(strategy).__name__} the average is kept shard-local by a "
            f"swa_fast manager, which takes none of {unknown} (only {sorted(known)})"
        )
    given = kwargs.get("avg_fn") or kwargs.get("multi_avg_fn")
    if given is None:
        return ("swa", None)
    kind = getattr(given, "swa_fast_kind", None)
    if kind is None:
        raise ValueError(
            f"{_OWNER}.{owner}: under {type(strategy).__name__} each rank averages its own shards with "
            f"swa_fast's fused rules, which cannot run a function of one's own (got {given!r}). Pass "
            "swa_fast.swa_utils.get_swa_avg_fn() or get_ema_avg_fn(decay), or use EMAWeightAveraging"
        )
    return kind


def sharded_manager(strategy, pl_module: Module, rule: tuple[str, float | None], **options) -> Averager:
    """The manager of the rule over the model as the strategy sharded it: swa_fast's over the
    LightningModule (FSDP2 DTensors, FSDP's local views), or over DeepSpeed's engine (each rank's
    ZeRO partitions; `source`, "master" by default, as swa_fast.integrations.deepspeed's)."""
    if isinstance(strategy, DeepSpeedStrategy):
        from . import deepspeed

        swa, ema, model = deepspeed.SWA, deepspeed.EMA, strategy.model
    else:
        swa, ema, model = SWA, EMA, pl_module
        options.pop("source", None)
    return swa(model, **options) if rule[0] == "swa" else ema(model, decay=rule[1], **options)


def where_saved(strategy, manager: Averager) -> str:
    """How a sharded average goes into the strategy's checkpoint, so that each rank's part survives:
    "dcp": beside the model's weights, which torch.distributed.checkpoint saves sharded (the rest of
    the checkpoint is written by rank 0 alone); "full": gathered on rank 0 (a full checkpoint, read
    by every rank); "local": as it is, since every rank writes and reads its own file (DeepSpeed
    ZeRO-3's client state), or since the average is the same on every rank (ZeRO-1/2 with
    source="params": rank 0's file is read by all); "per_rank": every rank's part gathered on rank 0,
    whose file every rank reads (ZeRO-1/2's partitioned master weights; FSDPStrategy, which writes
    the callbacks' states from rank 0 only in either state_dict_type)."""
    if isinstance(strategy, ModelParallelStrategy):
        return "dcp" if strategy._save_distributed_checkpoint else "full"
    if isinstance(strategy, DeepSpeedStrategy):
        same_everywhere = getattr(manager, "source", "params") == "params"
        return "local" if strategy.zero_stage_3 or same_everywhere else "per_rank"
    return "per_rank"


def _to_cpu(state: dict) -> dict:
    return {
        k: _to_cpu(v) if isinstance(v, dict) else v.cpu() if isinstance(v, Tensor) else v
        for k, v in state.items()
    }


def gathered_on_rank0(state: dict) -> list | None:
    """Every rank's `state` (moved to the CPU), in a list by rank on rank 0; None elsewhere. A
    collective: at a checkpoint only, never on an update."""
    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    out = [None] * world if rank == 0 else None
    torch.distributed.gather_object(_to_cpu(state), out, dst=0)
    return out


class ShardLocalAverage:
    """What a weight-averaging callback keeps in place of the AveragedModel under a sharded strategy:
    a swa_fast manager of the sharded LightningModule, with the AveragedModel's `update_parameters`
    and `n_averaged`, so Lightning's hooks that update it run unchanged."""

    def __init__(self, manager: Averager, model: Module, prefix: str) -> None:
        self.manager = manager
        self.model = model  # what the manager reads and writes: the LightningModule, or DeepSpeed's engine
        self.prefix = prefix  # of the average's entries in the model's state_dict ("dcp")
        self.applied = None  # the average_applied block open over validation

    def update_parameters(self, _pl_module: Module) -> None:
        self.manager.update(self.model)

    @property
    def n_averaged(self) -> Tensor:
        return self.manager.n_averaged

    def to(self, *_args, **_kwargs) -> ShardLocalAverage:
        """(Lightning's SWA moves its copy to the device when SWA starts: the manager's average
        already lives where it was asked to.)"""
        return self

    def state_dict(self) -> None:
        """(Lightning's SWA puts its copy's state_dict in the callback state: the average is saved
        by `save` instead, where the strategy keeps every rank's part.)"""
        return None

    def swap(self) -> None:
        """First call: the average into the model (the live weights kept aside); second: the live
        weights back, exactly. (Under DeepSpeed a collective, as Lightning's hooks are on every rank.)"""
        if self.applied is None:
            self.applied = self.manager.average_applied(self.model)
            self.applied.__enter__()
        else:
            applied, self.applied = self.applied, None
            applied.__exit__(None, None, None)

    def save(self, strategy, checkpoint: dict) -> dict:
        """The manager's state as it goes into `checkpoint` (the average's entries, under "dcp",
        added to the model's state_dict there)."""
        how = where_saved(strategy, self.manager)
        state = self.manager.state_dict()
        if how == "dcp":
            average = state.pop("average")
            checkpoint["state_dict"].update({self.prefix + name: t for name, t in average.items()})
        elif how == "full":
            state = distributed.full_state_dict(state)
        elif how == "per_rank":
            state = {"ranks": gathered_on_rank0(state)}
        return {"saved": how, **state}

    def load(self, saved: dict, checkpoint_path) -> None:
        """Restore the manager from `saved` (what `save` gave), reading the "dcp" average from the
        sharded checkpoint at `checkpoint_path` into its own buffers."""
        how, state = saved["saved"], {k: v for k, v in saved.items() if k != "saved"}
        if how == "dcp":
            state["average"] = self._read_dcp_average(checkpoint_path)
        elif how == "per_rank":
            state = state["ranks"][torch.distributed.get_rank()]
        self.manager.load_state_dict(state)

    def _read_dcp_average(self, checkpoint_path) -> dict:
        import torch.distributed.checkpoint as dcp

        average = {n: torch.empty_like(t) for n, t in self.manager.state_dict()["average"].items()}
        dcp.load(
            {"state_dict": {self.prefix + n: t for n, t in average.items()}}, checkpoint_id=checkpoint_path
        )
        return average


def save_sharded(callback, trainer, checkpoint: dict) -> None:
    """A sharded callback's average into `checkpoint`. The model's weights stay the live ones (the
    strategy loads them back as they were); the average goes where every rank's part survives this
    strategy's checkpoint (`where_saved`), its counts under CHECKPOINT_KEY."""
    saved = callback._average_model.save(trainer.strategy, checkpoint)
    checkpoint.setdefault(CHECKPOINT_KEY, {})[callback.state_key] = saved


def load_sharded(callback, trainer, checkpoint: dict) -> None:
    """The average `save_sharded` put into `checkpoint` back into the callback's manager."""
    saved = checkpoint.get(CHECKPOINT_KEY, {}).get(callback.state_key)
    if saved is None:
        rank_zero_warn(
            f"{_OWNER}.{type(callback).__name__}: the checkpoint holds no swa_fast average of this "
            "callback (not saved by it under a sharded strategy); the average starts afresh"
        )
        return
    callback._average_model.load(saved, trainer.ckpt_path)
    rank_zero_info(f"{_OWNER}.{type(callback).__name__}: the shard-local average was restored")


class WeightAveraging(_LightningWeightAveraging):
    """Lightning's `WeightAveraging` callback on `swa_fast.swa_utils.AveragedModel`.

    Args:
        device: where the average lives (default: the model's device).
        use_buffers: average the buffers too (Lightning's default True).
        kwargs: passed to `swa_fast.swa_utils.AveragedModel`: `avg_fn` / `multi_avg_fn` (swa_fast's
            factories run fused, a user's own per tensor as in torch), `dtype` (an fp32 average of
            a bf16 model). Neither function: the equal-weight (SWA) average, fused.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if is_sharded(trainer):  # the manager comes in on_fit_start, once the model is sharded
            averaging_rule(self._kwargs, type(self).__name__, trainer.strategy)  # refused now, if so
            self._average_model = None
            return
        device = self._device or pl_module.device
        if is_overridden("configure_model", pl_module):
            rank_zero_warn(
                "You're using the WeightAveraging callback with a model that overrides the configure_model "
                "callback. WeightAveraging doesn't support sharding model layers, so you may run out of "
                "memory."
            )
            pl_module.configure_model()
        self._average_model = AveragedModel(
            model=pl_module, device=device, use_buffers=self._use_buffers, **self._kwargs
        )
        self._stashed: FlatBuffer | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        """Under a sharded strategy: the manager of the model as sharded now (each rank its shards)."""
        if is_sharded(trainer) and self._average_model is None:
            manager = sharded_manager(
                trainer.strategy,
                pl_module,
                averaging_rule(self._kwargs, type(self).__name__, trainer.strategy),
                use_buffers=self._use_buffers,
                dtype=self._kwargs.get("dtype"),  # None: the model's own, as Lightning's AveragedModel
                device=self._device,
                **({"source": self._kwargs["source"]} if "source" in self._kwargs else {}),
            )
            model = trainer.strategy.model if isinstance(trainer.strategy, DeepSpeedStrategy) else pl_module
            self._average_model = ShardLocalAverage(manager, model, f"{CHECKPOINT_KEY}.{self.state_key}.")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if isinstance(self._average_model, ShardLocalAverage):
            save_sharded(self, trainer, checkpoint)
        else:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if isinstance(self._average_model, ShardLocalAverage):
            load_sharded(self, trainer, checkpoint)
        else:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def _swap_models(self, pl_module) -> None:
        """Called at the start and at the end of validation: the first call copies the model aside
        and the average into it, the second copies the model back. The average itself is not
        written (Lightning swaps it with the model twice), so an average of another dtype than
        the model keeps all its bits."""
        if isinstance(self._average_model, ShardLocalAverage):
            self._average_model.swap()
            return
        current = list(chain(pl_module.parameters(), pl_module.buffers()))
        if getattr(self, "_stashed", None) is None:
            average = chain(self._average_model.module.parameters(), self._average_model.module.buffers())
            self._stashed = FlatBuffer(current)
            _copy_tensors(current, list(average))
        else:
            _copy_tensors(current, self._stashed.views)
            self._stashed = None

    def _copy_average_to_current(self, pl_module) -> None:
        if isinstance(self._average_model, ShardLocalAverage):
            self._average_model.manager.copy_to(self._average_model.model)  # into each rank's shards
            return
        average = chain(self._average_model.module.parameters(), self._average_model.module.buffers())
        _copy_tensors(list(chain(pl_module.parameters(), pl_module.buffers())), list(average))


class EMAWeightAveraging(WeightAveraging, _LightningEMAWeightAveraging):
    """Lightning's `EMAWeightAveraging` callback on `swa_fast.swa_utils.AveragedModel`, fused.

    Args:
        device: where the average lives (default: the model's device).
        use_buffers: average the buffers too.
        decay: the EMA decay.
        update_every_n_steps: update on optimizer steps divisible by this.
        update_starting_at_step: the first step that updates (default: the first).
        update_starting_at_epoch: update at the end of this epoch and later ones too.
        kwargs: passed to `swa_fast.swa_utils.AveragedModel` (say `dtype=torch.float32`).
    """

    def __init__(
        self,
        device: torch.device | str | int | None = None,
        use_buffers: bool = True,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        **kwargs: Any,
    ) -> None:
        owner = "integrations.lightning.EMAWeightAveraging"
        update_every_n_steps = count(update_every_n_steps, f"{owner}: update_every_n_steps", 1)
        update_starting_at_step = count(
            update_starting_at_step, f"{owner}: update_starting_at_step", 0, allow_none=True
        )
        update_starting_at_epoch = count(
            update_starting_at_epoch, f"{owner}: update_starting_at_epoch", 0, allow_none=True
        )
        _LightningEMAWeightAveraging.__init__(
            self, device, use_buffers, decay, update_every_n_steps, update_starting_at_step,
            update_starting_at_epoch, **kwargs,
        )  # fmt: skip
        # The same keyword as Lightning's (torch's function there), swa_fast's function here: the
        # AveragedModel updates the whole model with one fused op per group for it.
        self._kwargs["avg_fn"] = get_ema_avg_fn(decay)


# The plan of the fused SWA update per averaged LightningModule: `update_parameters` is a static
# method, so what it works out is kept beside the module it updates, for as long as that lives.
_SWA_PLANS: weakref.WeakKeyDictionary[Module, tuple[Module, ModulesWatch, UpdatePlan]] = (
    weakref.WeakKeyDictionary()
)
_LIGHTNING_AVG_FN = _LightningStochasticWeightAveraging.avg_fn


def _fused_kind(avg_fn) -> tuple[str, float | None] | None:
    """("swa", None) or ("ema", decay) for an average swa_fast runs fused, else None."""
    if avg_fn is _LIGHTNING_AVG_FN:
        return ("swa", None)
    return getattr(avg_fn, "swa_fast_kind", None)


class StochasticWeightAveraging(_LightningStochasticWeightAveraging):
    """Lightning's `StochasticWeightAveraging` callback, its average updated by fused swa_fast ops.

    Args:
        swa_lrs: the SWA learning rate, one for all parameter groups or a list of one per group.
        swa_epoch_start: the first SWA epoch (an int from 1), or a fraction of max_epochs.
        annealing_epochs: epochs of the SWALR annealing.
        annealing_strategy: "cos" or "linear".
        avg_fn: Lightning's (the default) and swa_fast.swa_utils' `get_swa_avg_fn()` /
            `get_ema_avg_fn(decay)` run fused; a user's own runs per parameter, as in Lightning.
        device: where the averaged copy lives (Lightning's default: the CPU); None: the model's.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # (Lightning passes it on to SWALR, which refuses a non-int only when training starts)
        self._annealing_epochs = count(
            self._annealing_epochs, "integrations.lightning.StochasticWeightAveraging: annealing_epochs", 0
        )

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not is_sharded(trainer):
            super().setup(trainer, pl_module, stage)  # (a deepcopy of the module)
            return
        # Lightning's refuses FSDP and DeepSpeed here; ours keeps a shard-local manager, made in
        # on_fit_start once the model is sharded.
        self._average_model = None
        self._sharded_rule(trainer)  # a function of one's own is refused now

    def _sharded_rule(self, trainer) -> tuple[str, float | None]:
        kind = _fused_kind(self._avg_fn)
        if kind is None:
            raise ValueError(
                f"{_OWNER}.StochasticWeightAveraging: under {type(trainer.strategy).__name__} each rank "
                f"averages its own shards with swa_fast's fused rules, which cannot run a function of one's "
                f"own (avg_fn={self._avg_fn!r}). Leave avg_fn out (SWA), or pass "
                "swa_fast.swa_utils.get_swa_avg_fn() or get_ema_avg_fn(decay)"
            )
        return kind

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)
        if is_sharded(trainer) and self._average_model is None:
            # Lightning's averages the parameters only, in the model's dtype
            manager = sharded_manager(
                trainer.strategy, pl_module, self._sharded_rule(trainer), use_buffers=False, dtype=None,
                device=self._device,
            )  # fmt: skip
            model = trainer.strategy.model if isinstance(trainer.strategy, DeepSpeedStrategy) else pl_module
            self._average_model = ShardLocalAverage(manager, model, f"{CHECKPOINT_KEY}.{self.state_key}.")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if isinstance(self._average_model, ShardLocalAverage):
            save_sharded(self, trainer, checkpoint)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if not isinstance(self._average_model, ShardLocalAverage):
            return
        load_sharded(self, trainer, checkpoint)
        # The strategies that restore after setup run on_fit_start, which clears the schedulers of a
        # resumed SWA, before the callback state is loaded: cleared here, so that the checkpoint's
        # SWALR state is not loaded into the user's scheduler (SWA reloads it itself).
        callback_state = checkpoint.get("callbacks", {}).get(self.state_key, {})
        if callback_state.get("scheduler_state") is not None:
            self._clear_schedulers(trainer)

    def _load_average_model_state(self, model_state: Any) -> None:
        if not isinstance(self._average_model, ShardLocalAverage):  # (loaded by on_load_checkpoint)
            super()._load_average_model_state(model_state)

    @staticmethod
    def transfer_weights(src_pl_module, dst_pl_module) -> None:
        if isinstance(src_pl_module, ShardLocalAverage):
            src_pl_module.manager.copy_to(src_pl_module.model)  # into each rank's shards
        else:
            _LightningStochasticWeightAveraging.transfer_weights(src_pl_module, dst_pl_module)

    @staticmethod
    def update_parameters(average_model, model, n_averaged: Tensor, avg_fn) -> None:
        """Lightning's SWA update of `average_model`'s parameters from `model`'s, as one fused op
        per device: weight 1 / (n + 1), worked out where `n_averaged` lives (the first update, at
        n = 0, copies the parameters exactly, as Lightning's does). Under a sharded strategy the
        shard-local manager's update (its own count says the weight, n_averaged follows it)."""
        if isinstance(average_model, ShardLocalAverage):
            average_model.update_parameters(model)
            n_averaged += 1
            return
        kind = _fused_kind(avg_fn)
        if kind is None:
            _LightningStochasticWeightAveraging.update_parameters(average_model, model, n_averaged, avg_fn)
            return
        kept = _SWA_PLANS.get(average_model)
        if kept is None or kept[0] is not model or kept[1].changed():
            averaged, current = list(average_model.parameters()), list(model.parameters())
            plan = UpdatePlan(
                "lerp_", [averaged], current, owner="StochasticWeightAveraging", move_sources=True
            )
            kept = _SWA_PLANS[average_model] = (model, ModulesWatch(average_model, model), plan)
        plan = kept[2]
        weight = swa_weight(n_averaged) if kind[0] == "swa" else ema_weight(kind[1], n_averaged)
        with torch.no_grad():
            plan.run(plan.sources, weight)
        n_averaged += 1
