"""SWA, EMA and SWAG managers over flat buffers: what a training loop calls.

    swa = swa_fast.SWA(model)                  # fp32 average, also for a bf16 model
    ...
    swa.update(model)                          # one fused op per (device, dtype) group
    with swa.average_applied(model):           # evaluate with the average, live weights restored
        evaluate(model)

SWA (Izmailov et al., UAI 2018) gives every update the weight 1/(n+1), with n the models averaged
so far: counted on the host, or with `check_finite` (where the device decides which updates count)
computed on the device from the device-resident count `n_averaged`. EMA uses 1 - decay, with
timm's optional warmup decay_t = min(decay, 1 - (1 + t/gamma)^-power) and its schedule
(`update_after_step`, `update_every`) computed from a host-side count of calls. Neither waits for
the GPU.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from . import distributed, ops
from .bn import update_bn
from .ensemble import ensemble_predict
from .flat import FlatBuffer, copy_lists
from .model_tensors import ModelCopy, TrackedModel

_CPU = torch.device("cpu")


class Averager:
    """The shared machinery of SWA, EMA and SWAG: flat fp32 (by default) copies of the model's floating
    parameters (and buffers with `use_buffers=True`; integer buffers are copied), updated in place.

    `check_finite=True`: an update in which any of the model's values is inf or NaN leaves the
    average untouched and counts in `n_skipped`, decided on the device (no host sync). Off, as in
    torch, a non-finite value enters the average.

    Wrapped models (DDP, torch.compile) are unwrapped, so names and tensors are the inner model's.
    Under DDP every rank keeps the same average with no communication; `rank0_only=True` keeps it
    on rank 0 only (the other ranks' `update` does nothing, `state_dict()` is empty). Under FSDP2
    each rank averages its own shards, and `state_dict()` holds DTensors (see distributed.py).
    Every rank must pass the same DDP / FSDP2 model and options: checked once, here.

    Placement, for a GPU model: `device="cpu"` keeps the average in (pinned) CPU memory. Each
    `update` then starts an asynchronous copy of the weights to the CPU and returns; the copy is
    folded into the average by the CPU at the next `update` (by when it has long landed) or at the
    first read (`copy_to`, `average_applied`, `state_dict`...). `side_stream=True` instead runs the
    update on its own CUDA stream, overlapping the next forward pass; the next `optimizer.step()`
    (any optimizer's, through a global step pre-hook) and, with `use_buffers`, the model's next
    forward wait for it on the GPU, without a host sync. Anything else that changes the weights
    in place in between must call `wait()` first.
    """

    def __init__(
        self,
        model: Module,
        *,
        dtype: torch.dtype | None = torch.float32,
        use_buffers: bool = False,
        check_finite: bool = False,
        rank0_only: bool = False,
        device: torch.device | str | None = None,
        side_stream: bool = False,
        backend: str | None = None,
    ) -> None:
        options = [("dtype", str(dtype)), ("check_finite", check_finite), ("rank0_only", rank0_only)]
        self.tracked = TrackedModel(model, use_buffers, type(self).__name__, options)
        if rank0_only and self.tracked.sharded:
            raise ValueError(
                f"swa_fast.{type(self).__name__}: rank0_only=True needs the whole model on rank 0 (DDP), "
                "but its parameters are sharded DTensors (FSDP2): each rank must average its own shards"
            )
        # The other ranks keep a stand-in of the right shapes on the meta device: no memory.
        self.holds_average = not rank0_only or distributed.rank_in(model) == 0
        tensors = self.tracked.tensors(model)
        self.names = self.tracked.names
        self.use_buffers = use_buffers
        self.backend = backend
        model_device = tensors[0].device if tensors else _CPU
        # Without `device`, each tensor's average sits on that tensor's device (a model spread over
        # several GPUs keeps a flat group per device).
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
        self._integers = self._copy.integers
        # The model's weights on their way to the average's device, and the weight of the update
        # they belong to (folded at the next update or read).
        self._staging: ModelCopy | None = None
        self._pending: Tensor | float | None = None
        if moved and self.holds_average:
            if side_stream:
                raise ValueError("swa_fast: side_stream=True keeps the average on the GPU: drop device=")
            self._stage_through(tensors, pin)
        self._stream = self._side_stream(model, model_device) if side_stream else None
        counts_device = device or model_device
        self._n_averaged = torch.zeros((), dtype=torch.long, device=counts_device)
        self.check_finite = check_finite
        self.n_skipped = torch.zeros((), dtype=torch.long, device=counts_device)  # non-finite updates
        # The count as the host knows it, so that no update has to read it from the device or
        # write it there (see `n_averaged`); None with check_finite, where the device decides
        # which updates count. `_n_written`: the count last written to the device tensor.
        self._n_host: int | None = None if check_finite else 0
        self._n_written = 0
        self.calls = 0  # update() calls, counted on the host
        self.folds = 0  # updates folded into the average, counted on the host

    @property
    def n_averaged(self) -> Tensor:
        """The number of updates in the average: a 0-dim tensor on the average's device. Without
        `check_finite` the host counts them and writes this tensor when it is read, so that an
        update launches nothing but its fused op; read it here each time rather than keeping it."""
        if self._n_host is not None and self._n_written != self._n_host:
            self._n_averaged.fill_(self._n_host)
            self._n_written = self._n_host
        return self._n_averaged

    def _groups(self, tensors: list[Tensor]) -> list[tuple[list[Tensor], list[Tensor]]]:
        """(average views, model tensors) per flat group."""
        floating, _ = self.tracked.split(tensors)
        return [(views, src) for _, views, src in self.average.pairs(floating)]

    # --- updates ------------------------------------------------------------------------------------

    def _weight(self) -> Tensor | float | None:
        """The weight of this call's update; None to skip the call."""
        raise NotImplementedError

    def update(self, model: Module) -> None:
        """Fold the model's current weights into the average. (No `torch.no_grad()` around it: the
        ops write below autograd, and entering it costs ~2 us, a tenth of a small model's update.)"""
        tensors = self.tracked.tensors(model)
        self.calls += 1
        if not self.holds_average:
            return
        if self._staging is not None:
            self._fold_staged()  # the previous update's copy: it has long landed
            self._pending = self._weight()
            if self._pending is not None:
                self._staging.save(tensors)  # asynchronous: folded at the next update or read
            return
        if self._stream is None:
            self._fold_model(tensors)
            return
        # The side stream starts from the weights as the optimizer left them on the main stream,
        # and computes the weight itself, so that nothing it reads is freed under it.
        self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
        with torch.cuda.stream(self._stream):
            self._fold_model(tensors)
            self._done = torch.cuda.Event()
            self._done.record(self._stream)

    def _fold_model(self, tensors: list[Tensor], weight: Tensor | float | None = None) -> None:
        """Fold `tensors` (the model's, or copies of them) into the average with this call's
        weight, or `weight` when it was worked out already."""
        weight = self._weight() if weight is None else weight
        if weight is None:
            return
        groups = self._groups(tensors)
        if self.check_finite:
            # Weight 0 leaves the average exactly as it was (the ops guarantee it even for inf/NaN
            # sources), so a non-finite update is skipped on the device, without a sync.
            finite = self._all_finite([src for _, src in groups])
            # (a float weight stays a CPU scalar: copying it to the GPU would wait for the stream)
            weight = torch.where(finite, torch.as_tensor(weight, dtype=torch.float64), 0.0)
        for k, (avg, src) in enumerate(groups):
            w = weight
            if isinstance(w, Tensor) and w.device not in (avg[0].device, _CPU):  # a multi-device model
                w = w.to(avg[0].device, non_blocking=True)
            self._fold(k, avg, src, w)
        integers = self.tracked.split(tensors)[1]
        if self.check_finite:
            integers = [torch.where(finite, live, kept) for kept, live in zip(self._integers, integers)]
        copy_lists(self._integers, integers)  # one call for every num_batches_tracked
        if self.check_finite:
            self._n_averaged += finite
            self.n_skipped += ~finite
        else:
            self._n_host += 1
        self.folds += 1

    def _stage_through(self, tensors: list[Tensor], pin_memory: bool) -> None:
        """Update through a copy of the model on the average's device (see the class docstring)."""
        device = self.average.groups[0].device if self.average.groups else _CPU
        self._staging = ModelCopy(self.tracked, tensors, device=device, pin_memory=pin_memory)

    def _fold_staged(self) -> None:
        if self._pending is not None:
            self._staging.wait()
            weight, self._pending = self._pending, None
            self._fold_model(self._staging.stored(), weight)

    def _side_stream(self, model: Module, device: torch.device) -> torch.cuda.Stream:
        if device.type != "cuda":
            raise ValueError(f"swa_fast: side_stream=True needs a model on a CUDA GPU, it is on {device}")
        self._done: torch.cuda.Event | None = None
        me = weakref.ref(self)

        def join(*_args) -> None:
            if (manager := me()) is not None:
                manager.wait()

        hooks = [torch.optim.optimizer.register_optimizer_step_pre_hook(join)]
        if self.use_buffers:  # a training forward updates BatchNorm statistics in place
            hooks.append(model.register_forward_pre_hook(join))
        weakref.finalize(self, lambda: [h.remove() for h in hooks])
        return torch.cuda.Stream(device)

    def wait(self) -> None:
        """Make what follows wait for the update in flight: on the GPU for a side-stream update
        (no host sync), on the host for a CPU-placed average (folds it)."""
        if self._stream is not None and self._done is not None:
            torch.cuda.current_stream(self._stream.device).wait_event(self._done)
            self._done = None
        if self._staging is not None:
            self._fold_staged()

    def _fold(self, group: int, avg: list[Tensor], src: list[Tensor], weight: Tensor | float) -> None:
        """Fold one flat group's model tensors into its average views."""
        ops.lerp_(avg, src, weight, backend=self.backend)

    def _all_finite(self, sources: list[list[Tensor]]) -> Tensor:
        """One device boolean: every element of every source is finite (max-abs norms propagate
        inf and NaN, and cannot overflow)."""
        device = self._n_averaged.device
        with torch.no_grad():  # the model's parameters require grad: record no graph
            maxima = [
                n.to(device, torch.float32) for src in sources for n in torch._foreach_norm(src, float("inf"))
            ]
            return torch.stack(maxima).isfinite().all()

    # --- using the average --------------------------------------------------------------------------

    def copy_to(self, model: Module) -> None:
        """Write the average into the model (cast to the model's dtypes), one fused copy per group."""
        self._ready("copy_to")
        self._copy.load(self.tracked.tensors(model))

    @torch.no_grad()
    def swap(self, model: Module) -> None:
        """Exchange the model's weights and the average in place (same dtypes only: an fp32 average
        of a bf16 model cannot hold the live weights exactly; use `average_applied`)."""
        self._ready("swap")
        if self._staging is not None:
            raise ValueError(
                "swa_fast: swap exchanges the weights in place, so it needs the average on the model's "
                "device; this one is kept on another (device=). Use average_applied(model) instead."
            )
        tensors = self.tracked.tensors(model)
        self.tracked.before_write()
        for avg, live in self._groups(tensors):
            ops.swap_(avg, live, backend=self.backend)

    @contextlib.contextmanager
    def average_applied(self, model: Module) -> Iterator[Module]:
        """Within the block the model holds the average; on exit its own weights come back exactly."""
        self._ready("average_applied")
        tensors = self.tracked.tensors(model)
        live = ModelCopy(self.tracked, tensors, backend=self.backend)  # in the model's dtypes: exact
        self.copy_to(model)
        try:
            yield model
        finally:
            live.load(tensors)

    def _ready(self, what: str) -> None:
        """Before reading the average: it must be here, and an update in flight must be in it."""
        if not self.holds_average:
            raise ValueError(
                f"swa_fast.{type(self).__name__}.{what}: with rank0_only=True the average lives on rank 0 "
                "only, and this process is another rank; call it on rank 0"
            )
        self.wait()

    # --- saving and resuming ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The average as views of its flat buffers (no copy; DCP loads into them in place) and the
        counts as they are now: save it before the next `update`, which changes the former only."""
        if not self.holds_average:  # rank0_only: nothing here to save (DCP saves rank 0's state)
            return {}
        self.wait()
        return {
            "average": self._copy.named(),
            "n_averaged": self.n_averaged,
            "n_skipped": self.n_skipped,
            "calls": self.calls,
            "folds": self.folds,
            **self._extra_state(),
        }

    def _extra_state(self) -> dict:
        return {}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict of the same model; resuming continues bit for bit. Checks everything
        before writing anything: a state of another model raises and names the first mismatch.
        Under rank0_only, ranks other than 0 hold nothing and ignore it."""
        if not self.holds_average:
            return
        self.wait()
        missing = [k for k in ("average", "n_averaged", "calls") if k not in state]
        if missing:
            raise ValueError(f"swa_fast: not a {type(self).__name__} state_dict: missing {missing}")
        checked = self._check_extra_state(state)
        self._copy.load_named(state["average"])
        self._n_averaged.copy_(state["n_averaged"])
        if not self.check_finite:
            self._n_host = self._n_written = int(self._n_averaged)  # read once here
        self.n_skipped.copy_(state.get("n_skipped", 0))
        self.calls = int(state["calls"])
        self.folds = int(state.get("folds", self.calls))
        self._load_extra_state(checked)

    def _check_extra_state(self, state: dict) -> Any:
        """Raise unless the subclass's part of `state` fits (before anything is written); return
        what `_load_extra_state` then writes (this rank's parts of it)."""

    def _load_extra_state(self, checked: Any) -> None:
        pass


class SWA(Averager):
    """Stochastic Weight Averaging: the equal-weight mean of every model passed to `update`.

    The weight 1/(n+1) is a host number, new at every update (with `check_finite`, a device
    tensor), so a CUDA graph that captured an `update` would replay a stale weight: capture the
    ops (`swa_fast.lerp_` with a device weight) instead."""

    def _weight(self) -> Tensor | float:
        # 1 first: an exact copy. A float is passed to the kernels by value, with no device op.
        if self._n_host is not None:
            return 1.0 / (self._n_host + 1)
        return torch.reciprocal(self._n_averaged.to(torch.float64) + 1)


class EMA(Averager):
    """Exponential moving average: avg = decay_t * avg + (1 - decay_t) * model.

    `warmup_gamma`/`warmup_power` (timm's ModelEmaV3): decay_t = min(decay, 1 - (1 + t/gamma)^-power)
    for the t-th averaging update, so early averages follow the model closely. The first `update`
    calls up to `update_after_step` copy the model; after that only every `update_every`-th call
    averages.
    """

    def __init__(
        self,
        model: Module,
        decay: float = 0.999,
        *,
        warmup_gamma: float | None = None,
        warmup_power: float = 2 / 3,
        update_after_step: int = 0,
        update_every: int = 1,
        **kwargs,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"swa_fast.EMA: decay must be in [0, 1], got {decay}")
        if update_every < 1:
            raise ValueError(f"swa_fast.EMA: update_every must be >= 1, got {update_every}")
        super().__init__(model, **kwargs)
        self.decay = decay
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.update_after_step = update_after_step
        self.update_every = update_every

    def decay_at(self, call: int) -> float:
        """decay_t at the `call`-th update() call (from 1), timm's ModelEmaV3.get_decay: 0 (a copy
        of the model) up to `update_after_step` + 1, then `decay`, or its warmup."""
        t = call - self.update_after_step - 1
        if t <= 0:
            return 0.0
        if self.warmup_gamma is None:
            return self.decay
        return min(self.decay, 1 - (1 + t / self.warmup_gamma) ** -self.warmup_power)

    def _weight(self) -> float | None:
        # A host-side schedule of host-side counts: a Python float weight, read by the kernels on
        # the host, costs no device synchronisation.
        if (
            self.calls > self.update_after_step + 1
            and (self.calls - self.update_after_step - 1) % self.update_every
        ):
            return None
        return 1.0 - self.decay_at(self.calls)

    def _extra_state(self) -> dict:
        return {"decay": self.decay}

    def _check_extra_state(self, state: dict) -> None:
        if state.get("decay", self.decay) != self.decay:
            raise ValueError(
                f"swa_fast.EMA: the state_dict has decay {state['decay']}, this one {self.decay}"
            )


class SWAG(SWA):
    """SWA-Gaussian (Maddox et al., "A Simple Baseline for Bayesian Uncertainty in Deep Learning",
    2019): a Gaussian over the weights with the SWA mean, a diagonal covariance from the running
    second moment, and a low-rank part from the last `max_rank` deviations:

        mean  += (w - mean) / (n + 1);   sq += (w^2 - sq) / (n + 1)     (one fused `moments_` pass)
        D[(n mod K)] = w - mean                                        (a ring of K rows, one flat
                                                                         tensor, no concatenation)
        sample = mean + sqrt(scale) * (sqrt(max(sq - mean^2, 1e-30)) * z1 + D^T z2 / sqrt(K - 1))

    with z1, z2 standard normal and K the rows collected so far. `scale=0.5` is the paper's
    sample (its 1/sqrt(2) factors); `diag_only=True` drops the low-rank part (SWAG-Diagonal).
    It is an SWA whose `average` holds the mean (the SWA solution), so `copy_to` /
    `average_applied` apply that.
    Other keywords (`rank0_only`, `device`, `side_stream`, `backend`) are the Averager's.
    """

    def __init__(
        self,
        model: Module,
        max_rank: int = 20,
        *,
        dtype: torch.dtype | None = torch.float32,
        use_buffers: bool = False,
        **options,
    ) -> None:
        if max_rank < 0:
            raise ValueError(f"swa_fast.SWAG: max_rank must be >= 0, got {max_rank}")
        if options.get("check_finite"):
            # A skipped update would still write its (non-finite) deviation row.
            raise ValueError("swa_fast.SWAG: check_finite is not supported (SWA and EMA have it)")
        super().__init__(model, dtype=dtype, use_buffers=use_buffers, **options)
        self.max_rank = max_rank
        self.sq = FlatBuffer(self.average.views)  # the first update overwrites it exactly
        # One (max_rank, group length) matrix per flat group, written a row per update.
        self.deviations = [g.buffer.new_zeros(max_rank, g.buffer.numel()) for g in self.average.groups]

    @property
    def rank(self) -> int:
        """Deviation rows collected so far (at most max_rank)."""
        return min(self.folds, self.max_rank)

    def _fold(self, group: int, avg: list[Tensor], src: list[Tensor], weight: Tensor | float) -> None:
        g = self.average.groups[group]
        ops.moments_(avg, self.sq.group_views(group), src, weight, backend=self.backend)
        if self.max_rank:
            row = self.deviations[group][self.folds % self.max_rank]  # folds: this one not yet counted
            ops.copy_(self.average.views_of(g, row), src, backend=self.backend)
            row.sub_(g.buffer)  # the deviation from the updated mean, as in the paper

    def variance(self) -> list[Tensor]:
        """The diagonal variance sq - mean^2 (clamped at 1e-30), a tensor per averaged tensor."""
        self._ready("variance")
        return [(q - m * m).clamp_min_(1e-30) for m, q in zip(self.average.views, self.sq.views)]

    @torch.no_grad()
    def sample(
        self,
        model: Module,
        scale: float = 0.5,
        diag_only: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        """Draw weights from the SWAG Gaussian into `model`, on the average's device, with one fused
        copy per group. Recompute BatchNorm statistics afterwards (`swa_fast.update_bn`)."""
        self._ready("sample")
        if self.folds == 0:
            raise ValueError("swa_fast.SWAG: no model has been collected yet; call update() first")
        if not diag_only and self.rank < 2:
            raise ValueError(
                f"swa_fast.SWAG: the low-rank part needs at least 2 collected models, there are "
                f"{self.rank} (max_rank={self.max_rank}); collect more or pass diag_only=True"
            )
        tensors = self.tracked.tensors(model)
        floating, integer = self.tracked.split(tensors)
        # The low-rank noise multiplies whole deviation vectors: one draw for every flat group and,
        # under FSDP2, every rank's shards (the first rank's is sent to the others).
        if not diag_only:
            first = self.deviations[0]
            shared = self._normal(self.rank, first, generator)
            shared = distributed.shared_draw(shared, self.tracked.layouts)
        for k, (g, _, dst) in enumerate(self.average.pairs(floating)):
            sq = self.sq.groups[k].buffer
            drawn = torch.addcmul(sq, g.buffer, g.buffer, value=-1).clamp_min_(1e-30).sqrt_()
            drawn.mul_(self._normal(drawn.numel(), drawn, generator))
            if not diag_only:
                rows = self.deviations[k][: self.rank]
                drawn.addmv_(rows.t(), shared.to(rows.device), alpha=(self.rank - 1) ** -0.5)
            drawn.mul_(scale**0.5).add_(g.buffer)
            ops.copy_(dst, self.average.views_of(g, drawn), backend=self.backend)
        copy_lists(integer, self._integers)

    @staticmethod
    def _normal(n: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
        """n standard normal numbers for `like`'s device, drawn where `generator` lives (a CPU
        generator serves a GPU model too, at the cost of a copy)."""
        device = generator.device if generator is not None else like.device
        return torch.randn(n, dtype=like.dtype, device=device, generator=generator).to(like.device)

    def predict(self, model: Module, inputs: Any, **kwargs) -> Tensor:
        """Bayesian model average on one batch: see `predict_loader`."""
        return self.predict_loader(model, [inputs], **kwargs)

    def predict_loader(
        self,
        model: Module,
        loader: Iterable[Any],
        n_samples: int = 30,
        scale: float = 0.5,
        diag_only: bool = False,
        bn_loader: Iterable[Any] | None = None,
        forward_fn: Callable[[Module, Any], Tensor] | None = None,
        output: str = "probs",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The mean over `n_samples` SWAG samples of the model's softmax probabilities (or logits)
        on every batch of `loader` (which must give the same batches each pass), concatenated.
        With `bn_loader`, BatchNorm statistics are recomputed for every sample (as the paper
        does). The model's own weights, buffers and mode are restored exactly afterwards."""
        if n_samples < 1:
            raise ValueError(f"swa_fast.SWAG: n_samples must be >= 1, got {n_samples}")

        def samples() -> Iterator[None]:
            for _ in range(n_samples):
                self.sample(model, scale, diag_only, generator)
                if bn_loader is not None:
                    update_bn(bn_loader, model, forward_fn=forward_fn)
                yield

        return ensemble_predict(model, samples(), loader, output, forward_fn)

    def _deviation_views(self) -> dict[str, Tensor]:
        """name -> its (max_rank, *shape) columns of the deviation matrices."""
        out: list[Tensor] = [torch.empty(0)] * len(self.average)
        for g, rows in zip(self.average.groups, self.deviations):
            columns = rows.split([self.average.views[i].numel() for i in g.indices], dim=1)
            for i, part in zip(g.indices, columns):
                out[i] = part.view(self.max_rank, *self.average.views[i].shape)
        return dict(zip(self.tracked.floating_names, out))

    def _extra_state(self) -> dict:
        return {
            "sq": self.tracked.shard_state(dict(zip(self.tracked.floating_names, self.sq.views))),
            "deviation": self.tracked.shard_state(self._deviation_views(), lead=(self.max_rank,)),
            "max_rank": self.max_rank,
        }

    def _check_extra_state(self, state: dict) -> tuple[dict, dict]:
        if state.get("max_rank") != self.max_rank or "sq" not in state or "deviation" not in state:
            raise ValueError(
                f"swa_fast.SWAG: expected a SWAG state_dict with max_rank {self.max_rank}, got one with "
                f"max_rank {state.get('max_rank')} and keys {sorted(state)}"
            )
        names = self.tracked.floating_names
        return (
            self.tracked.local_state(state["sq"], names),
            self.tracked.local_state(state["deviation"], names, lead=(self.max_rank,)),
        )

    def _load_extra_state(self, checked: tuple[dict, dict]) -> None:
        sq_parts, deviation_parts = checked
        for name, sq in zip(self.tracked.floating_names, self.sq.views):
            sq.copy_(sq_parts[name])
        for name, columns in self._deviation_views().items():
            columns.copy_(deviation_parts[name])
