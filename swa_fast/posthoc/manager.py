"""Post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
EDM2, CVPR 2024): power-function EMAs of several lengths tracked at once, saved as snapshots during
training, from which an EMA of any length is reconstructed after training.

    ema = swa_fast.PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=1000, snapshot_dir="phema")
    ...
    ema.update(model)                         # every K averages in one fused multi_lerp_ per group
    ...
    ema.flush()                               # the snapshots still being written, written
    swa_fast.posthoc.synthesize("phema", model, sigma_rel=0.07)    # any length, after training

A power-function EMA at progress T (updates, or images/tokens when the caller counts them) gives
the model at progress t the weight p(t) = (gamma + 1) t^gamma / T^(gamma + 1) on [0, T]; its width
relative to T is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))). The update that
keeps it is avg += (1 - beta) (model - avg) with beta = (1 - delta / t) ** (gamma + 1), t the
progress after this update and delta the progress since the last one: updates at progress
t_1 < ... < t_n give the model of the i-th one the weight (t_i^(g+1) - t_(i-1)^(g+1)) / T^(g+1),
the continuous profile integrated over its stretch, however far apart the updates are.

A snapshot holds every tracked average, so each is the integral of its profile against the
trajectory; a profile that is a linear combination of the snapshots' profiles is reconstructed
exactly by the same combination of the snapshots. `synthesize` finds the combination closest to
the requested profile in L2 (EDM2's least squares, over the closed-form inner products of power
functions), then streams the snapshots through a float32 accumulator (float64 for float64
snapshots) into the model.

The profiles' math is in profiles.py (the power-function weights live there rather than in
weighting.py: they need the progress since the last update, which none of weighting.py's rules
take), the snapshot files and their writer in snapshots.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import uuid
import warnings
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import Module

from .. import distributed
from ..averaging import Averager
from ..flat import _shaped_parts, copy_into_strided, copy_lists
from ..model_tensors import ModelCopy, TrackedModel
from ..ops import checks
from ..weighting import count, real_number
from .profiles import (
    SIGMA_REL_MAX,
    Reconstruction,
    sigma_rel_to_gamma,
    solve_coefficients,
    update_weight,
)
from .snapshots import (
    HostSnapshot,
    Snapshot,
    SnapshotWriter,
    describe_run,
    list_snapshots,
    load_snapshot,
    named_averages,
    snapshot_path,
    snapshot_runs,
    stop_writer,
)

# --- the manager ------------------------------------------------------------------------------------


class PostHocEMA(Averager):
    """Power-function EMAs of every `sigma_rels` (EDM2), updated together by one fused
    `swa_fast.multi_lerp_` per flat group, with snapshots from which any other sigma_rel is
    reconstructed after training (`synthesize`).

    Each update weighs the model by 1 - (1 - delta / t) ** (gamma + 1), t being the progress after
    it and delta the progress since the last update: by default one unit per update (so updating
    every k optimizer steps gives the same profile, in steps, as updating every step), or the
    caller's own count of images or tokens passed as `update(model, progress=...)`.

    Snapshots (every `snapshot_every` updates, into `snapshot_dir`, and of the final state at
    `flush()` / `close()`) hold every tracked average, its sigma_rel and gamma, the update count
    (`step`), the progress and the training run (`run_id`). The averages are copied to host memory
    (pinned, on a side stream, from a GPU; by one fused copy on the CPU) and written by a background
    thread, each file under a temporary name renamed when whole. A write that fails is raised once,
    by the next `update`, `snapshot`, `flush` or `synthesize`; later snapshots are written as usual.
    Under DDP rank 0 writes them (every rank holds the same averages).

    A snapshot directory belongs to one training run: a new manager refuses, at its first update, a
    directory holding another run's snapshots; one resumed by `load_state_dict` continues its own.
    A refused update changes nothing (progress, counts, averages), so it can be retried.

    Args:
        model: the model to average.
        sigma_rels: the profiles to track, each a real number in (0, SIGMA_REL_MAX ~ 0.3003), distinct
            (EDM2 tracks 0.05 and 0.10).
        snapshot_every: write a snapshot every this many updates (None: never).
        snapshot_dir: where (created if missing); needed with `snapshot_every`. One training run per
            directory: a resumed run (`load_state_dict`) continues the series there.
        snapshot_dtype: the snapshots' dtype (default fp16 as EDM2; None: the average's own). A group
            of averages holding a value beyond its range is saved in the average's own dtype in the
            snapshots that need it, with a warning naming the tensor.
        **options: the `Averager`'s dtype, use_buffers, rank0_only, device, side_stream, backend,
            rounding, seed and stats (`last_stats()` has a row per profile, "sigma_rel=<value>")
            (check_finite is refused: it would skip the update's weights but not its progress).
    """

    def __init__(
        self,
        model: Module,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        *,
        snapshot_every: int | None = None,
        snapshot_dir: str | os.PathLike | None = None,
        snapshot_dtype: torch.dtype | None = torch.float16,
        **options,
    ) -> None:
        if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence) or not sigma_rels:
            raise ValueError(
                f"swa_fast.PostHocEMA: sigma_rels must be a non-empty sequence of real numbers in "
                f"(0, {SIGMA_REL_MAX:.4f}), got {sigma_rels!r}"
            )
        sigma_rels = tuple(
            real_number(s, "PostHocEMA: each of sigma_rels", 0.0, SIGMA_REL_MAX, above_low=True)
            for s in sigma_rels
        )
        if len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"swa_fast.PostHocEMA: sigma_rels must be distinct, got {sigma_rels}")
        snapshot_every = count(snapshot_every, "PostHocEMA: snapshot_every", 1, allow_none=True)
        if (snapshot_every is None) != (snapshot_dir is None):
            raise ValueError(
                "swa_fast.PostHocEMA: snapshot_every and snapshot_dir go together (got snapshot_every="
                f"{snapshot_every!r}, snapshot_dir={snapshot_dir!r})"
            )
        if snapshot_dtype is not None and snapshot_dtype not in checks.FLOAT_DTYPES:
            raise ValueError(
                "swa_fast.PostHocEMA: snapshot_dtype must be torch.float32, float64, float16, bfloat16 or "
                f"None (the average's own), got {snapshot_dtype}"
            )
        if options.get("check_finite"):
            raise ValueError("swa_fast.PostHocEMA: check_finite is not supported (SWA and EMA have it)")
        super().__init__(model, **options)
        if self.tracked.sharded and snapshot_every is not None:
            raise ValueError(
                "swa_fast.PostHocEMA: snapshots of a sharded (FSDP2, DeepSpeed ZeRO) model are not "
                "supported: each rank holds only its shards"
            )
        self.sigma_rels = sigma_rels
        self._stats.rows = tuple(f"sigma_rel={s}" for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in sigma_rels)
        self.snapshot_every = None if snapshot_every is None else int(snapshot_every)
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self.snapshot_dtype = snapshot_dtype
        # Under DDP every rank holds the same averages: rank 0 writes them.
        self._writes_snapshots = self.holds_average and distributed.rank_in(model) == 0
        if self.snapshot_dir is not None and self._writes_snapshots:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        # Profile 0 is the Averager's own copy; the others are laid out alike (same groups), and
        # share its integer buffers, so that any of them loads into the model as a ModelCopy.
        self._profiles = [self._copy]
        pinned = (
            self.holds_average and bool(self.average.groups) and self.average.groups[0].buffer.is_pinned()
        )
        for _ in sigma_rels[1:]:
            copy = ModelCopy(self.tracked, self._copy.stored(), pin_memory=pinned, backend=self.backend)
            copy.integers = self._copy.integers
            self._profiles.append(copy)
        self._plan = self._new_plan()  # over the K profiles
        self.progress = 0.0  # t after the last update
        self.progress_given: bool | None = None  # whether update() is given progress (fixed by the first)
        self._weights: list[float] = []
        self._writer: SnapshotWriter | None = None
        self._stop_writer: weakref.finalize | None = None
        self._host: HostSnapshot | None = None
        self._copied: list = []  # CUDA events of the last snapshot's host copy
        self.run_id: str | None = uuid.uuid4().hex  # this training run, recorded in its snapshots
        self._claimed = False  # whether snapshot_dir was checked to hold no other run's snapshots
        self._snapshot_step: int | None = None  # the step of the last snapshot taken
        self._warned_beyond: set[str] = set()  # the tensors said to be beyond snapshot_dtype's range

    # --- updates --------------------------------------------------------------------------------------

    def update(self, model: Module, progress: float | None = None) -> None:
        """Update every tracked average with the model's current weights; write a snapshot when one
        is due. `progress`: the training progress so far (images, tokens: any count that grows), on
        every call or never; without it each update counts one."""
        self._step(super().update, model, progress)

    def update_from(self, tensors: list[Tensor], progress: float | None = None) -> None:
        """`update` from tensors laid out as the model's (see Averager.update_from)."""
        self._step(super().update_from, tensors, progress)

    def _step(self, write: Callable, source: object, progress: float | None) -> None:
        """One update by `write(source)` (the Averager's update or update_from), with every check
        that can refuse it (a failed snapshot write, the progress, the directory) made first."""
        self._report_write_failures("this update was not applied: call it again to go on")
        new_progress, given = self._next_progress(progress)
        self._claim_directory()
        self._weights = [update_weight(g, self.progress, new_progress) for g in self.gammas]
        # A snapshot's copy from the GPU reads the averages: the update waits for it there.
        for event in self._copied:
            torch.cuda.current_stream(event.device).wait_event(event)
        self._copied = []
        calls = self._calls
        try:
            write(source)
        finally:
            # The Averager takes the call back when the update was refused (nothing written) and
            # keeps it otherwise, an interrupt included: the progress goes with it.
            if self._calls != calls:
                self.progress, self.progress_given = new_progress, given
        self._snapshot_if_due()

    def _next_progress(self, progress: float | None) -> tuple[float, bool]:
        """The progress after this update, and whether it was given, checked (nothing changes)."""
        given = progress is not None
        if self.progress_given is not None and given != self.progress_given:
            raise ValueError(
                "swa_fast.PostHocEMA.update: pass progress= on every update or on none; "
                + ("the earlier ones had it" if self.progress_given else "the earlier ones did not")
            )
        if given:
            return real_number(progress, "PostHocEMA.update: progress", self.progress, above_low=True), True
        return self.progress + 1, False

    def _update_weight(self) -> list[float]:
        return self._weights

    _OP = "multi_lerp_"
    _ADDS_COPIES = True

    def _plan_targets(self) -> list[list[Tensor]]:
        """multi_lerp_'s K lists: every profile's stored tensors (they share the integer buffers)."""
        return [p.stored() for p in self._profiles]

    # --- snapshots -----------------------------------------------------------------------------------

    def _claim_directory(self) -> None:
        """Refuse, before this manager writes anything there, a snapshot directory that holds
        snapshots of another training run (checked once; again after load_state_dict)."""
        if self._claimed or self.snapshot_dir is None or not self._writes_snapshots:
            return
        if not self.snapshot_dir.is_dir():  # gone: it holds nothing (the write reports it missing)
            return
        others = {step: run for step, run in snapshot_runs(self.snapshot_dir).items() if run != self.run_id}
        if others:
            steps = sorted(others)
            raise ValueError(
                f"swa_fast.PostHocEMA: {str(self.snapshot_dir)!r} holds {len(steps)} snapshots of another "
                f"training run ({describe_run(others[steps[0]])}, steps {steps[0]} to {steps[-1]}), which "
                "this one would overwrite and mix with: a snapshot directory belongs to one run. Give this "
                "run a new snapshot_dir, or, to continue that run, resume it with load_state_dict(its "
                "state_dict) before the first update"
            )
        self._claimed = True

    def _snapshot_if_due(self) -> None:
        if (
            self.snapshot_every is not None
            and self._writes_snapshots
            and self.calls % self.snapshot_every == 0
        ):
            self._take_snapshot()

    def snapshot(self) -> Path | None:
        """Write a snapshot of every tracked average now (in the background), named by the update
        count; its path, or None where this process writes none (ranks other than 0)."""
        if self.snapshot_dir is None:
            raise ValueError("swa_fast.PostHocEMA.snapshot: this one was made without snapshot_dir")
        if not self._writes_snapshots:
            return None
        if self.calls == 0:
            raise ValueError(
                "swa_fast.PostHocEMA.snapshot: nothing to snapshot before the first update (its averages "
                "hold no model yet: a snapshot at progress 0 has no profile to combine)"
            )
        self._report_write_failures("no snapshot was taken now: call snapshot() again")
        return self._take_snapshot()

    def _take_snapshot(self) -> Path:
        """Copy every tracked average to host memory and queue its file, named by the update count."""
        self._claim_directory()
        if self._writer is None:
            self._writer = SnapshotWriter()
            self._stop_writer = weakref.finalize(self, stop_writer, self._writer.jobs, self._writer.thread)
        self.wait()  # an update in flight lands in the averages first
        if self._host is None:
            self._host = HostSnapshot(self, self.snapshot_dtype)
        wide = self._groups_beyond_snapshot_dtype()
        self._writer.free.wait()  # the last snapshot is out of the host buffer
        sources = [g.buffer for p in self._profiles for g in p.flat.groups]
        self._copied = self._host.copy_from(sources, self._integers, self.backend, wide)
        path = snapshot_path(self.snapshot_dir, self.calls)
        snapshot = self._host.snapshot_at(self.calls, self.progress, self.run_id)
        self._writer.submit(path, snapshot, list(self._copied))
        self._snapshot_step = self.calls
        return path

    def _groups_beyond_snapshot_dtype(self) -> set[int]:
        """The flat groups whose averages hold a value beyond the snapshot dtype's range (a BatchNorm
        running_var past float16's 65504): this snapshot keeps them in the average's own dtype
        rather than store inf. One max-abs per group and profile, read on the host."""
        dtype = self.snapshot_dtype
        groups = self.average.groups
        limit = math.inf if dtype is None else torch.finfo(dtype).max
        narrowed = [
            g
            for g, group in enumerate(groups)
            if limit < torch.finfo(group.dtype).max and group.buffer.numel()
        ]
        if not narrowed:
            return set()
        buffers = [p.flat.groups[g].buffer for g in narrowed for p in self._profiles]
        largest = [float(norm) for norm in torch._foreach_norm(buffers, math.inf)]
        wide = {narrowed[i // len(self._profiles)] for i, value in enumerate(largest) if value > limit}
        for g in sorted(wide):
            self._warn_beyond(g, limit)
        return wide

    def _warn_beyond(self, group: int, limit: float) -> None:
        """Say, once per tensor, which tensors of `group` are beyond the snapshot dtype's range."""
        own = self.average.groups[group].dtype
        for i in self.average.groups[group].indices:
            name = self.tracked.floating_names[i]
            views = [p.flat.views[i] for p in self._profiles if p.flat.views[i].numel()]
            largest = max((float(v.abs().max()) for v in views), default=0.0)
            if largest > limit and name not in self._warned_beyond:
                self._warned_beyond.add(name)
                warnings.warn(
                    f"swa_fast.PostHocEMA: '{name}' reaches {largest:.2g}, beyond {self.snapshot_dtype}'s "
                    f"range ({limit:.5g}): its group of averages is saved in {own} in the snapshots that "
                    "need it",
                    stacklevel=2,
                )

    def flush(self) -> None:
        """Snapshot the final state (the last update, unless its snapshot was taken already) and
        wait until every snapshot is on disk; raise, once, a write that failed."""
        if self.snapshot_dir is None or not self._writes_snapshots:
            return
        if self.calls and self._snapshot_step != self.calls:
            self._take_snapshot()
        self._wait_for_writes()
        self._report_write_failures("every other snapshot taken so far is on disk")

    def close(self) -> None:
        """`flush()`, then stop the writer's thread (a later snapshot starts another)."""
        try:
            self.flush()
        finally:
            if self._stop_writer is not None:
                self._stop_writer()  # (once: writes what is pending, joins the thread)
            self._writer = self._stop_writer = None

    def _wait_for_writes(self) -> None:
        """Until every snapshot taken so far is written or has failed (reported later)."""
        if self._writer is not None:
            self._writer.wait()

    def _report_write_failures(self, outcome: str) -> None:
        """Raise, once, the snapshot writes that failed since the last report; `outcome` says what
        became of the call that raises it."""
        failures = self._writer.take_failures() if self._writer is not None else []
        if not failures:
            return
        if any(f.step == self._snapshot_step for f in failures):
            self._snapshot_step = None  # so that flush() takes the final state's snapshot again
        first, later = failures[0], [f.step for f in failures[1:]]
        raise RuntimeError(
            f"swa_fast.PostHocEMA: writing the snapshot {str(first.path)!r} failed: {first.error!r}"
            + (f" (and those of steps {later})" if later else "")
            + f". That snapshot is lost; {outcome}. Later snapshots are written as usual; once the cause "
            "is fixed, snapshot() saves the current state now"
        ) from first.error

    def synthesize(self, model: Module, sigma_rel: float, step: int | None = None) -> Reconstruction:
        """`swa_fast.posthoc.synthesize` over this manager's snapshots, after `flush()` (so by
        default at the last update)."""
        if self.snapshot_dir is None:
            raise ValueError("swa_fast.PostHocEMA.synthesize: this one was made without snapshot_dir")
        self.flush()
        return synthesize(self.snapshot_dir, model, sigma_rel, step)

    # --- reading a tracked average --------------------------------------------------------------------

    def _profile_index(self, sigma_rel: float | None, what: str) -> int:
        if sigma_rel is None:
            if len(self.sigma_rels) == 1:
                return 0
            raise ValueError(
                f"swa_fast.PostHocEMA.{what}: pass sigma_rel=, one of the tracked {self.sigma_rels}"
            )
        value = real_number(sigma_rel, f"PostHocEMA.{what}: sigma_rel")
        for k, tracked in enumerate(self.sigma_rels):
            if math.isclose(value, tracked, rel_tol=1e-9):
                return k
        raise ValueError(
            f"swa_fast.PostHocEMA.{what}: sigma_rel {value} is not tracked (tracked: {self.sigma_rels}); "
            "other profiles come from the snapshots: synthesize()"
        )

    def copy_to(self, model: Module, sigma_rel: float | None = None) -> None:
        """Write the tracked average of `sigma_rel` into the model (see Averager.copy_to)."""
        self._copy_to(model, self._profiles[self._profile_index(sigma_rel, "copy_to")])

    def swap(self, model: Module, sigma_rel: float | None = None) -> None:
        """Exchange the model's weights and the tracked average of `sigma_rel` (see Averager.swap)."""
        self._swap(model, self._profiles[self._profile_index(sigma_rel, "swap")])

    def average_applied(
        self, model: Module, sigma_rel: float | None = None
    ) -> AbstractContextManager[Module]:
        """The tracked average of `sigma_rel` in the model within the block (see
        Averager.average_applied)."""
        return self._average_applied(model, self._profiles[self._profile_index(sigma_rel, "average_applied")])

    # --- saving and resuming --------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        self._wait_for_writes()  # (a failed one stays to be reported by this manager)
        state = super().__getstate__()
        state.update(_writer=None, _stop_writer=None, _host=None, _copied=[])
        return state

    def _extra_state(self) -> dict:
        return {
            "sigma_rels": list(self.sigma_rels),
            "progress": self.progress,
            "progress_given": self.progress_given,
            "averages": [p.named() for p in self._profiles],
            "run": self.run_id,
        }

    def _check_extra_state(self, state: dict) -> float:
        saved = state.get("sigma_rels")
        if saved is None or [float(s) for s in saved] != list(self.sigma_rels):
            raise ValueError(
                f"swa_fast.PostHocEMA: expected a PostHocEMA state_dict with sigma_rels "
                f"{list(self.sigma_rels)}, got one with {saved}"
            )
        averages = state.get("averages")
        if not isinstance(averages, (list, tuple)) or len(averages) != len(self._profiles):
            raise ValueError(
                f"swa_fast.PostHocEMA: the state_dict's 'averages' must list {len(self._profiles)} averages"
            )
        for named in averages:
            self.tracked.local_state(named)
        return (*self._checked_progress_and_run(state), averages)

    @staticmethod
    def _checked_progress_and_run(state: dict) -> tuple:
        if "progress_given" not in state or state["progress_given"] not in (None, True, False):
            raise ValueError(
                "swa_fast.PostHocEMA: 'progress_given' must be None or a bool, got "
                f"{state.get('progress_given')!r}"
            )
        progress = real_number(state.get("progress"), "PostHocEMA.load_state_dict: progress", 0.0)
        run = state.get("run")  # absent from the state_dicts of a swa_fast before runs were recorded
        if run is not None and not isinstance(run, str):
            raise ValueError(f"swa_fast.PostHocEMA: 'run' must be a string or None, got {run!r}")
        return progress, state["progress_given"], run

    def _load_extra_state(self, checked: tuple) -> None:
        self.progress, self.progress_given, self.run_id, averages = checked
        for profile, named in zip(self._profiles[1:], averages[1:]):  # the first is `average`
            profile.load_named(named)
        self._claimed, self._snapshot_step = False, None

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict of the same model and sigma_rels; resuming continues bit for bit, as
        the same training run, and the snapshot series where it left off."""
        self._wait_for_writes()
        super().load_state_dict(state)


# --- synthesis --------------------------------------------------------------------------------------


@torch.no_grad()
def synthesize(
    snapshot_dir: str | os.PathLike,
    model: Module,
    sigma_rel: float,
    step: int | None = None,
    *,
    backend: str | None = None,
) -> Reconstruction:
    """Write into `model` the power-function EMA of relative width `sigma_rel` at the snapshot of
    `step` (default: the last), reconstructed from the snapshots in `snapshot_dir` up to it by
    EDM2's least squares (see `solve_coefficients`). The snapshots, all of one training run and one
    model, with progress growing with the step, are read one at a time (memory mapped) into an
    accumulator per group, float32 or float64 (the widest of the snapshots' dtypes): the model, one
    snapshot and the accumulators are all it holds. Values reach the model through its tensors' own
    strides, cast to their dtypes; integer buffers (with use_buffers) come from the snapshot of
    `step`. Returns how the profile was made, its relative L2 error (0 up to rounding for a tracked
    sigma_rel) and the step and progress it stands for. Everything is checked, the combined values
    finite included, before the model is written."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    paths = _snapshots_up_to(snapshot_dir, step)
    series = _read_series(paths)
    last = series.last
    coefficients, error = solve_coefficients(
        series.progress, series.gammas, last.progress, gamma, series.labels
    )
    target = _SynthesisTarget(model, last)
    accumulators = _combine(paths, coefficients, series)
    target.write(accumulators, backend)
    return Reconstruction(coefficients.tolist(), series.sources, error, last.step, float(last.progress))


def _snapshots_up_to(snapshot_dir: str | os.PathLike, step: int | None) -> dict[int, Path]:
    """step -> file of the snapshots that make the profile at `step` (default: the last one)."""
    snapshots = list_snapshots(snapshot_dir)
    if not snapshots:
        raise ValueError(f"swa_fast.posthoc.synthesize: no snapshots in {str(snapshot_dir)!r}")
    if step is None:
        step = max(snapshots)
    elif step not in snapshots:
        steps = list(snapshots)
        raise ValueError(
            f"swa_fast.posthoc.synthesize: no snapshot at step {step!r} in {str(snapshot_dir)!r}; there "
            f"are {len(steps)}, at steps {steps[0]} to {steps[-1]} ({steps[:5]}{' ...' * (len(steps) > 5)})"
        )
    return {s: path for s, path in snapshots.items() if s <= step}


@dataclass
class _Series:
    """What the snapshots' headers give the least squares: one source per (snapshot, profile), with
    its progress, gamma and name in messages; each group's accumulator dtype; and the last snapshot
    (its layout, its integer buffers)."""

    sources: list[tuple[int, int]] = field(default_factory=list)
    progress: list[float] = field(default_factory=list)
    gammas: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    dtypes: list[torch.dtype] = field(default_factory=list)
    last: Snapshot | None = None

    def add(self, path: Path, snapshot: Snapshot) -> None:
        for k, (sigma_rel, gamma) in enumerate(zip(snapshot.sigma_rels, snapshot.gammas)):
            self.sources.append((snapshot.step, k))
            self.progress.append(float(snapshot.progress))
            self.gammas.append(float(gamma))
            self.labels.append(f"{str(path)!r} (sigma_rel {sigma_rel})")
        # fp32 at least (an fp16 sum would round away the small coefficients' terms); fp64 for fp64
        self.dtypes = self.dtypes or [torch.float32] * len(snapshot.flats[0])
        for flats in snapshot.flats:
            self.dtypes = [torch.promote_types(d, flat.dtype) for d, flat in zip(self.dtypes, flats)]
        self.last = snapshot


def _read_series(paths: dict[int, Path]) -> _Series:
    """Every snapshot's header (its tensors are memory mapped, not read), checked to be one series:
    each file holds its own step, at a progress > 0 that grows with the step, all of one model and
    one training run."""
    series = _Series()
    first = previous = None
    for step, path in paths.items():
        snapshot = load_snapshot(path)
        first = first or (path, snapshot)
        _check_in_series(step, path, snapshot, first, previous)
        series.add(path, snapshot)
        previous = (path, snapshot)
    return series  # (paths is never empty)


def _check_in_series(
    step: int,
    path: Path,
    snapshot: Snapshot,
    first: tuple[Path, Snapshot],
    previous: tuple[Path, Snapshot] | None,
) -> None:
    if snapshot.step != step:
        raise ValueError(f"swa_fast.posthoc: {str(path)!r} holds the snapshot of step {snapshot.step}")
    real_number(
        snapshot.progress,
        f"posthoc: the progress of {str(path)!r} (a snapshot at progress 0, taken before the first "
        "update, holds no profile: remove it)",
        0.0,
        above_low=True,
    )
    first_path, first_snapshot = first
    if _layout(snapshot) != _layout(first_snapshot):
        raise ValueError(
            f"swa_fast.posthoc: {str(path)!r} is a snapshot of another model than {str(first_path)!r} "
            "(its tensors differ): one training run per snapshot directory"
        )
    if snapshot.run != first_snapshot.run:
        raise ValueError(
            f"swa_fast.posthoc: {str(path)!r} is a snapshot of {describe_run(snapshot.run)}, "
            f"{str(first_path)!r} of {describe_run(first_snapshot.run)}: another training run; a directory "
            "holds one run's snapshots (synthesize at a step before it, or move the other run's files out)"
        )
    if previous is not None and not snapshot.progress > previous[1].progress:
        raise ValueError(
            f"swa_fast.posthoc: {str(path)!r} has progress {snapshot.progress!r}, but {str(previous[0])!r}, "
            f"an earlier step, has progress {previous[1].progress!r}: progress must grow with the step"
        )


def _layout(snapshot: Snapshot) -> tuple:
    """What must be the same in every snapshot of one series: the model's tensors, their groups and
    the groups' flat lengths."""
    return (snapshot.names, snapshot.shapes, snapshot.groups, snapshot.use_buffers, snapshot.flat_lengths())


class _SynthesisTarget:
    """The model's tensors that a synthesis writes, checked against the snapshots' (names, shapes,
    integer buffers) before anything is written."""

    def __init__(self, model: Module, snapshot: Snapshot) -> None:
        self.tracked = TrackedModel(model, bool(snapshot.use_buffers), "synthesize")
        self.floating, self.integer = self.tracked.split(self.tracked.tensors(model))
        self.groups = snapshot.groups
        self._check_floating(snapshot)
        self._check_integers(snapshot)
        self.integers_saved = [snapshot.integers[n] for n in self.tracked.integer_names]

    def _check_floating(self, snapshot: Snapshot) -> None:
        mine = [list(t.shape) for t in self.floating]
        if self.tracked.floating_names == snapshot.names and mine == snapshot.shapes:
            return
        mine = dict(zip(self.tracked.floating_names, mine))
        theirs = dict(zip(snapshot.names, snapshot.shapes))
        differ = next((n for n in list(theirs) + list(mine) if mine.get(n) != theirs.get(n)), None)
        raise ValueError(
            f"swa_fast.posthoc.synthesize: the snapshots are of another model: '{differ}' has shape "
            f"{theirs.get(differ)} there and {mine.get(differ)} here (None: missing)"
        )

    def _check_integers(self, snapshot: Snapshot) -> None:
        if sorted(snapshot.integers) != sorted(self.tracked.integer_names):
            raise ValueError(
                "swa_fast.posthoc.synthesize: the snapshots' integer buffers are not the model's: they "
                f"hold {sorted(snapshot.integers)}, the model has {sorted(self.tracked.integer_names)}"
            )
        for name, mine in zip(self.tracked.integer_names, self.integer):
            saved = snapshot.integers[name]
            if (saved.dtype, saved.shape) != (mine.dtype, mine.shape):
                raise ValueError(
                    f"swa_fast.posthoc.synthesize: the integer buffer '{name}' is {saved.dtype} of shape "
                    f"{list(saved.shape)} there and {mine.dtype} of shape {list(mine.shape)} here"
                )

    def write(self, accumulators: list[Tensor], backend: str | None) -> None:
        """The combined averages (one flat per group) through the model's own strides, and the
        integer buffers of the last snapshot."""
        self.tracked.before_write()
        for group, accumulator in zip(self.groups, accumulators):
            tensors = [self.floating[i] for i in group]
            copy_into_strided(tensors, _shaped_parts(accumulator, [t.shape for t in tensors]), backend)
        copy_lists(self.integer, self.integers_saved)
        self.tracked.after_write()


def _combine(paths: dict[int, Path], coefficients: Tensor, series: _Series) -> list[Tensor]:
    """sum_i coefficients[i] * source i, one flat per group in its accumulator dtype, reading one
    snapshot at a time (the sources in `_read_series`'s order: by step, then by profile); checked
    finite."""
    lengths = series.last.flat_lengths()
    accumulators = [torch.zeros(n, dtype=dtype) for n, dtype in zip(lengths, series.dtypes)]
    weights = iter(coefficients.tolist())
    for path in paths.values():
        for group_flats in load_snapshot(path).flats:
            weight = next(weights)
            for accumulator, flat in zip(accumulators, group_flats):
                accumulator.add_(flat, alpha=weight)
    if not all(bool(a.isfinite().all()) for a in accumulators):
        _check_finite(paths, series.last, accumulators)
    return accumulators


def _check_finite(paths: dict[int, Path], last: Snapshot, accumulators: list[Tensor]) -> None:
    """Raise, naming the tensor, when a combined average is not finite: for the first snapshot
    holding non-finite values in it (a NaN times any coefficient stays NaN), or for the
    combination's own overflow. (Non-finite values in the padding between tensors are never read.)"""
    combined = named_averages(dataclasses.replace(last, flats=[accumulators]))[0]
    name = next((n for n, tensor in combined.items() if not bool(tensor.isfinite().all())), None)
    if name is None:
        return
    for path in paths.values():
        snapshot = load_snapshot(path)
        for sigma_rel, named in zip(snapshot.sigma_rels, named_averages(snapshot)):
            if not bool(named[name].isfinite().all()):
                raise ValueError(
                    f"swa_fast.posthoc.synthesize: {str(path)!r} holds non-finite values in '{name}' (its "
                    f"average of sigma_rel {sigma_rel}): a diverged average cannot be combined; synthesize "
                    "at a step before it (step=...)"
                )
    raise ValueError(
        f"swa_fast.posthoc.synthesize: the combination of the snapshots overflows {combined[name].dtype} "
        f"in '{name}'"
    )
