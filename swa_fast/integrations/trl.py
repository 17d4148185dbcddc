"""Drop-in for TRL's `BEMACallback`: change the import, keep the code.

    from swa_fast.integrations.trl import BEMACallback     # was: from trl import BEMACallback

    trainer = SFTTrainer(..., callbacks=[BEMACallback(update_freq=400)])
    trainer.train()          # the BEMA weights in callback.running_model, saved to <output_dir>/bema

It subclasses TRL's class (so `isinstance(callback, trl.BEMACallback)` holds) with its arguments,
attributes and results: the same steps (the Trainer's `global_step`: theta_0 at `update_after`,
an update every `update_freq` steps after it), the same weights (`weighting.bema_weights`, TRL's
expressions), `running_model` holding the BEMA weights after every update (TRL's to a few fp32
ulps: one rounding of the fused pass instead of TRL's several), saved with `save_pretrained` to
`<output_dir>/bema` at the end of training.

What changes:
- The update is `swa_fast.BEMA`'s: one fused `bema_` pass per flat group over the model, the EMA and
  theta_0, writing the EMA and the BEMA weights, no Python loop over the parameters, no
  temporaries. `running_model`'s parameters view the manager's BEMA buffer, so the pass writes
  them in place. With `device="cpu"` (TRL's default) and a GPU model, each update starts one
  asynchronous copy of the weights into pinned host memory and returns; the CPU applies it at the
  next update or when `running_model` (or the manager) is read, where TRL copies each parameter to
  the host and waits for it.
- The EMA and theta_0 are kept in `dtype`: by default fp32, fp64 for an fp64 model (TRL keeps them
  in the model's dtype, bf16 for a bf16 model, where small EMA steps round away; it keeps
  `running_model` in the default dtype, fp32). `dtype=None` keeps the model's.
- Every parameter is averaged; TRL's callback pairs the trainable ones with all of
  `running_model`'s parameters and raises for a model with frozen ones.
- The state (the EMA, theta_0, the BEMA weights, the counts) is written into each checkpoint folder
  at `on_save` (`swa_fast_bema.pt`), and a `train(resume_from_checkpoint=...)` loads it, so a
  resumed run goes on bit for bit. TRL's keeps nothing: its resumed run takes theta_0 and the EMA
  anew from the resumed weights, which `resume=False` does here too.
"""

from __future__ import annotations

import os

import torch
from torch.nn import Module
from trl import BEMACallback as _TRLBEMACallback

from ..averaging import AT_LEAST_FLOAT32, average_dtype
from ..bema import BEMA, schedule_settings
from ..model_tensors import save_own_bytes
from ..weighting import count
from ._trainer_checkpoints import load_state, resumed_file, save_state, saved_checkpoint_folder

__all__ = ["BEMACallback"]

_OWNER = "integrations.trl.BEMACallback"
_FILE = "swa_fast_bema.pt"  # the callback's state in each checkpoint folder


def _average_device(device, model: Module) -> torch.device:
    """`device` as given, made the model's own when it names the model's device type without an
    index ("cuda" for a model on cuda:1), so that the average is not kept apart from it."""
    device = torch.device(device)
    first = next(model.parameters(), None)
    if first is not None and device.index is None and first.device.type == device.type:
        return first.device
    return device


def _view_bema_weights(running: Module, manager: BEMA) -> None:
    """Make `running`'s parameters views of the manager's BEMA weights (the same Parameter objects,
    tied ones included), so every update writes them in place; their state dicts give each entry
    its own bytes, as a plain module's (`save_pretrained` saves them as separate tensors)."""
    params = dict(running.named_parameters())
    if list(params) != manager.names:
        raise ValueError(
            f"swa_fast.{_OWNER}: expected running_model (type(model)(model.config)) to have the model's "
            f"{len(manager.names)} parameters in its order, got {len(params)} ({list(params)[:3]} ...)"
        )
    with torch.no_grad():
        for name, view in zip(manager.tracked.floating_names, manager.average.views):
            params[name].data = view
    save_own_bytes(running)


