"""SWA and EMA managers over flat buffers, and `Averager`, the update logic they share with SWAG.

    swa = swa_fast.SWA(model)                  # fp32 average, also for a bf16 model
    ...
    swa.update(model)                          # one fused op per (device, dtype) group
    with swa.average_applied(model):           # evaluate with the average, live weights restored
        evaluate(model)

An update is `avg += w * (model - avg)` with the weight of swa_fast.weighting: 1/(n+1) for SWA,
1 - decay_t for EMA. Neither waits for the GPU: the counts live where no update has to read them
(counts.py), and where the average lives (beside the model, on a side stream, in pinned host
memory) is a placement object (placement.py).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import Module

from . import distributed, ops
from .counts import CountedCalls, UpdateCounts, all_finite, counted
from .engine import UpdatePlan
from .manager_reads import AverageReads
from .manager_state import ManagerState
from .manager_stats import ManagerStats
from .model_tensors import ModelCopy, TrackedModel, check_model, module_tensors
from .ops import checks
from .ops.pass_stats import ListStats
from .placement import OtherDevice, SameDevice, SideStream
from .stochastic_rounding import ManagerRounding
from .weighting import count, ema_decay, half_life_decay, real_number, swa_weight
from .wrappers import hooked, unwrap

_CPU = torch.device("cpu")
DEFAULT_EMA_DECAY = 0.999  # EMA's decay when neither it nor a half-life is given
# The managers' default average dtype: fp32 (so that a bf16/fp16 model's small updates are not
# rounded away), or fp64 when the model has fp64 floating tensors (so that theirs are not rounded).
AT_LEAST_FLOAT32 = "at least float32"


def average_dtype(dtype, tensors: list[Tensor | None], owner: str) -> torch.dtype | None:
    """The average's dtype for `dtype` as given: a floating torch.dtype, None (each tensor's own) or
    AT_LEAST_FLOAT32, resolved against the model's `tensors`; anything else raises, saying what."""
    if isinstance(dtype, str) and dtype == AT_LEAST_FLOAT32:
        wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
        return torch.float64 if wide else torch.float32
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in checks.FLOAT_DTYPES):
        return dtype
    spelled = f"the string {dtype!r}" if isinstance(dtype, str) else repr(dtype)
    named = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    hint = f": pass torch.{dtype}" if isinstance(named, torch.dtype) and named in checks.FLOAT_DTYPES else ""
    raise ValueError(
        f"swa_fast.{owner}: dtype must be torch.float32, torch.float64, torch.float16, torch.bfloat16, None "
        f"(each tensor's own) or left out (fp32, fp64 for an fp64 model); got {spelled}{hint}"
    )


def check_backend(backend: str | None, devices) -> None:
    """Refuse, when the manager is made, a forced backend that is unknown or cannot run the
    average's tensors on `devices` (rather than at the first update)."""
    if backend is not None:
        for device in devices:
            ops.choose_backend(device, backend)


