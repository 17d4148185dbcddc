"""FGECyclicLR: the rate of every iteration against Garipov et al.'s formula, its minima, resume."""

import math

import pytest
import torch

import swa_fast


def garipov_linear(i, c, a1, a2):
    """Eq. 2 of Garipov et al. 2018, written independently of the scheduler."""
    t = ((i - 1) % c + 1) / c
    return (1 - 2 * t) * a1 + 2 * t * a2 if t <= 0.5 else (2 - 2 * t) * a2 + (2 * t - 1) * a1


def garipov_cosine(i, c, a1, a2):
    t = ((i - 1) % c + 1) / c
    return a2 + (a1 - a2) * (1 + math.cos(2 * math.pi * t)) / 2


def optimizer(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


@pytest.mark.parametrize("shape,formula", [("linear", garipov_linear), ("cosine", garipov_cosine)])
def test_every_iteration_of_three_cycles_follows_the_formula(shape, formula):
    opt = optimizer()
    sched = swa_fast.FGECyclicLR(opt, lr_max=0.05, lr_min=0.0005, cycle_length=8, shape=shape)
    minima = []
    for i in range(1, 3 * 8 + 1):
        assert opt.param_groups[0]["lr"] == pytest.approx(formula(i, 8, 0.05, 0.0005), rel=1e-12)
        if sched.at_minimum():
            minima.append(i)
            assert opt.param_groups[0]["lr"] == pytest.approx(0.0005)
        opt.step()
        sched.step()
    assert minima == [4, 12, 20]  # mid-cycle, once per cycle


def test_every_param_group_gets_the_rate():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]], "lr": 9.0}], lr=1.0)
    swa_fast.FGECyclicLR(opt, 0.1, 0.01, 4)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(garipov_linear(1, 4, 0.1, 0.01))] * 2


def test_state_dict_resumes_the_cycle():
    opt = optimizer()
    sched = swa_fast.FGECyclicLR(opt, 0.1, 0.01, 6)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = optimizer()
    resumed = swa_fast.FGECyclicLR(opt2, 0.1, 0.01, 6)
    resumed.load_state_dict(state)
    for _ in range(5):
        opt.step()
        sched.step()
        opt2.step()
        resumed.step()
        assert resumed.get_last_lr() == sched.get_last_lr()
        assert resumed.at_minimum() == sched.at_minimum()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr_max=0.1, lr_min=0.01, cycle_length=5), "even"),
        (dict(lr_max=0.1, lr_min=0.01, cycle_length=0), "even"),
        (dict(lr_max=0.01, lr_min=0.1, cycle_length=4), "lr_min <= lr_max"),
        (dict(lr_max=0.1, lr_min=0.01, cycle_length=4, shape="step"), "'linear' or 'cosine'"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        swa_fast.FGECyclicLR(optimizer(), **kwargs)
