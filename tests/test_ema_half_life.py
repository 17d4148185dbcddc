"""EMA lengths given as a half-life: `EMA(model, half_life=h)` (in update() calls) and
`EMA(model, half_life_fraction=f)` (torchtitan's EMA, a half-life of f times the updates so far).

torchtitan (torchtitan/components/ema.py, `EMAOptimizersContainer`): at trainer step s >= start_step,
elapsed = s - start_step fires when elapsed % update_every_n_steps == 0, with
num_updates = max(elapsed // update_every_n_steps, 1) and decay = 2 ** (-1 / (half_life_fraction *
num_updates)); its average starts as a clone of the model. Here the copy is the call after
`update_after_step` calls (t = 0) and the k-th averaging update after it (t = k * update_every) has
decay 2 ** (-1 / (f * k)): torchtitan's with start_step at the copy, whose own first firing has
decay 2 ** (-1 / f) instead of an exact copy's 0.
"""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import assert_same_manager, cnn_with_bn, mlp, perturb_

import swa_fast
from swa_fast.weighting import half_life_decay

IMAGES = (5, 1, 8, 8)  # the batch perturb_ runs through cnn_with_bn(8)
SCHEDULES = [(0, 1), (2, 1), (0, 3), (1, 2)]  # (update_after_step, update_every)