class Averager(CountedCalls, AverageReads, ManagerState):
    """The update logic of SWA, EMA and SWAG: flat copies of the model's floating parameters (and
    buffers with `use_buffers=True`; integer buffers are copied), updated in place by one fused op
    per (device, dtype) group. Subclasses give each update its weight (`_update_weight`) and may
    set another fused op (`_OP`, over `_plan_targets()`) and extend `_run_update`.

    Wrapped models (DDP, torch.compile) are unwrapped, so names and tensors are the inner model's.
    Every rank of a DDP / FSDP2 model must create its manager from the same model with the same
    options: checked once, here.

    Args:
        model: the model to average; `update` must be given this model (or a wrapper of it).
        dtype: the average's dtype. Left out: fp32, also for a bf16/fp16 model, so small updates
            are not rounded away, and fp64 when the model has fp64 floating tensors (every
            average is then fp64), so theirs are not rounded either. None keeps each tensor's own
            dtype; a torch.dtype (torch.float32, ...) is used for every tensor.
        use_buffers: average floating buffers (BatchNorm statistics) too, and copy integer ones.
        check_finite: an update in which any of the model's values is inf or NaN leaves the average
            untouched and counts in `n_skipped`, decided on the device (no host sync). Off, as in
            torch, a non-finite value enters the average.
        rank0_only: under DDP, keep the average on rank 0 only; the other ranks allocate nothing,
            their `update` does nothing and `state_dict()` is empty. (Under FSDP2 each rank averages
            its own shards, and `state_dict()` holds DTensors: see distributed.py.)
        device: keep the average there. For a GPU model, `device="cpu"` keeps it in pinned host
            memory: each `update` starts an asynchronous copy of the weights and returns, and the
            CPU applies it at the next `update` or at the first read (`copy_to`, `state_dict`, ...).
            Without it each tensor's average sits on that tensor's device.
        side_stream: update on a CUDA stream of its own, overlapping the next forward pass; the next
            `optimizer.step()` and, with `use_buffers`, the model's next forward wait for it on the
            GPU. Anything else that changes the weights in place in between must call `wait()`.
        backend: force an op backend (see `swa_fast.choose_backend`); one that is unknown or cannot
            run where the average lives is refused here.
        capturable: (SWA and EMA) keep the counts and the schedule on the model's device and work
            each weight out there, so that `update` reads no host state and takes no host branch:
            it can be recorded in a CUDA graph and replayed, and traced whole by torch.compile (no
            graph break, no recompilation per call). A few 0-dim device ops per update; beside the
            model only (no side_stream, no device=).
        rounding: "nearest", or "stochastic": each update's fp32 result is rounded into bf16 and
            fp16 averages stochastically (unbiased: an EMA of decay 0.9999 keeps moving in bf16
            instead of stalling), by random bits of the seed, the update's number and each element's
            place in the model, the same on every rank (docs/low-precision.md).
        seed: stochastic rounding's seed (64 bits), kept in the state_dict.
        stats: count, in the update's own pass, the elements each update wrote, those whose stored
            value it left unchanged and those not finite, and the largest |update|, kept on the
            device until `last_stats()` reads them (no host synchronisation per update); and warn
            once when an update moved no element at all although it was not zero (a stalled
            low-precision average: docs/low-precision.md).
    """

    _CAPTURABLE = False  # whether the subclass has a capturable update (`_device_weight`)
    _OP = "lerp_"  # the fused op of an update: SWAG's moments_, PostHocEMA's multi_lerp_
    _ADDS_COPIES = False  # whether `_plan_targets` reads copies the subclass makes after __init__
    _SOURCE = "params"  # what a DeepSpeed ZeRO parameter's average follows (integrations.deepspeed)

    def __init__(
        self,
        model: Module,
        *,
        dtype: torch.dtype | str | None = AT_LEAST_FLOAT32,
        use_buffers: bool = False,
        check_finite: bool = False,
        rank0_only: bool = False,
        device: torch.device | str | None = None,
        side_stream: bool = False,
        backend: str | None = None,
        capturable: bool = False,
        rounding: str = "nearest",
        seed: int = 0,
        stats: bool = False,
    ) -> None:
        if capturable and not self._CAPTURABLE:
            raise ValueError(
                f"swa_fast.{type(self).__name__}: capturable=True is for SWA and EMA; this manager's "
                "update decides on the host"
            )
        check_model(model, type(self).__name__)
        dtype = average_dtype(dtype, module_tensors(unwrap(model)[0], use_buffers), type(self).__name__)
        options = [("dtype", str(dtype)), ("check_finite", check_finite), ("rank0_only", rank0_only)]
        self._rounding = ManagerRounding(rounding, seed, type(self).__name__, self._OP)
        self._stats = ManagerStats(
            stats, type(self).__name__, self._OP, ("average",), warns=not self._rounding.stochastic
        )
        if stats and capturable:
            raise ValueError(
                f"swa_fast.{type(self).__name__}: stats=True keeps host state between updates; it cannot "
                "be captured (drop capturable=True)"
            )
        if self._rounding.stochastic:  # every rank must draw alike
            options += [("rounding", rounding), ("seed", seed)]
        self.tracked = TrackedModel(model, use_buffers, type(self).__name__, options, self._SOURCE)
        if rank0_only and self.tracked.sharded:
            raise ValueError(
                f"swa_fast.{type(self).__name__}: rank0_only=True needs the whole model on rank 0 (DDP), "
                "but its parameters are sharded (FSDP2 DTensors or DeepSpeed ZeRO partitions): each rank "
                "must average its own shards"
            )
        # The other ranks keep a stand-in of the right shapes on the meta device: no memory.
        self.holds_average = not rank0_only or distributed.rank_in(model) == 0
        tensors = self.tracked.tensors(model)
        check_backend(backend, {torch.device(device)} if device is not None else {t.device for t in tensors})
        self.names = self.tracked.names
        complex_names = [name for name, t in zip(self.names, tensors) if t.is_complex()]
        if complex_names:
            raise ValueError(
                f"swa_fast.{type(self).__name__}: '{complex_names[0]}' is complex ({len(complex_names)} "
                "complex tensors in all); the averages here are of real floating tensors (float32, float64, "
                "float16, bfloat16): average the real and imaginary parts as real parameters"
            )
        self.use_buffers = use_buffers
        self.check_finite = check_finite
        self.backend = backend
        model_device = tensors[0].device if tensors else _CPU
        device = torch.device(device) if device is not None else None
        moved = device is not None and any(t.device != device for t in tensors)
        pin = moved and device.type == "cpu" and any(t.is_cuda for t in tensors)
        self._copy = ModelCopy(
            self.tracked,
            tensors,
            dtype=dtype,
            device=device if self.holds_average else "meta",
            pin_memory=pin and self.holds_average,
            backend=backend,
        )
        self.average = self._copy.flat
        self._rounding.start(self.tracked, self._copy.stored(), capturable)
        self._integers = self._copy.integers
        self._placement: SameDevice | SideStream | OtherDevice
        if moved and self.holds_average:
            if side_stream:
                raise ValueError("swa_fast: side_stream=True keeps the average on the GPU: drop device=")
            self._placement = OtherDevice(self.tracked, tensors, device, pin)
        elif side_stream:
            self._placement = SideStream(model, model_device, join_forward=use_buffers)
        else:
            self._placement = SameDevice()
        if capturable and not isinstance(self._placement, SameDevice):
            raise ValueError(
                f"swa_fast.{type(self).__name__}: capturable=True updates the average beside the model, "
                "on the current stream: drop side_stream= and device="
            )
        self.counts = UpdateCounts(device or model_device, device_decides=check_finite or capturable)
        # torch's max-abs norm has no value for an empty tensor: check_finite leaves those out.
        self._has_empty = any(t.numel() == 0 for t in self.tracked.split(tensors)[0])
        self._calls = 0  # update() calls, counted on the host
        self._updates = 0  # updates applied to the average, counted on the host
        # capturable: the calls counted on the device instead (the updates are n_averaged + n_skipped)
        self._device_calls = (
            torch.zeros((), dtype=torch.long, device=device or model_device) if capturable else None
        )
        # The engine's plan of every update; a subclass that adds copies (SWAG, PostHocEMA) makes it
        # once they exist.
        self._plan = None if self._ADDS_COPIES else self._new_plan()

    # --- updates ------------------------------------------------------------------------------------

    def _update_weight(self) -> Tensor | float | None:
        """The weight of this call's update; None to skip the call."""
        raise NotImplementedError

    def _device_weight(self) -> tuple[Tensor, Tensor | None]:
        """Capturable: the weight of this call's update as a device tensor, worked out from the
        device counts, and a device boolean saying whether the call averages at all (None: it
        does)."""
        raise NotImplementedError

    def update(self, model: Module) -> None:
        """Update the average with the model's current weights. (No `torch.no_grad()` around it:
        the ops write below autograd, and entering it would cost a sizeable part of a small
        model's update.)"""
        tensors = self.tracked.tensors(model)
        self._count_call()
        try:
            if self.holds_average:
                self._placement.update(self, tensors)
        except Exception:
            self._refused_call()
            raise

    def attach(
        self, optimizer: torch.optim.Optimizer, model: Module | None = None, every: int = 1
    ) -> torch.utils.hooks.RemovableHandle:
        """Update from the optimizer, so the training loop needs no call: a step post-hook calls
        `self.update(model)` after every `every`-th `optimizer.step()` (counted from here; a step
        that GradScaler skips runs no hook). `model` defaults to the model this manager was made
        from, held weakly as the manager holds it (an unpickled manager, which has none yet, needs
        `model=`). An optimizer wrapper whose own step runs no hooks (`swa_fast.optim.SWA`) is
        taken: the hook goes on the optimizer it wraps, whose step its own calls once. Returns the
        hook's handle: `handle.remove()` detaches it."""
        every = count(every, f"{type(self).__name__}.attach: every", 1)
        optimizer = hooked(optimizer, f"{type(self).__name__}.attach")
        if model is None and self.tracked.model is None:
            raise ValueError(
                f"swa_fast.{type(self).__name__}.attach: this manager holds no model (unpickled, or its "
                "model was freed): pass model="
            )
        if model is not None:  # the model this manager averages (or one like it), else raise now
            self.average.check_shapes(self.tracked.split(self.tracked.tensors(model))[0])
        steps = 0

        def after_step(_optimizer, _args, _kwargs) -> None:
            nonlocal steps
            steps += 1
            if steps % every == 0:
                target = model if model is not None else self.tracked.model
                if target is None:
                    raise RuntimeError(f"swa_fast.{type(self).__name__}: the attached model was freed")
                self.update(target)

        return optimizer.register_step_post_hook(after_step)

    def update_from(self, tensors: list[Tensor]) -> None:
        """Update the average with `tensors` laid out as the model's (in the order of
        `tracked.tensors(model)`: say an FGE snapshot's stored tensors), wherever they are."""
        if len(tensors) != len(self.names):
            raise ValueError(
                f"swa_fast.{type(self).__name__}.update_from: expected {len(self.names)} tensors laid out "
                f"as the model's, got {len(tensors)}"
            )
        self.wait()
        self._count_call()
        if not self.holds_average:
            return
        # Each tensor to where its average (or kept integer buffer) is; an upload runs in order on
        # the GPU's stream, a download must land before the CPU reads it.
        places = [kept.device for kept in self._copy.stored()]
        try:
            self.apply(
                [
                    t if t.device == d else t.to(d, non_blocking=d.type == "cuda")
                    for t, d in zip(tensors, places)
                ]
            )
        except Exception:
            self._refused_call()
            raise

    def apply(self, tensors: list[Tensor], weight: Tensor | float | None = None) -> None:
        """Update the average now with `tensors` (the model's, or copies of them laid out alike)
        with this call's weight, or `weight` when it was worked out already (what a placement
        that applies the update later passes)."""
        due = None  # capturable: a device boolean, whether this call is one that averages
        if weight is None:
            weight, due = (
                (self._update_weight(), None) if self._device_calls is None else self._device_weight()
            )
            if weight is None:
                return
        self._stats.note_weight(weight)
        finite = None
        if self.check_finite:
            # Weight 0 leaves the average exactly as it was (the ops guarantee it even for inf/NaN
            # sources), so a non-finite update is skipped on the device, without a sync.
            finite = all_finite(self._finite_groups(tensors), self.counts.n_skipped.device)
            # (a float weight stays a CPU scalar: copying it to the GPU would wait for the stream)
            weight = torch.where(finite, torch.as_tensor(weight, dtype=torch.float64), 0.0)
        if due is not None:  # weight 0 on a call off the schedule: the average stays as it was
            weight = torch.where(due, weight, 0.0)
        try:
            self._run_update(tensors, weight, counted(finite, due))
        except BaseException as error:
            # An Exception is the op's refusal, raised before it writes: nothing to count. An
            # interrupt (KeyboardInterrupt) is raised by Python as the op returns, when it came
            # while the op ran: what the op wrote counts.
            if not isinstance(error, Exception):
                self._count_update(finite, due)
            raise
        self._count_update(finite, due)

    def _count_update(self, finite: Tensor | None, due: Tensor | None) -> None:
        self.counts.add(finite, due)
        if self._device_calls is None:  # (capturable: no host state changes)
            self._updates += 1

    def _refused_call(self) -> None:
        """Take back the call counted by an update that was refused: an Exception from the update
        is raised before anything is written (the engine checks every group first), so a refused
        update changes nothing. (An interrupt leaves the call counted: see `apply`.)"""
        self.calls -= 1

    def _finite_groups(self, tensors: list[Tensor]) -> list[list[Tensor]]:
        """The floating tensors per flat group (one device each), the empty ones left out."""
        groups = [src for _, _, src in self.average.pairs(self.tracked.split(tensors)[0])]
        return [[t for t in src if t.numel()] for src in groups] if self._has_empty else groups

    def next_weight(self) -> Tensor | float | None:
        """The weight of this call's update (None: the call does not average), for a placement
        that applies the update later."""
        return self._update_weight()

    def _plan_targets(self) -> list[list[Tensor]]:
        """The update op's target lists, laid out as the model's tensors (integer positions hold
        the kept integer buffers, which the engine copies)."""
        return [self._copy.stored()]

    def _new_plan(self) -> UpdatePlan:
        """The engine's plan of every update: the op over `_plan_targets()`, each paired with the
        model's tensor at its place (laid out, and living, as the stored copy is: the sources are
        the model's or, for an average kept elsewhere, a staging copy beside it)."""
        return UpdatePlan(
            self._OP,
            self._plan_targets(),
            self._copy.stored(),
            owner=type(self).__name__,
            names=self.names,
            keep_sources=False,  # the model is tracked, and held weakly, by self.tracked
            backend=self.backend,
        )

    def _run_update(self, tensors: list[Tensor], weight, counted_on_device: Tensor | None) -> None:
        """Run the update op over every group."""
        rounding = self._rounding.at(self._updates)
        stats = self._stats.for_update(self._plan)
        self._plan.run(tensors, weight, counted=counted_on_device, rounding=rounding, stats=stats)
        self._stats.after_update()

    def last_stats(self) -> dict[str, ListStats]:
        """What the last update's pass saw (`stats=True`), per average it writes ("average"; SWAG's
        "mean" and "sq"; PostHocEMA's one per sigma_rel): the elements written, those whose stored
        value did not change, those not finite, and the largest |update| (ops.pass_stats). Waits
        for the update and reads the counts to the host; summed over devices, this rank's own."""
        self.wait()
        return self._stats.last()

    def wait(self) -> None:
        """Make what follows see every update made so far: on the GPU for a side-stream update (no
        host sync), on the host for an average kept on another device (applies it)."""
        self._placement.wait(self)