class BEMACallback(_TRLBEMACallback):
    """TRL's `BEMACallback` (bias-corrected EMA, Block et al. 2025) on `swa_fast.BEMA`: one fused
    pass per update, `running_model` written in place, the state kept in the Trainer's checkpoints.

    Args:
        update_freq: update every this many optimizer steps after `update_after` (phi).
        ema_power: kappa, beta_t = (lag + multiplier * t) ** -kappa (0: no EMA).
        bias_power: eta, alpha_t = (lag + multiplier * t) ** -eta.
        lag: rho, the schedule's offset.
        update_after: tau, the step that takes theta_0 and starts the EMA (0: the weights at the start
            of training).
        multiplier: gamma, the schedule's growth per step.
        min_ema_multiplier: the least beta_t.
        device: where the EMA, theta_0 and `running_model` live (TRL's default: the CPU).
        dtype: (keyword, swa_fast's) the dtype of the EMA, theta_0 and `running_model`'s parameters:
            by default fp32, fp64 for an fp64 model; None: the model's own (TRL's EMA).
        resume: (keyword, swa_fast's) load the state from the checkpoint that
            `train(resume_from_checkpoint=...)` resumes (raises when it holds none); False: take
            theta_0 and the EMA anew from the resumed weights, as TRL's callback does.
    """

    def __init__(
        self,
        update_freq: int = 400,
        ema_power: float = 0.5,
        bias_power: float = 0.2,
        lag: int = 10,
        update_after: int = 0,
        multiplier: float = 1.0,
        min_ema_multiplier: float = 0.0,
        device: str = "cpu",
        *,
        dtype: torch.dtype | str | None = AT_LEAST_FLOAT32,
        resume: bool = True,
    ) -> None:
        update_freq = count(update_freq, f"{_OWNER}: update_freq", 1)
        update_after = count(update_after, f"{_OWNER}: update_after", 0)
        schedule_settings(_OWNER, ema_power, bias_power, lag, multiplier, min_ema_multiplier)  # TRL's kept
        average_dtype(dtype, [], _OWNER)  # refused here rather than when training starts
        torch.device(device)  # likewise
        super().__init__(
            update_freq, ema_power, bias_power, lag, update_after, multiplier, min_ema_multiplier, device
        )
        self.dtype = dtype
        self.resume = resume
        self.manager: BEMA | None = None  # made at on_train_begin
        self._model: Module | None = None

    @property
    def running_model(self) -> Module | None:
        """A model of the trained one's class holding the BEMA weights (its parameters view the
        manager's buffer), as of the last update: an update still in flight (a GPU model's, applied
        on the CPU) is applied first."""
        if self.manager is not None:
            self.manager.wait()
        return self._running_model

    @running_model.setter
    def running_model(self, model: Module | None) -> None:
        self._running_model = model

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError(f"swa_fast.{_OWNER}: expected the Trainer to pass the model, got none")
        model = self._unwrap_model(model)
        device = _average_device(self.device, model)
        manager = BEMA(
            model,
            ema_power=self.ema_power,
            bias_power=self.bias_power,
            lag=self.lag,
            update_after=self.update_after,
            update_every=self.update_freq,
            multiplier=self.multiplier,
            min_ema_multiplier=self.min_ema_multiplier,
            dtype=self.dtype,
            device=device,
        )
        if state.global_step > 0 and self.resume:  # a resumed run: the Trainer loaded its state
            path = resumed_file(
                args,
                state,
                _FILE,
                f"swa_fast.{_OWNER}",
                "the BEMA state",
                "resume=False to take theta_0 and the EMA anew from the resumed weights (as TRL's callback)",
            )
            manager.load_state_dict(load_state(path, "BEMACallback", state, f"swa_fast.{_OWNER}"))
        # TRL's running_model: a new model of the same class, with the model's buffers (and, until
        # the first update, its weights), its parameters then the manager's BEMA weights.
        running = type(model)(model.config).to(device)
        running.load_state_dict(model.state_dict())
        _view_bema_weights(running, manager)
        self.manager, self._model, self.running_model = manager, model, running
        # TRL's attributes, over the same memory
        self.param_names = list(manager.tracked.floating_names)
        self.thetat_params = manager.tracked.split(manager.tracked.tensors(model))[0]
        self.theta0_params, self.ema_params = manager.start.views, manager.ema.views

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.manager.update(self._model, step=state.global_step)

    def _update_bema_weights(self, step: int) -> None:
        """TRL's: the BEMA update with step `step`'s weights, now (one fused pass)."""
        self.manager._update_at(self._model, step)

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:  # (every rank holds the same state: the main process writes it)
            return
        folder = saved_checkpoint_folder(args, state, f"swa_fast.{_OWNER}")
        save_state(os.path.join(folder, _FILE), "BEMACallback", state, self.manager.state_dict())

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.running_model.save_pretrained(f"{args.output_dir}/bema")