def torchtitan_decay(fraction, elapsed, every):
    """torchtitan's decay at the firing `elapsed` steps after start_step (None: no firing)."""
    if elapsed < 0 or elapsed % every:
        return None
    num_updates = max(elapsed // every, 1)  # (its step_bias: 0)
    return 2.0 ** (-1.0 / (fraction * num_updates))


def schedule_decays(calls, after, every, half_life=None, fraction=None):
    """Each call's decay as this file works it out from the definitions (not from swa_fast): 0 for
    the copies, None for a call that does not average."""
    decays = []
    for call in range(1, calls + 1):
        t = call - after - 1
        if t <= 0:
            decays.append(0.0)
        elif t % every:
            decays.append(None)
        elif fraction is not None:
            decays.append(torchtitan_decay(fraction, t, every))
        else:
            decays.append(2.0 ** (-every / half_life))
    return decays


# --- the decay -------------------------------------------------------------------------------------


@pytest.mark.parametrize("after, every", SCHEDULES)
def test_a_half_life_in_calls_decays_by_two_to_minus_every_over_the_half_life(after, every):
    ema = swa_fast.EMA(mlp(3, 4, 2), half_life=7.5, update_after_step=after, update_every=every)
    assert ema.decay == 2.0 ** (-every / 7.5)
    for call, expected in enumerate(schedule_decays(30, after, every, half_life=7.5), start=1):
        if expected is not None:
            assert ema.decay_at(call) == expected, call


@pytest.mark.parametrize("after, every", SCHEDULES)
@pytest.mark.parametrize("fraction", [0.05, 0.3, 1.0])
def test_a_half_life_fraction_decays_as_torchtitans_ema(fraction, after, every):
    model = mlp(3, 4, 2)
    ema = swa_fast.EMA(model, half_life_fraction=fraction, update_after_step=after, update_every=every)
    assert ema.decay is None
    for call in range(1, 41):
        before = ema.updates
        ema.update(model)
        averaged = ema.updates > before
        elapsed = call - after - 1  # torchtitan's, with start_step at the copy
        theirs = torchtitan_decay(fraction, elapsed, every)
        if elapsed < 0:
            assert averaged and ema.decay_at(call) == 0.0, call  # the copies before the last one
        elif elapsed == 0:  # the copy: exact here, where torchtitan's first firing is nearly one
            assert averaged and ema.decay_at(call) == 0.0 and theirs == 2.0 ** (-1 / fraction)
        else:
            assert averaged == (theirs is not None), call
            if averaged:
                assert ema.decay_at(call) == theirs, call


def test_the_device_rule_is_the_host_rule_bit_for_bit():
    for t in range(-2, 40):
        for every in (1, 3):
            for settings in ({"half_life": 7.5}, {"fraction": 0.05}, {"fraction": 0.37}):
                host = half_life_decay(t, every, **settings)
                device = half_life_decay(torch.tensor(t), every, **settings)
                assert device.dtype == torch.float64 and device.item() == host, (t, every, settings)


# --- the average -----------------------------------------------------------------------------------


def impulse_run(ema_settings, calls):
    """The weight each call's model has in the average after `calls` calls: call j's model is the
    one-hot vector e_j (an fp64 Linear's weight), so the average's entry j is call j's weight."""
    model = torch.nn.Linear(calls, 1, bias=False, dtype=torch.float64)
    ema = swa_fast.EMA(model, **ema_settings)
    for call in range(1, calls + 1):
        with torch.no_grad():
            model.weight.zero_()
            model.weight[0, call - 1] = 1.0
        ema.update(model)
    averaged = copy.deepcopy(model)
    ema.copy_to(averaged)
    return averaged.weight.detach()[0], ema


def hand_weights(decays):
    """Each call's weight in an EMA with these decays (None: the call does not average), float64."""
    weights = np.zeros(len(decays))
    for j, decay in enumerate(decays):
        if decay is not None:
            weights[: j + 1] *= decay  # (a copy, decay 0, leaves only this call's model)
            weights[j] += 1.0 - decay
    return torch.from_numpy(weights)


@pytest.mark.parametrize("after, every", SCHEDULES)
@pytest.mark.parametrize("rule", [{"half_life": 6.0}, {"half_life_fraction": 0.2}])
def test_the_average_is_the_float64_ema_of_the_schedule(rule, after, every):
    calls = 37
    got, ema = impulse_run({**rule, "update_after_step": after, "update_every": every}, calls)
    decays = schedule_decays(calls, after, every, rule.get("half_life"), rule.get("half_life_fraction"))
    expected = hand_weights(decays)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
    assert ema.updates == sum(d is not None for d in decays)
    assert got.sum().item() == pytest.approx(1.0, abs=1e-12)  # an average: the weights sum to 1


@pytest.mark.parametrize("half_life, every", [(8, 1), (8, 2), (9, 3)])
def test_after_a_half_life_of_calls_a_models_weight_has_halved(half_life, every):
    calls = 60
    weights, _ = impulse_run({"half_life": half_life, "update_every": every}, calls)
    latest = calls - (calls - 1) % every  # the last call that averaged (calls after the copy: 1)
    for call in range(2, latest - half_life + 1):  # each averaging call (not the copy)
        if (call - 1) % every == 0:
            ratio = weights[call - 1] / weights[call - 1 + half_life]
            assert ratio.item() == pytest.approx(0.5, rel=1e-12), call
    off = [call for call in range(2, calls + 1) if (call - 1) % every]
    assert all(weights[call - 1] == 0 for call in off)  # off the schedule: no weight


@pytest.mark.parametrize("fraction", [0.05, 0.25])
def test_a_fractions_half_life_is_that_fraction_of_the_updates_so_far(fraction):
    """At the k-th averaging update, fraction * k updates of its decay halve a weight. And the
    average follows the run: after N updates the last share s of them weigh
    1 - prod 2 ** (-1 / (fraction * i)) over i in ((1 - s) N, N], which tends to
    1 - (1 - s) ** (ln 2 / fraction) whatever N (about 1/2 for s = fraction, when it is small)."""
    ema = swa_fast.EMA(mlp(3, 4, 2), half_life_fraction=fraction, update_after_step=3, update_every=2)
    for k in (1, 2, 10, 333):
        call = 3 + 1 + 2 * k
        assert ema.decay_at(call) ** (fraction * k) == pytest.approx(0.5, rel=1e-12), k
    for updates in (400, 800):
        weights, _ = impulse_run({"half_life_fraction": fraction}, updates + 1)  # (the copy, then N)
        for share in (0.5 * fraction, fraction, 2 * fraction):
            limit = 1 - (1 - share) ** (math.log(2) / fraction)
            got = weights[-int(updates * share) :].sum().item()
            assert got == pytest.approx(limit, abs=0.005), (updates, share)


# --- capturable ------------------------------------------------------------------------------------


CAPTURABLE = {
    "half_life": {"half_life": 3.0, "update_after_step": 1, "update_every": 2, "use_buffers": True},
    "half_life_fraction": {"half_life_fraction": 0.3, "update_every": 3, "use_buffers": True},
    "fraction, check_finite": {"half_life_fraction": 0.5, "update_after_step": 2, "check_finite": True},
}


@pytest.mark.parametrize("config", CAPTURABLE)
def test_capturable_half_life_updates_equal_the_host_scheduled_ones(config):
    options = CAPTURABLE[config]
    model = cnn_with_bn(8)
    twin = copy.deepcopy(model)
    captured, host = swa_fast.EMA(model, capturable=True, **options), swa_fast.EMA(twin, **options)
    for step in range(12):
        for m in (model, twin):
            perturb_(m, step, IMAGES)
        captured.update(model)
        host.update(twin)
        assert_same_manager(captured, host, step)


def test_torch_compile_traces_a_capturable_half_life_fraction_update_whole():
    options = CAPTURABLE["half_life_fraction"]
    torch._dynamo.reset()
    model = cnn_with_bn(8)
    twin = copy.deepcopy(model)
    captured, host = swa_fast.EMA(model, capturable=True, **options), swa_fast.EMA(twin, **options)

    @torch.compile(fullgraph=True)
    def update():
        captured.update(model)

    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(8):
            for m in (model, twin):
                perturb_(m, step, IMAGES)
            update()
            host.update(twin)
            assert_same_manager(captured, host, step)


# --- settings --------------------------------------------------------------------------------------


def test_the_default_is_still_decay_0999():
    model = mlp(6, 5, 2)
    emas = [swa_fast.EMA(model), swa_fast.EMA(model, decay=None), swa_fast.EMA(model, decay=0.999)]
    assert [ema.decay for ema in emas] == [0.999] * 3
    assert all(ema.half_life is None and ema.half_life_fraction is None for ema in emas)
    for s in range(3):
        perturb_(model, s)
        for ema in emas:
            ema.update(model)
    for ema in emas[:2]:
        assert all(torch.equal(a, b) for a, b in zip(ema.average.views, emas[2].average.views))
    assert emas[0].state_dict().keys() == {"average", "n_averaged", "n_skipped", "calls", "updates", "decay"}


@pytest.mark.parametrize(
    "value", [np.float32(0.25), np.float64(0.25), torch.tensor(0.25, dtype=torch.bfloat16), 1]
)
def test_a_half_life_takes_a_real_number_torch_takes(value):
    ema = swa_fast.EMA(mlp(3, 4, 2), half_life_fraction=value)
    assert type(ema.half_life_fraction) is float and ema.half_life_fraction == float(value)
    ema = swa_fast.EMA(mlp(3, 4, 2), half_life=value * 8)
    assert type(ema.half_life) is float and ema.half_life == float(value) * 8


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"decay": 0.99, "half_life": 100},
            r"half_life= sets the decay; expected no decay= beside it, got decay=0.99$",
        ),
        (
            {"decay": 0.999, "half_life_fraction": 0.05},
            r"half_life_fraction= sets the decay; .* decay=0.999$",
        ),
        (
            {"half_life": 100, "half_life_fraction": 0.05},
            r"expected one of half_life= \(in update\(\) calls\) and half_life_fraction= \(of the calls so "
            r"far\), got both: half_life=100, half_life_fraction=0.05",
        ),
        (
            {"half_life_fraction": 0.05, "warmup_gamma": 2.0},
            r"expected no warmup_gamma= beside it, got warmup_gamma=2.0",
        ),
        ({"half_life": 0}, r"EMA: half_life must be a finite real number > 0.0, got 0$"),
        ({"half_life": -10.0}, r"half_life must be a finite real number > 0.0, got -10.0"),
        ({"half_life": float("inf")}, r"half_life must be a finite real number > 0.0, got inf"),
        ({"half_life": "100"}, r"half_life must be a finite real number > 0.0, got '100'"),
        (
            {"half_life_fraction": 0.0},
            r"half_life_fraction must be a finite real number in \(0.0, 1.0\], got 0.0",
        ),
        (
            {"half_life_fraction": 50},
            r"half_life_fraction must be a finite real number in \(0.0, 1.0\], got 50",
        ),
        ({"half_life_fraction": float("nan")}, r"half_life_fraction must be .* got nan"),
        ({"half_life_fraction": torch.tensor([0.1])}, r"half_life_fraction must be .* got tensor"),
    ],
)
def test_half_life_settings_are_checked_at_construction(settings, message):
    with pytest.raises(ValueError, match=message):
        swa_fast.EMA(mlp(6, 5, 2), **settings)