class SWA(Averager):
    """Stochastic Weight Averaging (Izmailov et al., UAI 2018): the equal-weight mean of every model
    passed to `update`, each update weighted 1/(n+1).

    The weight is a host number, new at every update (with `check_finite`, a device tensor), so a
    CUDA graph that captured an `update` would replay a stale weight: pass `capturable=True` to
    record `update` in a graph (or to compile it).

    Args:
        model: the model to average.
        **options: the `Averager`'s (dtype, use_buffers, check_finite, rank0_only, device,
            side_stream, backend, capturable, rounding, seed, stats).
    """

    _CAPTURABLE = True

    def _update_weight(self) -> Tensor | float:
        return swa_weight(self.counts.current())  # 1 first: an exact copy

    def _device_weight(self) -> tuple[Tensor, None]:
        return swa_weight(self.counts.current(), capturable=True), None


class EMA(Averager):
    """Exponential moving average: avg = decay_t * avg + (1 - decay_t) * model.

    Its length is given by one of `decay` (0.999 when none is given), `half_life` or
    `half_life_fraction`; `decay_at(call)` says the decay of any call.

    Args:
        model: the model to average.
        decay: the decay once warmed up, a real number in [0, 1] (a Python or numpy number, or a
            0-dim tensor, read once here). Left out: 0.999, or the half-life's.
        half_life: instead of `decay`, the half-life in update() calls (> 0): a model's weight in
            the average halves every `half_life` calls, decay_t = 2 ** (-update_every / half_life)
            at every averaging update (`self.decay` holds it).
        half_life_fraction: instead of `decay`, a half-life that grows with the run, this fraction
            (in (0, 1]) of the calls since the copy, as torchtitan's EMA (`half_life_fraction`):
            decay_t = 2 ** (-1 / (half_life_fraction * k)) at the k-th averaging update after the
            copy (k = 1, 2, ...; with update_every=1, k is the call's number after the copy), so
            the average at any time weighs mostly the last fraction of the run (0.05: the rule of
            thumb decay = 2 ** (-20 / k)). `self.decay` is None.
        warmup_gamma, warmup_power: timm's ModelEmaV3 warmup, decay_t = min(decay,
            1 - (1 + t / gamma) ** -power) for the t-th averaging update, so early averages follow
            the model closely; None (the default) uses `decay` from the start. Both > 0. Not with
            a half-life (`half_life_fraction` is a warmup of its own).
        update_after_step: the first `update_after_step + 1` calls to `update` copy the model.
        update_every: after that, only every `update_every`-th call averages.
        dtype, use_buffers, check_finite, rank0_only, device, side_stream, backend, capturable,
        rounding, seed, stats: as the `Averager`'s.
    """

    _CAPTURABLE = True

    def __init__(
        self,
        model: Module,
        decay: float | None = None,
        *,
        half_life: float | None = None,
        half_life_fraction: float | None = None,
        warmup_gamma: float | None = None,
        warmup_power: float = 2 / 3,
        update_after_step: int = 0,
        update_every: int = 1,
        dtype: torch.dtype | str | None = AT_LEAST_FLOAT32,
        use_buffers: bool = False,
        check_finite: bool = False,
        rank0_only: bool = False,
        device: torch.device | str | None = None,
        side_stream: bool = False,
        backend: str | None = None,
        capturable: bool = False,
        rounding: str = "nearest",
        seed: int = 0,
        stats: bool = False,
    ) -> None:
        if warmup_gamma is not None:
            warmup_gamma = real_number(warmup_gamma, "EMA: warmup_gamma", 0.0, above_low=True)
        warmup_power = real_number(warmup_power, "EMA: warmup_power", 0.0, above_low=True)
        update_after_step = count(update_after_step, "EMA: update_after_step", 0)
        update_every = count(update_every, "EMA: update_every", 1)
        half_life, half_life_fraction = ema_half_life(decay, half_life, half_life_fraction, warmup_gamma)
        if half_life is not None:
            decay = 2.0 ** (-update_every / half_life)  # the same every averaging update
        elif half_life_fraction is None:
            decay = real_number(DEFAULT_EMA_DECAY if decay is None else decay, "EMA: decay", 0.0, 1.0)
        super().__init__(
            model,
            dtype=dtype,
            use_buffers=use_buffers,
            check_finite=check_finite,
            rank0_only=rank0_only,
            device=device,
            side_stream=side_stream,
            backend=backend,
            capturable=capturable,
            rounding=rounding,
            seed=seed,
            stats=stats,
        )
        self.decay = decay  # None: it changes at every averaging update (half_life_fraction)
        self.half_life = half_life
        self.half_life_fraction = half_life_fraction
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.update_after_step = update_after_step
        self.update_every = update_every

    def decay_at(self, call: int) -> float:
        """decay_t at the `call`-th update() call (from 1): 0 (a copy of the model) up to
        `update_after_step` + 1, then `decay`, or its warmup, or the half-life's (of the call, when
        it averages: with `update_every`, every `update_every`-th call after the copy)."""
        return self._decay(call - self.update_after_step - 1)

    def _decay(self, t: int | Tensor) -> float | Tensor:
        """decay_t, t calls after the copy (a host int, or a device tensor when capturable)."""
        if self.half_life_fraction is not None:
            return half_life_decay(t, self.update_every, fraction=self.half_life_fraction)
        if self.half_life is not None:
            return half_life_decay(t, self.update_every, half_life=self.half_life)
        return ema_decay(self.decay, t, self.warmup_gamma, self.warmup_power)

    def _update_weight(self) -> float | None:
        # A host-side schedule of host-side counts: a Python float weight, read by the kernels on
        # the host, costs no device synchronisation.
        t = self._calls - self.update_after_step - 1
        if t > 0 and t % self.update_every:
            return None
        return 1.0 - self.decay_at(self._calls)

    def _device_weight(self) -> tuple[Tensor, Tensor | None]:
        t = self._device_calls - (self.update_after_step + 1)  # the same schedule, on the device
        due = None if self.update_every == 1 else (t <= 0) | (t % self.update_every == 0)
        return 1.0 - self._decay(t), due

    def _extra_state(self) -> dict:
        # The rule's settings; one that is off is left out (older states have only "decay").
        rule = {key: getattr(self, key) for key in RULE_KEYS}
        return {key: value for key, value in rule.items() if value is not None}

    def _check_extra_state(self, state: dict) -> None:
        """A state of another rule is refused: its decay, half_life and half_life_fraction (absent:
        None, as in states saved before them) must be this EMA's. (A state with none of them, which
        none saved, is taken by an EMA of a decay, as it always was.)"""
        ours = self._extra_state()
        theirs = {key: state[key] for key in RULE_KEYS if state.get(key) is not None}
        if not theirs and ours.keys() == {"decay"}:
            return
        if theirs != ours:
            raise ValueError(
                f"swa_fast.EMA.load_state_dict: expected a state_dict of an EMA with {said_rule(ours)}, got "
                f"one with {said_rule(theirs)}; nothing was loaded"
            )


