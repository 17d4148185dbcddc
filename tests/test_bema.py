"""swa_fast.BEMA (bias-corrected EMA, Block et al. 2025) and its weights, `weighting.bema_weights`:
the weights against the paper's formula, the manager against a float64 per-parameter version of the
paper's update at every step (schedules, given steps, a bf16 model with an fp32 average, buffers),
the readers, a resumed run bit for bit, the placement that applies updates later, and the
refusals, each of which changes nothing."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import mlp, perturb_
from test_averaging import staged

import swa_fast
from swa_fast.weighting import bema_weights

SETTINGS = dict(ema_power=0.5, bias_power=0.2, lag=10.0, multiplier=1.0, min_ema_multiplier=0.0)


# --- the weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        SETTINGS,
        dict(ema_power=0.75, bias_power=0.4, lag=3, multiplier=2.5, min_ema_multiplier=0.05),
        dict(ema_power=0.0, bias_power=0.0, lag=1, multiplier=0.5, min_ema_multiplier=0.0),
        dict(ema_power=2.0, bias_power=8.0, lag=0, multiplier=1.0, min_ema_multiplier=0.3),
    ],
)
def test_bema_weights_are_the_papers_formula(settings):
    s = settings
    for t in (1, 2, 7, 100, 12345):
        age = s["lag"] + s["multiplier"] * t
        beta = max(math.pow(age, -s["ema_power"]), s["min_ema_multiplier"])
        alpha = math.pow(age, -s["bias_power"])
        got = bema_weights(t, **s)
        assert got == pytest.approx((beta, alpha), rel=1e-15, abs=0), (t, got)
        assert all(type(w) is float for w in got)


def test_bema_weights_refuse_an_age_that_is_not_positive():
    with pytest.raises(ValueError, match=r"expected lag \+ multiplier \* t > 0, got 0 \+ 1.0 \* 0 = 0.0"):
        bema_weights(0, lag=0)


# --- the manager against the paper's update ------------------------------------------------------------


class Float64BEMA:
    """The paper's BEMA, per parameter in float64, with TRL's steps: theta_0 and the EMA taken at step
    `update_after` (at the start for 0), an update on every `update_every`-th step after it."""

    def __init__(self, model, update_after=0, update_every=1, **settings):
        self.settings = {**SETTINGS, **settings}
        self.update_after, self.update_every = update_after, update_every
        now = self.weights(model)
        self.start, self.ema, self.bema = dict(now), dict(now), dict(now)

    @staticmethod
    def weights(model):
        return {n: p.detach().double().clone() for n, p in model.named_parameters()}

    def step(self, model, t):
        if t < self.update_after or (t - self.update_after) % self.update_every:
            return
        now = self.weights(model)
        if t == self.update_after:
            self.start, self.ema = dict(now), dict(now)
            return
        age = self.settings["lag"] + self.settings["multiplier"] * t
        beta = max(age ** -self.settings["ema_power"], self.settings["min_ema_multiplier"])
        alpha = age ** -self.settings["bias_power"]
        for n, theta in now.items():
            self.ema[n] = (1 - beta) * self.ema[n] + beta * theta
            self.bema[n] = self.ema[n] + alpha * (theta - self.start[n])


def named(manager, flat):
    return dict(zip(manager.tracked.floating_names, flat.views))


def assert_close_to(manager, reference, rtol=2e-6, atol=1e-6):
    for flat, expected in ((manager.average, reference.bema), (manager.ema, reference.ema)):
        for name, got in named(manager, flat).items():
            torch.testing.assert_close(got.double(), expected[name], rtol=rtol, atol=atol, msg=name)
    for name, got in named(manager, manager.start).items():
        torch.testing.assert_close(got.double(), reference.start[name], rtol=1e-7, atol=0, msg=name)


@pytest.mark.parametrize(
    "schedule",
    [
        dict(),
        dict(update_after=3, update_every=2),
        dict(update_after=1, update_every=3, ema_power=0.8, bias_power=0.5, lag=2.0, min_ema_multiplier=0.2),
    ],
)
def test_every_step_matches_a_float64_per_parameter_bema(schedule):
    model = mlp(5, 7, 3)
    bema, reference = swa_fast.BEMA(model, **schedule), Float64BEMA(model, **schedule)
    for t in range(1, 11):
        perturb_(model, seed=t)
        bema.update(model)
        reference.step(model, t)
        assert bema.calls == t
        assert_close_to(bema, reference)
    after = schedule.get("update_after", 0)
    every = schedule.get("update_every", 1)
    updates = len(range(after + every, 11, every)) + (after > 0)
    assert bema.updates == updates == int(bema.n_averaged), (bema.updates, updates)


def test_given_steps_take_the_place_of_the_calls():
    """`update(model, step=...)`: TRL's steps (the Trainer's global_step), here from step 40 on."""
    model = mlp(4, 3)
    bema = swa_fast.BEMA(model, update_after=42, update_every=3)
    reference = Float64BEMA(model, update_after=42, update_every=3)
    for t in range(40, 55):
        perturb_(model, seed=t)
        bema.update(model, step=t)
        reference.step(model, t)
        assert_close_to(bema, reference)
    assert bema.calls == 15 and bema.updates == 1 + 4  # the snapshot at 42, updates at 45, 48, 51, 54


def test_before_its_first_update_the_bema_weights_are_the_model_as_it_was_made():
    model = mlp(3, 2)
    made = [p.detach().clone() for p in model.parameters()]
    bema = swa_fast.BEMA(model, update_after=2, update_every=2)
    for seed in range(3):  # steps 1 (nothing), 2 (theta_0 and the EMA), 3 (nothing)
        perturb_(model, seed)
        bema.update(model)
        assert all(torch.equal(a, b) for a, b in zip(bema.average.views, made))
    assert not torch.equal(bema.start.views[0], made[0]) and torch.equal(
        bema.start.views[0], bema.ema.views[0]
    )


def test_a_bf16_model_keeps_an_fp32_bema_of_its_bf16_weights():
    model = mlp(6, 5, 2, dtype=torch.bfloat16)
    bema = swa_fast.BEMA(model, lag=1.0)
    assert {v.dtype for v in bema.average.views + bema.ema.views + bema.start.views} == {torch.float32}
    reference = Float64BEMA(model, lag=1.0)
    for t in range(1, 7):
        perturb_(model, seed=t)
        bema.update(model)
        reference.step(model, t)
    assert_close_to(bema, reference)
    # in bf16 the small EMA steps would round away: the fp32 average keeps them
    kept = swa_fast.BEMA(model, dtype=None)
    assert kept.ema.views[0].dtype == torch.bfloat16


def test_buffers_are_averaged_and_integer_ones_copied():
    model = mlp(4, 6, 2, batch_norm=True)
    bema = swa_fast.BEMA(model, use_buffers=True)
    for t in range(1, 4):
        perturb_(model, seed=t, input_shape=(8, 4))
        bema.update(model)
    state = bema.state_dict()
    assert state["average"]["1.num_batches_tracked"] == model[1].num_batches_tracked == 3
    assert state["ema"]["1.num_batches_tracked"] == 3
    mean = model[1].running_mean
    assert not torch.equal(state["average"]["1.running_mean"], mean)  # averaged, not copied
    assert torch.equal(state["start"]["1.running_mean"], torch.zeros_like(mean))  # as made


def test_updates_applied_later_by_the_placement_match_updates_applied_now():
    """The snapshot and the bema_ updates through the staging copy of `device=` (a GPU model's)."""
    model = mlp(5, 4, 3)
    now = swa_fast.BEMA(model, update_after=2, update_every=2)
    later = staged(swa_fast.BEMA(model, update_after=2, update_every=2), model)
    for t in range(1, 9):
        perturb_(model, seed=t)
        now.update(model)
        later.update(model)
    for a, b in zip(now.state_dict()["average"].values(), later.state_dict()["average"].values()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(now.ema.views, later.ema.views))


# --- reading -----------------------------------------------------------------------------------------


def test_readers_show_the_bema_weights_or_the_ema():
    model = mlp(4, 3, 2)
    bema = swa_fast.BEMA(model)
    for t in range(1, 4):
        perturb_(model, seed=t)
        bema.update(model)
    live = [p.detach().clone() for p in model.parameters()]
    other = mlp(4, 3, 2, seed=9)
    bema.copy_to(other)
    assert all(torch.equal(p, v) for p, v in zip(other.parameters(), bema.average.views))
    bema.copy_to(other, which="ema")
    assert all(torch.equal(p, v) for p, v in zip(other.parameters(), bema.ema.views))
    bema_weights_now = bema.average.views[0].clone()
    with bema.average_applied(model, which="ema") as applied:
        assert all(torch.equal(p, v) for p, v in zip(applied.parameters(), bema.ema.views))
        # within the block the readers and the state show the BEMA weights again
        assert torch.equal(bema.state_dict()["average"]["0.weight"], bema_weights_now)
        assert not torch.equal(bema_weights_now, bema.ema.views[0])
    with bema.average_applied(model):
        assert all(torch.equal(p, v) for p, v in zip(model.parameters(), bema.average.views))
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), live))
    before = [v.clone() for v in bema.average.views]
    bema.swap(model)
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), before))
    assert all(torch.equal(v, w) for v, w in zip(bema.average.views, live))
    with pytest.raises(ValueError, match="which must be 'bema' or 'ema', got 'start'"):
        bema.copy_to(model, which="start")


