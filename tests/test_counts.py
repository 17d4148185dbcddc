"""Counts and periods (`update_after_step`, `update_every`, `max_rank`, `max_snapshots`,
`snapshot_every`, `every`, ...) of every manager and integration: integers only (an integral float
is taken), checked where they are given by one helper (`weighting.count`), so that `12.34`, `"2"` or
`None` fail there with the argument's name, what was expected and what came, instead of changing
silently which updates run (`EMA(update_after_step=12.34)` skipped every update after the 13th)."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import mlp

import swa_fast
from swa_fast.optim import SWA as OptimSWA


def _model():
    return mlp(3, 4, 2)


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


def _library(name: str):
    """The integration module of library `name`, or skip without the library."""
    pytest.importorskip(name)
    return importlib.import_module(f"swa_fast.integrations.{name}")


def _posthoc(tmp_path, value):
    return swa_fast.PostHocEMA(_model(), snapshot_every=value, snapshot_dir=tmp_path)


def _attach(value):
    model = _model()
    return swa_fast.EMA(model).attach(_sgd(model), every=value)


def _predict(value):
    model = _model()
    swag = swa_fast.SWAG(model, max_rank=0)
    swag.update(model)
    return swag.predict_loader(model, [torch.randn(2, 3)], n_samples=value, diag_only=True)


# (what is made, the message's name of the argument, whether None is a valid value)
CASES = {
    "EMA update_after_step": (
        lambda v, _: swa_fast.EMA(_model(), update_after_step=v),
        "update_after_step",
        False,
    ),
    "EMA update_every": (lambda v, _: swa_fast.EMA(_model(), update_every=v), "update_every", False),
    "attach every": (lambda v, _: _attach(v), "attach: every", False),
    "BEMA update_after": (lambda v, _: swa_fast.BEMA(_model(), update_after=v), "update_after", False),
    "BEMA update_every": (lambda v, _: swa_fast.BEMA(_model(), update_every=v), "update_every", False),
    "SWAG max_rank": (lambda v, _: swa_fast.SWAG(_model(), max_rank=v), "max_rank", False),
    "SWAG n_samples": (lambda v, _: _predict(v), "n_samples", False),
    "FGE max_snapshots": (lambda v, _: swa_fast.FGE(_model(), max_snapshots=v), "max_snapshots", True),
    "FGECyclicLR cycle_length": (
        lambda v, _: swa_fast.FGECyclicLR(_sgd(_model()), 0.1, 0.01, cycle_length=v),
        "cycle_length",
        False,
    ),
    "PostHocEMA snapshot_every": (lambda v, tmp: _posthoc(tmp, v), "snapshot_every", True),
    "optim.SWA swa_start": (
        lambda v, _: OptimSWA(_sgd(_model()), swa_start=v, swa_freq=2),
        "swa_start",
        True,
    ),
    "optim.SWA swa_freq": (lambda v, _: OptimSWA(_sgd(_model()), swa_start=1, swa_freq=v), "swa_freq", True),
    "ema_pytorch update_after_step": (
        lambda v, _: _library("ema_pytorch").EMA(_model(), update_after_step=v),
        "update_after_step",
        False,
    ),
    "ema_pytorch update_every": (
        lambda v, _: _library("ema_pytorch").EMA(_model(), update_every=v),
        "update_every",
        False,
    ),
    "ema_pytorch update_model_with_ema_every": (
        lambda v, _: _library("ema_pytorch").EMA(_model(), update_model_with_ema_every=v),
        "update_model_with_ema_every",
        True,
    ),
    "timm update_after_step": (
        lambda v, _: _library("timm").ModelEmaV3(_model(), update_after_step=v),
        "update_after_step",
        False,
    ),
    "diffusers update_after_step": (
        lambda v, _: _library("diffusers").EMAModel(_model().parameters(), update_after_step=v),
        "update_after_step",
        False,
    ),
    "trl BEMACallback update_freq": (
        lambda v, _: _library("trl").BEMACallback(update_freq=v),
        "update_freq",
        False,
    ),
    "trl BEMACallback update_after": (
        lambda v, _: _library("trl").BEMACallback(update_after=v),
        "update_after",
        False,
    ),
    "lightning update_every_n_steps": (
        lambda v, _: _library("lightning").EMAWeightAveraging(update_every_n_steps=v),
        "update_every_n_steps",
        False,
    ),
    "lightning update_starting_at_step": (
        lambda v, _: _library("lightning").EMAWeightAveraging(update_starting_at_step=v),
        "update_starting_at_step",
        True,
    ),
    "lightning update_starting_at_epoch": (
        lambda v, _: _library("lightning").EMAWeightAveraging(update_starting_at_epoch=v),
        "update_starting_at_epoch",
        True,
    ),
    "transformers every": (lambda v, _: _library("transformers").EMACallback(every=v), "every", False),
    "transformers start_step": (
        lambda v, _: _library("transformers").SWACallback(start_step=v),
        "start_step",
        False,
    ),
    "transformers snapshot_every": (
        lambda v, _: _library("transformers").PostHocEMACallback(snapshot_every=v),
        "snapshot_every",
        True,
    ),
    "lightning annealing_epochs": (
        lambda v, _: _library("lightning").StochasticWeightAveraging(swa_lrs=0.1, annealing_epochs=v),
        "annealing_epochs",
        False,
    ),
}


REFUSED = [
    (case, value)
    for case, (_, _, none_allowed) in CASES.items()
    for value in (12.34, "2", True, *(() if none_allowed else (None,)))  # (None: off, where allowed)
]


@pytest.mark.parametrize("case, value", REFUSED)
def test_a_count_that_is_not_an_integer_is_refused_where_it_is_given(case, value, tmp_path):
    make, name, _ = CASES[case]
    with pytest.raises(ValueError, match=rf"{name} must be an int >= \d+( or None)?, got {value!r}"):
        make(value, tmp_path)


@pytest.mark.parametrize("case", list(CASES))
def test_an_integral_float_is_taken_as_its_int(case, tmp_path):
    make, _, _ = CASES[case]
    made = make(2.0, tmp_path)
    if isinstance(made, torch.utils.hooks.RemovableHandle):
        made.remove()


def test_an_ema_given_an_integral_float_schedules_as_given_the_int():
    model = _model()
    floated = swa_fast.EMA(model, decay=0.5, update_after_step=2.0, update_every=3.0)
    exact = swa_fast.EMA(model, decay=0.5, update_after_step=2, update_every=3)
    assert type(floated.update_after_step) is int and type(floated.update_every) is int
    for step in range(9):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step)
        exact.update(model)
        floated.update(model)
    assert all(torch.equal(a, b) for a, b in zip(exact.average.views, floated.average.views))
    assert exact.updates == floated.updates