RULE_KEYS = ("decay", "half_life", "half_life_fraction")  # an EMA's rule, in its state_dict


def said_rule(rule: dict) -> str:
    """An EMA rule's settings in words, for an error."""
    return ", ".join(f"{key}={rule[key]!r}" for key in RULE_KEYS if key in rule) or "no decay saved"


def ema_half_life(
    decay: object, half_life: object, fraction: object, warmup_gamma: float | None
) -> tuple[float | None, float | None]:
    """EMA's `half_life` and `half_life_fraction` checked (None: not given): at most one of them,
    neither with `decay` nor `warmup_gamma`, each a real number, half_life > 0 and the fraction in
    (0, 1]."""
    settings = (("half_life", half_life), ("half_life_fraction", fraction))
    given = [name for name, value in settings if value is not None]
    if not given:
        return None, None
    if len(given) == 2:
        raise ValueError(
            "swa_fast.EMA: expected one of half_life= (in update() calls) and half_life_fraction= (of the "
            f"calls so far), got both: half_life={half_life!r}, half_life_fraction={fraction!r}"
        )
    for other, value in (("decay", decay), ("warmup_gamma", warmup_gamma)):
        if value is not None:
            raise ValueError(
                f"swa_fast.EMA: {given[0]}= sets the decay; expected no {other}= beside it, "
                f"got {other}={value!r}"
            )
    if half_life is not None:
        return real_number(half_life, "EMA: half_life", 0.0, above_low=True), None
    return None, real_number(fraction, "EMA: half_life_fraction", 0.0, 1.0, above_low=True)