# --- state_dict ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", [{"half_life": 5.0}, {"half_life_fraction": 0.2}])
def test_a_half_life_ema_resumes_bit_for_bit(rule):
    settings = {**rule, "update_after_step": 1, "update_every": 2, "use_buffers": True}

    def run(stop_at=None):
        model = mlp(6, 5, 2, batch_norm=True, dtype=torch.bfloat16)
        ema = swa_fast.EMA(model, **settings)
        for s in range(11):
            if s == stop_at:
                saved = copy.deepcopy(ema.state_dict())
                ema = swa_fast.EMA(model, **settings)
                ema.load_state_dict(saved)
            perturb_(model, s)
            ema.update(model)
        return ema.state_dict()

    straight, resumed = run(), run(stop_at=6)
    for name in straight["average"]:
        assert torch.equal(straight["average"][name], resumed["average"][name]), name
    assert {key: straight[key] for key in rule} == rule  # the rule is saved
    assert ("decay" in straight) == ("half_life" in rule)  # (a fraction has no one decay)


def _saved(**rule):
    model = mlp(6, 5, 2)
    ema = swa_fast.EMA(model, **rule)
    perturb_(model, 1)
    ema.update(model)
    return ema.state_dict()


@pytest.mark.parametrize(
    "saved_rule, loader_rule, message",
    [
        (
            {"half_life_fraction": 0.2},
            {"half_life_fraction": 0.1},
            "with half_life_fraction=0.1, got one with half_life_fraction=0.2",
        ),
        (
            {"half_life_fraction": 0.2},
            {"half_life": 5.0},
            r"with decay=0.87\d*, half_life=5.0, got one with "
            r"half_life_fraction=0.2; nothing was loaded",
        ),
        ({"half_life_fraction": 0.2}, {}, r"with decay=0.999, got one with half_life_fraction=0.2"),
        (
            {"half_life": 5.0},
            {"decay": 2.0 ** (-1 / 5.0)},
            r"with decay=0.87\d*, got one with decay=0.87\d*, "
            r"half_life=5.0",
        ),
        (
            {"half_life": 5.0},
            {"half_life": 5.0, "update_every": 2},
            r"with decay=0.75\d*, half_life=5.0, got "
            r"one with decay=0.87\d*, half_life=5.0",
        ),
        ({"decay": 0.5}, {"half_life_fraction": 0.2}, r"with half_life_fraction=0.2, got one with decay=0.5"),
        ({"decay": 0.5}, {"decay": 0.9}, r"with decay=0.9, got one with decay=0.5"),
    ],
)
def test_a_state_of_another_rule_is_refused_and_changes_nothing(saved_rule, loader_rule, message):
    saved = _saved(**saved_rule)
    model = mlp(6, 5, 2)
    ema = swa_fast.EMA(model, **loader_rule)
    ema.update(model)
    before = copy.deepcopy(ema.state_dict())
    with pytest.raises(
        ValueError, match=r"^swa_fast.EMA.load_state_dict: expected a state_dict of an EMA " + message
    ):
        ema.load_state_dict(saved)
    after = ema.state_dict()
    assert all(torch.equal(after["average"][k], v) for k, v in before["average"].items())
    assert {k: v for k, v in after.items() if k != "average"} == {
        k: v for k, v in before.items() if k != "average"
    }


def test_a_state_saved_before_half_lives_loads_as_it_did():
    """States saved before these settings hold `decay` only: they load into an EMA of that decay,
    and are refused by a half-life EMA (another rule)."""
    saved = _saved(decay=0.9)
    assert {"half_life", "half_life_fraction"}.isdisjoint(saved)  # what older versions saved too
    swa_fast.EMA(mlp(6, 5, 2), decay=0.9).load_state_dict(saved)
    without_decay = {k: v for k, v in saved.items() if k != "decay"}  # (a hand-made state)
    swa_fast.EMA(mlp(6, 5, 2), decay=0.7).load_state_dict(without_decay)
    with pytest.raises(ValueError, match="got one with no decay saved"):
        swa_fast.EMA(mlp(6, 5, 2), half_life_fraction=0.1).load_state_dict(without_decay)
    with pytest.raises(ValueError, match=r"with half_life_fraction=0.1, got one with decay=0.9;"):
        swa_fast.EMA(mlp(6, 5, 2), half_life_fraction=0.1).load_state_dict(saved)
