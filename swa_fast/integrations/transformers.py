"""`TrainerCallback`s for `transformers.Trainer` (and TRL's trainers, which subclass it): an EMA, SWA
or post-hoc EMA of the model, kept by a swa_fast manager.

    from swa_fast.integrations.transformers import EMACallback

    trainer = Trainer(model, args, train_dataset=..., callbacks=[EMACallback(decay=0.999)])
    trainer.train()                     # the EMA updated after every optimizer step, saved with
                                        # every checkpoint, resumed by resume_from_checkpoint

Each callback makes its manager at `on_train_begin` from the model the Trainer trains (the inner
model under DDP, DeepSpeed and FSDP2), updates it at `on_step_end` (once per optimizer step, so
after every `gradient_accumulation_steps` batches) on the steps its `every` and `start_step`
select, and writes its `state_dict()` into each checkpoint folder at `on_save`
(`swa_fast_<name>.pt`; one file per rank under FSDP2 and DeepSpeed ZeRO-3, whose ranks each average
their own shards or partitions). A resumed `train()` loads the file of the
checkpoint it resumes from, so the average continues bit for bit.

`eval_with_average=True` evaluates with the average: the Trainer decides in `on_step_end` (and
`on_epoch_end`) whether it evaluates next, so the callback applies the average there and restores
the live weights, exactly, at `on_evaluate`, which the Trainer calls once the evaluation is done,
before it saves a checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.nn import Module
from transformers import TrainerCallback

from .. import zero
from ..averaging import EMA, SWA, Averager
from ..posthoc import PostHocEMA
from ..weighting import count
from ._trainer_checkpoints import (
    checkpoint_folder,
    load_state,
    resumed_file,
    save_state,
    saved_checkpoint_folder,
)

__all__ = ["AveragingCallback", "EMACallback", "PostHocEMACallback", "SWACallback"]


def _refuse_fsdp1(model: Module, owner: str) -> None:
    """Refuse FSDP1's flat parameters (FSDP2's DTensors and DeepSpeed's partitions are averaged)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            f"swa_fast.integrations.transformers.{owner}: the model is wrapped by FSDP1 "
            "(FullyShardedDataParallel), whose flat parameters swa_fast does not average; expected FSDP2: "
            "pass fsdp_config={'fsdp_version': 2}"
        )


def _whole_parameters(model: Module, partitioned: bool) -> contextlib.AbstractContextManager:
    """Within it, a ZeRO-3 model's parameters whole on every rank (DeepSpeed's own gather, read
    only); nothing for any other model."""
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