# --- saving and resuming -------------------------------------------------------------------------------


def test_a_resumed_bema_goes_on_bit_for_bit():
    model = mlp(5, 4, 3)
    settings = dict(update_after=2, update_every=2, lag=3.0)
    bema = swa_fast.BEMA(model, **settings)
    for t in range(1, 6):
        perturb_(model, seed=t)
        bema.update(model)
    buffer = io.BytesIO()
    torch.save(bema.state_dict(), buffer)
    buffer.seek(0)
    resumed = swa_fast.BEMA(mlp(5, 4, 3, seed=7), **settings)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    pickled = copy.deepcopy(bema)
    for t in range(6, 11):
        perturb_(model, seed=t)
        for manager in (bema, resumed, pickled):
            manager.update(model)
    for other in (resumed, pickled):
        assert other.calls == bema.calls == 10 and other.updates == bema.updates
        for flat in ("average", "ema", "start"):
            assert all(
                torch.equal(a, b) for a, b in zip(getattr(bema, flat).views, getattr(other, flat).views)
            )


def test_a_state_of_other_settings_is_refused_and_changes_nothing():
    model = mlp(3, 2)
    bema = swa_fast.BEMA(model)
    perturb_(model, seed=1)
    bema.update(model)
    other = swa_fast.BEMA(mlp(3, 2, seed=5), lag=5.0)
    before = {k: v.clone() for k, v in other.state_dict()["average"].items()}
    with pytest.raises(ValueError, match=r"expected a BEMA state_dict with the settings .*'lag': 5.0"):
        other.load_state_dict(bema.state_dict())
    missing = {k: v for k, v in bema.state_dict().items() if k != "start"}
    with pytest.raises(ValueError, match=r"entries 'ema' and 'start'"):
        swa_fast.BEMA(mlp(3, 2, seed=5)).load_state_dict(missing)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict()["average"].items())
    assert other.calls == 0


