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
functions), then streams the snapshots through an fp32 accumulator into the model.

The profiles' math is in profiles.py (the power-function weights live there rather than in
weighting.py: they need the progress since the last update, which none of weighting.py's rules
take), the snapshot files and their writer in snapshots.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
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
    list_snapshots,
    load_snapshot,
    snapshot_path,
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

    Snapshots (every `snapshot_every` updates, into `snapshot_dir`) hold every tracked average, its
    sigma_rel and gamma, the update count (`step`) and the progress. The averages are copied to host
    memory (pinned, on a side stream, from a GPU; by one fused copy on the CPU) and written by a
    background thread, each file under a temporary name renamed when whole. An error of the writer
    is raised by the next `update`, `snapshot`, `flush` or `synthesize`. Under DDP rank 0 writes
    them (every rank holds the same averages).

    Args:
        model: the model to average.
        sigma_rels: the profiles to track, each a real number in (0, SIGMA_REL_MAX ~ 0.3003), distinct
            (EDM2 tracks 0.05 and 0.10).
        snapshot_every: write a snapshot every this many updates (None: never).
        snapshot_dir: where (created if missing); needed with `snapshot_every`. One training run per
            directory: a resumed run (`load_state_dict`) continues the series there.
        snapshot_dtype: the snapshots' dtype (default fp16 as EDM2; None: the average's own).
        **options: the `Averager`'s dtype, use_buffers, rank0_only, device, side_stream and backend
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
                "swa_fast.PostHocEMA: snapshots of a sharded (FSDP2) model are not supported: each rank "
                "holds only its shards"
            )
        self.sigma_rels = sigma_rels
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
        self._applying: int | None = None  # the profile average_applied is applying
        self._writer: SnapshotWriter | None = None
        self._host: HostSnapshot | None = None
        self._copied: list = []  # CUDA events of the last snapshot's host copy

    # --- updates --------------------------------------------------------------------------------------

    def _advance(self, progress: float | None) -> None:
        """Check `progress` and work out this update's K weights (before anything is written)."""
        if self._writer is not None:
            self._writer.check()
        given = progress is not None
        if self.progress_given is not None and given != self.progress_given:
            raise ValueError(
                "swa_fast.PostHocEMA.update: pass progress= on every update or on none; "
                + ("the earlier ones had it" if self.progress_given else "the earlier ones did not")
            )
        if given:
            progress = real_number(progress, "PostHocEMA.update: progress", self.progress, above_low=True)
        else:
            progress = self.progress + 1
        self._weights = [update_weight(g, self.progress, progress) for g in self.gammas]
        self.progress = progress
        self.progress_given = given
        # A snapshot's copy from the GPU reads the averages: the update waits for it there.
        for event in self._copied:
            torch.cuda.current_stream(event.device).wait_event(event)
        self._copied = []

    def update(self, model: Module, progress: float | None = None) -> None:
        """Update every tracked average with the model's current weights; write a snapshot when one
        is due. `progress`: the training progress so far (images, tokens: any count that grows), on
        every call or never; without it each update counts one."""
        self._advance(progress)
        super().update(model)
        self._snapshot_if_due()

    def update_from(self, tensors: list[Tensor], progress: float | None = None) -> None:
        """`update` from tensors laid out as the model's (see Averager.update_from)."""
        self._advance(progress)
        super().update_from(tensors)
        self._snapshot_if_due()

    def _update_weight(self) -> list[float]:
        return self._weights

    _OP = "multi_lerp_"
    _ADDS_COPIES = True

    def _plan_targets(self) -> list[list[Tensor]]:
        """multi_lerp_'s K lists: every profile's stored tensors (they share the integer buffers)."""
        return [p.stored() for p in self._profiles]

    # --- snapshots -----------------------------------------------------------------------------------

    def _snapshot_if_due(self) -> None:
        if self.snapshot_every is not None and self.calls % self.snapshot_every == 0:
            self.snapshot()

    def snapshot(self) -> Path | None:
        """Write a snapshot of every tracked average now (in the background), named by the update
        count; its path, or None where this process writes none (ranks other than 0)."""
        if self.snapshot_dir is None:
            raise ValueError("swa_fast.PostHocEMA.snapshot: this one was made without snapshot_dir")
        if not self._writes_snapshots:
            return None
        if self._writer is None:
            self._writer = SnapshotWriter()
            weakref.finalize(self, stop_writer, self._writer.jobs, self._writer.thread)
        self._writer.check()
        self.wait()  # an update in flight lands in the averages first
        if self._host is None:
            self._host = HostSnapshot(self, self.snapshot_dtype)
        self._writer.free.wait()  # the last snapshot is out of the host buffer
        self._writer.check()
        sources = [g.buffer for p in self._profiles for g in p.flat.groups]
        self._copied = self._host.copy_from(sources, self._integers, self.backend)
        path = snapshot_path(self.snapshot_dir, self.calls)
        self._writer.submit(path, self._host.snapshot_at(self.calls, self.progress), list(self._copied))
        return path

    def flush(self) -> None:
        """Wait until every snapshot taken so far is on disk; raise the writer's error, if any."""
        if self._writer is not None:
            self._writer.flush()

    def synthesize(self, model: Module, sigma_rel: float, step: int | None = None) -> Reconstruction:
        """`swa_fast.posthoc.synthesize` over this manager's snapshots (written ones first)."""
        if self.snapshot_dir is None:
            raise ValueError("swa_fast.PostHocEMA.synthesize: this one was made without snapshot_dir")
        self.flush()
        return synthesize(self.snapshot_dir, model, sigma_rel, step)

    # --- reading a tracked average --------------------------------------------------------------------

    def _profile_index(self, sigma_rel: float | None, what: str) -> int:
        if sigma_rel is None:
            if self._applying is not None:
                return self._applying
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

    @contextlib.contextmanager
    def _profile_as_average(self, k: int) -> Iterator[None]:
        """Averager's readers read `_copy` / `average`: show them profile k for the call."""
        kept = self._copy, self.average
        self._copy, self.average = self._profiles[k], self._profiles[k].flat
        try:
            yield
        finally:
            self._copy, self.average = kept

    def copy_to(self, model: Module, sigma_rel: float | None = None) -> None:
        """Write the tracked average of `sigma_rel` into the model (see Averager.copy_to)."""
        with self._profile_as_average(self._profile_index(sigma_rel, "copy_to")):
            super().copy_to(model)

    def swap(self, model: Module, sigma_rel: float | None = None) -> None:
        """Exchange the model's weights and the tracked average of `sigma_rel` (see Averager.swap)."""
        with self._profile_as_average(self._profile_index(sigma_rel, "swap")):
            super().swap(model)

    @contextlib.contextmanager
    def average_applied(self, model: Module, sigma_rel: float | None = None) -> Iterator[Module]:
        """The tracked average of `sigma_rel` in the model within the block (see
        Averager.average_applied)."""
        self._applying = self._profile_index(sigma_rel, "average_applied")
        try:
            with super().average_applied(model) as applied:
                self._applying = None
                yield applied
        finally:
            self._applying = None

    # --- saving and resuming --------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        self.flush()
        state = super().__getstate__()
        state.update(_writer=None, _host=None, _copied=[])
        return state

    def _extra_state(self) -> dict:
        return {
            "sigma_rels": list(self.sigma_rels),
            "progress": self.progress,
            "progress_given": self.progress_given,
            "averages": [p.named() for p in self._profiles],
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
        if "progress_given" not in state or state["progress_given"] not in (None, True, False):
            raise ValueError(
                "swa_fast.PostHocEMA: 'progress_given' must be None or a bool, got "
                f"{state.get('progress_given')!r}"
            )
        progress = real_number(state.get("progress"), "PostHocEMA.load_state_dict: progress", 0.0)
        return progress, state["progress_given"], averages

    def _load_extra_state(self, checked: tuple) -> None:
        self.progress, self.progress_given, averages = checked
        for profile, named in zip(self._profiles[1:], averages[1:]):  # the first is `average`
            profile.load_named(named)

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict of the same model and sigma_rels; resuming continues bit for bit (and
        the snapshot series where it left off)."""
        self.flush()
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
    EDM2's least squares (see `solve_coefficients`). The snapshots are read one at a time (memory
    mapped) into an fp32 accumulator: the model, one snapshot and the accumulator are all it holds.
    Values reach the model through its tensors' own strides, cast to their dtypes; integer buffers
    (with use_buffers) come from the snapshot of `step`. Returns how the profile was made and its
    relative L2 error (0 up to rounding for a tracked sigma_rel). Everything is checked before the
    model is written."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    paths = _snapshots_up_to(snapshot_dir, step)
    series = _read_series(paths)
    coefficients, error = solve_coefficients(series.progress, series.gammas, series.progress[-1], gamma)
    target = _SynthesisTarget(model, series.last)
    accumulators = _combine(paths.values(), coefficients, series.last.flat_lengths())
    target.write(accumulators, backend)
    return Reconstruction(coefficients.tolist(), series.sources, error)


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
    its progress and gamma; and the last snapshot (its layout, its integer buffers)."""

    sources: list[tuple[int, int]]
    progress: list[float]
    gammas: list[float]
    last: Snapshot


def _read_series(paths: dict[int, Path]) -> _Series:
    """Every snapshot's header (its tensors are memory mapped, not read), checked to be one series:
    each file holds its own step, all of one model."""
    sources, progress, gammas = [], [], []
    first = None
    for step, path in paths.items():
        snapshot = load_snapshot(path)
        if snapshot.step != step:
            raise ValueError(f"swa_fast.posthoc: {str(path)!r} holds the snapshot of step {snapshot.step}")
        if first is None:
            first = (path, _layout(snapshot))
        _check_same_model(path, snapshot, *first)
        for k, g in enumerate(snapshot.gammas):
            sources.append((step, k))
            progress.append(float(snapshot.progress))
            gammas.append(float(g))
    return _Series(sources, progress, gammas, last=snapshot)  # (paths is never empty)


def _layout(snapshot: Snapshot) -> tuple:
    """What must be the same in every snapshot of one series: the model's tensors, their groups and
    the groups' flat lengths."""
    return (snapshot.names, snapshot.shapes, snapshot.groups, snapshot.use_buffers, snapshot.flat_lengths())


def _check_same_model(path: Path, snapshot: Snapshot, first: Path, layout: tuple) -> None:
    if _layout(snapshot) != layout:
        raise ValueError(
            f"swa_fast.posthoc: {str(path)!r} is a snapshot of another model than {str(first)!r} "
            "(its tensors differ): one training run per snapshot directory"
        )


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

    def write(self, accumulators: list[Tensor], backend: str | None) -> None:
        """The combined averages (one flat per group) through the model's own strides, and the
        integer buffers of the last snapshot."""
        self.tracked.before_write()
        for group, accumulator in zip(self.groups, accumulators):
            tensors = [self.floating[i] for i in group]
            copy_into_strided(tensors, _shaped_parts(accumulator, [t.shape for t in tensors]), backend)
        copy_lists(self.integer, self.integers_saved)


def _combine(paths: Iterable[Path], coefficients: Tensor, lengths: list[int]) -> list[Tensor]:
    """sum_i coefficients[i] * source i, one fp32 flat per group, reading one snapshot at a time (the
    sources in `_read_series`'s order: by step, then by profile)."""
    accumulators = [torch.zeros(n, dtype=torch.float32) for n in lengths]
    weights = iter(coefficients.tolist())
    for path in paths:
        for group_flats in load_snapshot(path).flats:
            weight = next(weights)
            for accumulator, flat in zip(accumulators, group_flats):
                accumulator.add_(flat, alpha=weight)
    return accumulators