class AveragingCallback(TrainerCallback):
    """A swa_fast manager kept up to date by a `transformers.Trainer`: the base of `EMACallback`,
    `SWACallback` and `PostHocEMACallback`, which say which manager.

    Args:
        every: update every this many optimizer steps (on steps `start_step + k * every`, counted
            as the Trainer's `global_step`, so a resumed run updates on the same steps).
        start_step: the first optimizer step that updates (0: from the first step on).
        eval_with_average: the Trainer's evaluations during training (`eval_strategy`) run with the
            average in the model; the live weights are restored bit for bit when each ends.
        save_averaged_model: at the end of training, write the model with the average applied by
            `save_pretrained` (with the Trainer's tokenizer or processor) into this directory (True:
            `<output_dir>/<name>`), on the main process.
        load_average_at_end: at the end of training, leave the average in the model (so that
            `trainer.evaluate()`, `save_model()` and `push_to_hub()` after `train()` use it).
        resume: load the average from the checkpoint a `train(resume_from_checkpoint=...)` resumes
            (False: a resumed run starts a new average).
        name: the name of the checkpoint files (`swa_fast_<name>.pt`) and of the default
            `save_averaged_model` directory; two callbacks of one Trainer need different names.
        manager_kwargs: passed to the manager (`dtype`, `use_buffers`, `device`, ...).
    """

    _NAME = "average"

    def __init__(
        self,
        *,
        every: int = 1,
        start_step: int = 0,
        eval_with_average: bool = False,
        save_averaged_model: bool | str | os.PathLike = False,
        load_average_at_end: bool = False,
        resume: bool = True,
        name: str | None = None,
        **manager_kwargs: Any,
    ) -> None:
        self.every = count(every, f"{self._owner}: every", 1)
        self.start_step = count(start_step, f"{self._owner}: start_step", 0)
        self.eval_with_average = eval_with_average
        self.save_averaged_model = save_averaged_model
        self.load_average_at_end = load_average_at_end
        self.resume = resume
        self.name = name or self._NAME
        self.manager_kwargs = manager_kwargs
        if manager_kwargs.get("rank0_only") and (eval_with_average or load_average_at_end):
            raise ValueError(
                f"{self._who}: eval_with_average and load_average_at_end apply the average on every rank, "
                "but rank0_only=True keeps it on rank 0 only; drop one"
            )
        self.manager: Averager | None = None  # made at on_train_begin
        self._model: Module | None = None
        self._applied: contextlib.ExitStack | None = None  # the average in the model, for an evaluation

    @property
    def _owner(self) -> str:
        """Who speaks in `weighting.count`'s messages (which add "swa_fast.")."""
        return f"integrations.transformers.{type(self).__name__}"

    @property
    def _who(self) -> str:
        """Who speaks in an error message."""
        return f"swa_fast.{self._owner}"

    # --- what a subclass gives ---------------------------------------------------------------------

    def make_manager(self, model: Module, args) -> Averager:
        """The manager of `model` (the Trainer's, at `on_train_begin`)."""
        raise NotImplementedError

    def _update(self, model: Module, state) -> None:
        self.manager.update(model)

    def _applied_context(self, model: Module):
        return self.manager.average_applied(model)

    # --- reading the average -----------------------------------------------------------------------

    @contextlib.contextmanager
    def average_applied(self, model: Module | None = None) -> Iterator[Module]:
        """The average in the model within the block, the live weights restored exactly after:
        `with callback.average_applied(): trainer.evaluate()` (the model defaults to the Trainer's)."""
        self._check_trained("average_applied")
        with self._applied_context(model if model is not None else self._model) as applied:
            yield applied

    def _check_trained(self, what: str) -> None:
        if self.manager is None:
            raise ValueError(
                f"{self._who}.{what}: expected a callback whose Trainer has started training (the manager "
                "is made at on_train_begin), got one that has not"
            )

    # --- the Trainer's events ----------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError(
                f"{self._who}: expected the Trainer to pass its model to on_train_begin, got None"
            )
        if self.load_average_at_end and args.load_best_model_at_end:
            raise ValueError(
                f"{self._who}: load_average_at_end=True would overwrite the best checkpoint's weights that "
                "load_best_model_at_end=True loads at the end; choose one"
            )
        _refuse_fsdp1(model, type(self).__name__)
        self._close()
        self._model = model
        self.manager = self.make_manager(model, args)
        if state.global_step > 0 and self.resume:  # a resumed run: the Trainer loaded its state
            self._load(args, state)
        if self.eval_with_average and args.eval_on_start:
            self._apply()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step >= self.start_step and (step - self.start_step) % self.every == 0:
            self._update(self._model, state)
        if self.eval_with_average and control.should_evaluate:
            self._apply()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.eval_with_average and control.should_evaluate:
            self._apply()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._applied is None:
            return
        self._restore()
        # A dict of eval datasets is evaluated one after another with no event in between, and
        # the checkpoint is saved right after the last: no place to keep the average in for them all.
        runtime = [key for key in (metrics or {}) if key.endswith("_runtime")]
        if runtime and runtime[0] != "eval_runtime":
            raise ValueError(
                f"{self._who}: eval_with_average=True expects one eval dataset, got an evaluation "
                f"prefixed {runtime[0][: -len('_runtime')]!r} (a dict of eval datasets, evaluated with no "
                "event between them). Evaluate each yourself within `with callback.average_applied(): "
                "trainer.evaluate(dataset)`"
            )

    def on_save(self, args, state, control, **kwargs):
        sharded = self.manager.tracked.sharded
        if not (args.should_save or sharded):
            return
        if sharded:
            folder = checkpoint_folder(args, state)
            os.makedirs(folder, exist_ok=True)
        else:
            folder = saved_checkpoint_folder(args, state, self._who)
        path = os.path.join(folder, self._file_name(sharded))
        save_state(path, type(self).__name__, state, self.manager.state_dict())

    def on_train_end(self, args, state, control, processing_class=None, **kwargs):
        self._restore()
        self._finish()
        target = self.save_averaged_model
        if target is not False and target is not None:
            if target is True:
                target = os.path.join(args.output_dir, self.name)
            self._save_pretrained(Path(target), args, processing_class)
        if self.load_average_at_end:
            self._copy_to(self._model)

    # --- the steps ---------------------------------------------------------------------------------

    def _apply(self) -> None:
        if self._applied is None:
            stack = contextlib.ExitStack()
            stack.enter_context(self._applied_context(self._model))
            self._applied = stack

    def _restore(self) -> None:
        applied, self._applied = self._applied, None
        if applied is not None:
            applied.close()

    def _finish(self) -> None:
        """At the end of training (PostHocEMA: the last snapshot)."""

    def _close(self) -> None:
        """Before a new manager replaces this one (another `train()`)."""
        self._restore()

    def _copy_to(self, model: Module) -> None:
        self.manager.copy_to(model)

    def _save_pretrained(self, directory: Path, args, processing_class) -> None:
        partitioned = any(zero.is_zero3(p) for p in self._model.parameters())
        if self.manager.tracked.sharded and not partitioned:
            raise ValueError(
                f"{self._who}: save_averaged_model needs the "
                "whole model on each rank, but it is sharded (FSDP2); save the manager's state_dict "
                "(DTensors) with torch.distributed.checkpoint instead"
            )
        # The main process writes it (under rank0_only, the one holding it); under ZeRO-3 every rank
        # takes part in applying the average and in DeepSpeed's gather of the whole parameters.
        if not (args.should_save or partitioned):
            return
        with self._applied_context(self._model) as model, _whole_parameters(model, partitioned):
            if args.should_save:
                model.save_pretrained(directory)
        if args.should_save and processing_class is not None:
            processing_class.save_pretrained(directory)

    def _file_name(self, sharded: bool) -> str:
        if not sharded:
            return f"swa_fast_{self.name}.pt"
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return f"swa_fast_{self.name}-rank{rank}-of-{world}.pt"

    def _load(self, args, state) -> None:
        sharded = self.manager.tracked.sharded  # (DTensors: loaded where they were, this rank's device)
        new = "resume=False to start a new average"
        path = resumed_file(args, state, self._file_name(sharded), self._who, "the average", new)
        self.manager.load_state_dict(load_state(path, type(self).__name__, state, self._who, sharded))