# --- refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ema_power=-0.5), r"BEMA: ema_power must be a finite real number >= 0.0, got -0.5"),
        (dict(bias_power=float("nan")), r"BEMA: bias_power must be a finite real number >= 0.0, got nan"),
        (dict(lag="10"), r"BEMA: lag must be a finite real number >= 0.0, got '10'"),
        (dict(multiplier=-1), r"BEMA: multiplier must be a finite real number >= 0.0, got -1"),
        (dict(min_ema_multiplier=1.5), r"min_ema_multiplier must be a finite real number in \[0.0, 1.0\]"),
        (dict(lag=0, multiplier=0), r"expected lag \+ multiplier > 0 .*got lag 0 and multiplier 0"),
        (dict(update_after=-1), r"BEMA: update_after must be an int >= 0, got -1"),
        (dict(update_every=0), r"BEMA: update_every must be an int >= 1, got 0"),
        (dict(check_finite=True), r"BEMA: check_finite is not supported"),
        (dict(capturable=True), r"BEMA: capturable=True is for SWA and EMA"),
        (dict(dtype="float32"), r"dtype must be torch.float32.*got the string 'float32': pass torch.float32"),
    ],
)
def test_settings_are_refused_where_they_are_given(kwargs, message):
    with pytest.raises(ValueError, match=message):
        swa_fast.BEMA(mlp(3, 2), **kwargs)


def test_a_refused_update_changes_nothing():
    model = mlp(4, 3)
    bema = swa_fast.BEMA(model)
    perturb_(model, seed=1)
    with pytest.raises(ValueError, match=r"BEMA.update: step must be an int >= 0, got 2.5"):
        bema.update(model, step=2.5)
    before = [v.clone() for v in bema.average.views + bema.ema.views]
    model[0].weight.data = torch.zeros(5, 5)
    with pytest.raises(ValueError, match="shape"):
        bema.update(model)
    assert bema.calls == 0 and bema.updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, bema.average.views + bema.ema.views))
