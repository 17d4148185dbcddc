"""A stateful property test of PostHocEMA (hypothesis.stateful): random sequences of updates (with
or without progress=), refused updates, snapshots, failed writes (each reported once, by the next
update, snapshot() or flush()), checkpoints, crashes and resumes from a checkpoint, another run
started in the same directory, a directory with another run's snapshot mixed in, and syntheses,
on a float64 model with float64 averages and snapshots, against a reference kept here:

    the model's values at every update of the current timeline and their progress, from which
    each tracked average is EDM2's closed form, sum_i ((t_i / t_n)^(g+1) - (t_(i-1) / t_n)^(g+1)) x_i,
    with gamma the largest root of the cubic (numpy, independent of the manager's bisection);
    what each snapshot file must hold (the closed form at its step, of the timeline that wrote it),
    so that a synthesis is the returned coefficients' combination of those, in float64.

The manager's documented rules are modelled here: a snapshot every EVERY updates, flush() taking one
of the final state unless its snapshot was taken, a failed write leaving the file as it was, a
resumed manager continuing its own run (its files of a crashed timeline stay until rewritten)."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_posthoc import gamma_by_numpy, set_to, vector_model

from swa_fast.posthoc import PostHocEMA, synthesize
from swa_fast.posthoc.snapshots import list_snapshots, load_snapshot, save_snapshot, snapshot_path

SIGMA_RELS = (0.05, 0.15)
GAMMAS = [gamma_by_numpy(s) for s in SIGMA_RELS]
EVERY = 2
SIZE = 3
VECTORS = st.lists(st.floats(-10, 10, allow_nan=False), min_size=SIZE, max_size=SIZE).map(
    lambda values: torch.tensor(values, dtype=torch.float64)
)


def closed_form(states: list[torch.Tensor], progress: list[float], gamma: float) -> torch.Tensor:
    """The power-function EMA of the models `states` updated at `progress`, in float64."""
    t = torch.tensor([0.0, *progress], dtype=torch.float64)
    weights = torch.diff((t / t[-1]) ** (gamma + 1))
    return weights @ torch.stack(states)


@dataclasses.dataclass
class Written:
    """What a snapshot file must hold."""

    progress: float
    averages: list[torch.Tensor]  # per tracked profile


class PostHocRun(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="swa_fast_posthoc_properties_"))
        self.directory = self.root / "snapshots"
        self.model = vector_model(SIZE)
        self.states: list[torch.Tensor] = []  # the current timeline's models, one per update
        self.progress: list[float] = []
        self.files: dict[int, Written] = {}  # step -> what its file holds
        self.snapshot_step: int | None = None  # the manager's last snapshot, as flush() sees it
        self.checkpoint = None

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def manager(self) -> PostHocEMA:
        return PostHocEMA(
            self.model,
            SIGMA_RELS,
            snapshot_every=EVERY,
            snapshot_dir=self.directory,
            snapshot_dtype=torch.float64,
            dtype=torch.float64,
        )

    @initialize(given=st.booleans())
    def start(self, given: bool) -> None:
        self.given = given  # whether updates pass progress= (then in steps of 1 to 5)
        self.ema = self.manager()

    # --- the reference's own steps ---------------------------------------------------------------

    def next_progress(self, increment: int) -> float:
        last = self.progress[-1] if self.progress else 0.0
        return last + increment if self.given else last + 1

    def tracked_now(self) -> list[torch.Tensor]:
        return [closed_form(self.states, self.progress, g) for g in GAMMAS]

    def snapshot_taken(self, written: bool = True) -> None:
        """The manager took a snapshot of now; `written`: its file was written."""
        if written:
            self.files[len(self.states)] = Written(self.progress[-1], self.tracked_now())
        self.snapshot_step = len(self.states)

    def flush(self) -> None:
        self.ema.flush()
        if self.states and self.snapshot_step != len(self.states):
            self.snapshot_taken()

    def wait_for_writes(self) -> None:
        copy.deepcopy(self.ema)  # pickling waits for the writes in flight, reporting none

    # --- rules -----------------------------------------------------------------------------------

    @rule(updates=st.lists(st.tuples(VECTORS, st.integers(1, 5)), min_size=1, max_size=6))
    def update(self, updates: list[tuple[torch.Tensor, int]]) -> None:
        for values, increment in updates:
            set_to(self.model, values)
            progress = self.next_progress(increment)
            self.ema.update(self.model, progress=progress if self.given else None)
            self.states.append(values)
            self.progress.append(progress)
            if len(self.states) % EVERY == 0:
                self.snapshot_taken()

    @rule(increment=st.integers(1, 5))
    def a_refused_update_changes_nothing(self, increment: int) -> None:
        progress = self.next_progress(increment) if self.given else None
        with pytest.raises(ValueError, match="'w' has shape"):
            self.ema.update(vector_model(SIZE + 1), progress=progress)

    @rule()
    def snapshot(self) -> None:
        if not self.states:
            with pytest.raises(ValueError, match="before the first update"):
                self.ema.snapshot()
            return
        self.ema.snapshot()
        self.snapshot_taken()

    @rule()
    def flush_now(self) -> None:
        self.flush()

    @precondition(lambda self: self.states)
    @rule(report=st.sampled_from(["update", "snapshot", "flush"]), increment=st.integers(1, 5))
    def a_write_fails(self, report: str, increment: int) -> None:
        self.wait_for_writes()
        away = self.root / "away"
        self.directory.rename(away)  # the snapshot's file cannot be created
        try:
            self.ema.snapshot()
            self.snapshot_taken(written=False)
            self.wait_for_writes()
        finally:
            away.rename(self.directory)  # the space is back
        progress = self.next_progress(increment) if self.given else None
        reports = {
            "update": (lambda: self.ema.update(self.model, progress=progress), "this update was not applied"),
            "snapshot": (self.ema.snapshot, "no snapshot was taken now"),
            "flush": (self.ema.flush, "every other snapshot taken so far is on disk"),
        }
        call, outcome = reports[report]
        with pytest.raises(RuntimeError, match=f"writing the snapshot .* failed.*{outcome}"):
            call()
        self.snapshot_step = None  # the failed one is taken again by the next flush()

    @rule()
    def save_checkpoint(self) -> None:
        self.checkpoint = (copy.deepcopy(self.ema.state_dict()), list(self.states), list(self.progress))

    @precondition(lambda self: self.checkpoint is not None)
    @rule()
    def crash_and_resume(self) -> None:
        self.wait_for_writes()  # (a crash keeps the whole files written so far, and no others)
        state, self.states, self.progress = copy.deepcopy(self.checkpoint)
        self.ema = self.manager()
        self.ema.load_state_dict(state)
        self.snapshot_step = None

    @precondition(lambda self: self.files)
    @rule()
    def another_run_in_the_directory_is_refused(self) -> None:
        self.wait_for_writes()  # (a directory is checked for the files it holds)
        other = self.manager()
        with pytest.raises(ValueError, match="another training run"):
            other.update(self.model)
        assert other.calls == 0 and other.progress == 0.0

    @precondition(lambda self: self.files)
    @rule()
    def a_snapshot_of_another_run_is_refused(self) -> None:
        self.wait_for_writes()
        mixed = Path(tempfile.mkdtemp(dir=self.root))
        for path in list_snapshots(self.directory).values():
            shutil.copy(path, mixed / path.name)
        last = max(self.files)
        theirs = load_snapshot(snapshot_path(self.directory, last), mmap=False)
        theirs = dataclasses.replace(theirs, step=last + 1, progress=theirs.progress + 1, run="another run")
        save_snapshot(snapshot_path(mixed, last + 1), theirs)
        expected = "another training run" if self.grows(sorted(self.files)) else "progress must grow"
        target = vector_model(SIZE)
        with pytest.raises(ValueError, match=expected):
            synthesize(mixed, target, 0.10)
        assert not target.w.any()

    def grows(self, steps: list[int]) -> bool:
        """Whether the files of `steps` have growing progress (a resumed timeline that counts its
        progress= differently can leave a crashed one's later files behind with less)."""
        return all(self.files[a].progress < self.files[b].progress for a, b in zip(steps, steps[1:]))

    @precondition(lambda self: self.states or self.files)
    @rule(
        sigma_rel=st.sampled_from([0.03, *SIGMA_RELS, 0.1, 0.25]),
        pick=st.integers(0, 1000),
        through_manager=st.booleans(),
    )
    def synthesize(self, sigma_rel: float, pick: int, through_manager: bool) -> None:
        self.flush()  # (the manager's synthesize flushes too)
        steps = sorted(self.files)
        step = None if pick % 3 == 0 else steps[pick % len(steps)]
        used = [s for s in steps if step is None or s <= step]
        target = vector_model(SIZE)
        run = self.ema.synthesize if through_manager else lambda *a: synthesize(self.directory, *a)
        if not self.grows(used):
            with pytest.raises(ValueError, match="progress must grow with the step"):
                run(target, sigma_rel, step)
            assert not target.w.any()
            return
        result = run(target, sigma_rel, step)
        assert result.step == used[-1] and result.progress == self.files[used[-1]].progress
        assert result.sources == [(s, k) for s in used for k in range(len(SIGMA_RELS))]
        terms = [c * self.files[s].averages[k] for c, (s, k) in zip(result.coefficients, result.sources)]
        scale = max(float(term.abs().max()) for term in terms) + 1e-300
        torch.testing.assert_close(target.w.detach(), sum(terms), rtol=0, atol=1e-12 * len(terms) * scale)
        if sigma_rel in SIGMA_RELS:  # a tracked profile: its own snapshot's average
            assert result.profile_error < 1e-6
            own = self.files[used[-1]].averages[SIGMA_RELS.index(sigma_rel)]
            torch.testing.assert_close(
                target.w.detach(), own, rtol=0, atol=1e-6 * (float(own.abs().max()) + 1)
            )

    # --- what always holds -----------------------------------------------------------------------

    @invariant()
    def counts_and_averages_are_the_references(self) -> None:
        if not hasattr(self, "ema"):
            return
        n = len(self.states)
        assert (self.ema.calls, self.ema.updates, int(self.ema.n_averaged)) == (n, n, n)
        assert self.ema.progress == (self.progress[-1] if n else 0.0)
        if not n:
            return
        probe = vector_model(SIZE)
        for sigma_rel, expected in zip(SIGMA_RELS, self.tracked_now()):
            self.ema.copy_to(probe, sigma_rel=sigma_rel)
            torch.testing.assert_close(probe.w.detach(), expected, rtol=1e-10, atol=1e-12)


PostHocRun.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestPostHocRun = PostHocRun.TestCase