class EMACallback(AveragingCallback):
    """An exponential moving average of the model (`swa_fast.EMA`), updated after optimizer steps.

    Args:
        decay: the EMA decay (None: `swa_fast.EMA`'s default, 0.999, unless a half-life is given).
        every, start_step, eval_with_average, save_averaged_model, load_average_at_end, resume,
            name: as `AveragingCallback`'s (name defaults to "ema").
        ema_kwargs: passed to `swa_fast.EMA` (`half_life` or `half_life_fraction` in place of
            `decay`, `warmup_gamma`, `warmup_power`, `update_after_step`, `update_every`, counted in
            its updates, `dtype`, `use_buffers`, `device`, ...).
    """

    _NAME = "ema"

    def __init__(self, decay: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.decay = decay

    def make_manager(self, model: Module, args) -> EMA:
        return EMA(model, self.decay, **self.manager_kwargs)


class SWACallback(AveragingCallback):
    """The equal-weight average of the model after optimizer steps (`swa_fast.SWA`), typically from
    `start_step` on, every `every` steps.

    Args:
        every, start_step, eval_with_average, save_averaged_model, load_average_at_end, resume,
            name: as `AveragingCallback`'s (name defaults to "swa").
        swa_kwargs: passed to `swa_fast.SWA` (`dtype`, `use_buffers`, `check_finite`, `device`, ...).
    """

    _NAME = "swa"

    def make_manager(self, model: Module, args) -> SWA:
        return SWA(model, **self.manager_kwargs)


class PostHocEMACallback(AveragingCallback):
    """EDM2's power-function EMAs of several lengths (`swa_fast.PostHocEMA`), with snapshots from
    which any other length is synthesized after training (`swa_fast.posthoc.synthesize`).

    Args:
        sigma_rels: the tracked profiles.
        sigma_rel: the tracked profile that `eval_with_average`, `save_averaged_model`,
            `load_average_at_end` and `average_applied` use (default: the first).
        snapshot_every: a snapshot every this many updates (None: none).
        snapshot_dir: where (default: `<output_dir>/<name>_snapshots`); the final state's snapshot
            is written at the end of training.
        every, start_step, eval_with_average, save_averaged_model, load_average_at_end, resume,
            name: as `AveragingCallback`'s (name defaults to "posthoc_ema").
        posthoc_kwargs: passed to `swa_fast.PostHocEMA` (`snapshot_dtype`, `dtype`, `device`, ...).
    """

    _NAME = "posthoc_ema"

    def __init__(
        self,
        sigma_rels=(0.05, 0.10),
        *,
        sigma_rel: float | None = None,
        snapshot_every: int | None = None,
        snapshot_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.sigma_rels = tuple(sigma_rels)  # (checked by PostHocEMA, at on_train_begin)
        self.sigma_rel = self.sigma_rels[0] if sigma_rel is None else sigma_rel
        if not any(math.isclose(self.sigma_rel, s, rel_tol=1e-9) for s in self.sigma_rels):
            raise ValueError(
                f"{self._who}: sigma_rel must be one of the tracked sigma_rels {self.sigma_rels}, got "
                f"{self.sigma_rel!r} (other profiles come from the snapshots: swa_fast.posthoc.synthesize)"
            )
        self.snapshot_every = count(snapshot_every, f"{self._owner}: snapshot_every", 1, allow_none=True)
        self.snapshot_dir = snapshot_dir

    def make_manager(self, model: Module, args) -> PostHocEMA:
        directory = self.snapshot_dir
        if directory is None and self.snapshot_every is not None:
            directory = os.path.join(args.output_dir, f"{self.name}_snapshots")
        return PostHocEMA(
            model,
            self.sigma_rels,
            snapshot_every=self.snapshot_every,
            snapshot_dir=directory,
            **self.manager_kwargs,
        )

    def _applied_context(self, model: Module):
        return self.manager.average_applied(model, sigma_rel=self.sigma_rel)

    def _copy_to(self, model: Module) -> None:
        self.manager.copy_to(model, sigma_rel=self.sigma_rel)

    def _finish(self) -> None:
        self.manager.flush()

    def _close(self) -> None:
        super()._close()
        if self.manager is not None:
            self.manager.close()
