"""Property-based tests (hypothesis) of the caches that replaced per-update walks: random edits of
a model and of its averaged copy between updates, none of which runs a registration hook, against
what `named_parameters()` shows at each update:

- a parameter given new storage (`p.data = ...`, contiguous or strided), the model or the averaged
  copy converted (`.to(memory_format=...)`), a module written straight into `_modules`, a
  parameter object written straight into `_parameters`;
- `swa_utils.AveragedModel` averages whatever `parameters()` gives at each update, as torch's
  does (a float64 mean of those, position by position);
- `swa_fast.SWA` averages them while they are the tensors it was made for, and refuses the first
  update after one was replaced, changing nothing;
- the ema-pytorch drop-in gives the original's EMA bit for bit under the same edits of twin models.

Nothing here may register a module, parameter or buffer between updates (torch's global hooks
would make every walk start over, and so hide a stale one): torch's own AveragedModel, whose
update sets `n_averaged` through `__setattr__`, is not run beside them for that reason.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import swa_fast
from swa_fast.swa_utils import AveragedModel

PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
FORMATS = (torch.channels_last, torch.contiguous_format)
TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # fp32 averages against float64 ones, over a dozen updates
LAYERS = 3  # a convolution, a 1x1 convolution, a linear layer: each with a weight and a bias


def make_model(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 3, 1), torch.nn.Linear(5, 2))


EDITS = st.lists(
    st.one_of(
        st.tuples(st.just("update"), st.integers(0, 2**16)),
        st.tuples(st.just("data"), st.integers(0, 2 * LAYERS - 1), st.integers(0, 2**16), st.booleans()),
        st.tuples(st.just("model format"), st.sampled_from(FORMATS)),
        st.tuples(st.just("average format"), st.sampled_from(FORMATS)),
        st.tuples(st.just("module"), st.integers(0, LAYERS - 1)),
        st.tuples(st.just("parameter"), st.integers(0, LAYERS - 1), st.integers(0, 2**16)),
    ),
    min_size=1,
    max_size=12,
)


def _random_like(t: torch.Tensor, seed: int, strided: bool) -> torch.Tensor:
    """Random values of `t`'s shape, laid out strided when asked (channels_last, or transposed)."""
    g = torch.Generator().manual_seed(seed)
    if strided and t.dim() == 4:
        return torch.randn(t.shape, generator=g).contiguous(memory_format=torch.channels_last)
    if strided and t.dim() == 2:
        return torch.randn(t.shape[::-1], generator=g).t()
    return torch.randn(t.shape, generator=g)


def edit_model(model: torch.nn.Module, spares: list[torch.nn.Module], edit: tuple) -> None:
    """Apply a model edit (not an update, not an edit of the average)."""
    kind = edit[0]
    if kind == "data":
        _, index, seed, strided = edit
        p = list(model.parameters())[index]
        p.data = _random_like(p, seed, strided)
    elif kind == "model format":
        model.to(memory_format=edit[1])
    elif kind == "module":  # straight into the dict: no hook runs (the spare was made beforehand)
        key = str(edit[1])
        model._modules[key], spares[edit[1]] = spares[edit[1]], model._modules[key]
    elif kind == "parameter":
        layer = model[edit[1]]
        layer._parameters["weight"] = torch.nn.Parameter(_random_like(layer.weight, edit[2], False))


def perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))


class Mean:
    """torch's AveragedModel, written in float64: the mean of what `parameters()` gave, position
    by position."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []
        self.n = 0

    def add(self, tensors: list[torch.Tensor]) -> None:
        if not self.values:
            self.values = [t.detach().double().clone() for t in tensors]
        else:
            for v, t in zip(self.values, tensors):
                v += (t.detach().double() - v) / (self.n + 1)
        self.n += 1

    def assert_is(self, tensors: list[torch.Tensor], what: str) -> None:
        for i, (v, t) in enumerate(zip(self.values, tensors)):
            where = f"{what} {i}"
            torch.testing.assert_close(t.double(), v, **TOLERANCE, msg=lambda m, w=where: f"{w}: {m}")


class Subjects:
    """AveragedModel and SWA of one model, and the float64 mean they promise."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.averaged = AveragedModel(model)
        self.swa: swa_fast.SWA | None = swa_fast.SWA(model)
        self.mean = Mean()
        self.tracked = list(model.parameters())  # the tensors the SWA was made for

    def update(self, seed: int) -> None:
        perturb(self.model, seed)
        self.averaged.update_parameters(self.model)
        replaced = not all(a is b for a, b in zip(self.model.parameters(), self.tracked))
        if self.swa is not None and replaced:  # (the first update after: refused, nothing written)
            kept = [v.clone() for v in self.swa.average.views]
            with pytest.raises(ValueError, match="not the one this SWA was made for"):
                self.swa.update(self.model)
            assert all(torch.equal(v, k) for v, k in zip(self.swa.average.views, kept))
            self.swa = None
        elif self.swa is not None:
            self.swa.update(self.model)
        self.mean.add(list(self.model.parameters()))
        self.mean.assert_is(list(self.averaged.module.parameters()), "AveragedModel tensor")
        if self.swa is not None:
            self.mean.assert_is(self.swa.average.views, "SWA tensor")


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**16), edits=EDITS)
def test_averages_follow_named_parameters_through_edits_no_hook_sees(seed, edits):
    model = make_model(seed)
    spares = [copy.deepcopy(layer) for layer in model]  # made before the averages: no hook after
    subjects = Subjects(model)
    for edit in edits:
        if edit[0] == "update":
            subjects.update(edit[1])
        elif edit[0] == "average format":
            subjects.averaged.to(memory_format=edit[1])
        else:
            edit_model(model, spares, edit)
    subjects.update(seed)


def run_ema(ema_class, seed: int, edits: list[tuple]) -> list[dict]:
    """The EMA copy's state after each edit of a run of `ema_class` through `edits`."""
    model = make_model(seed)
    spares = [copy.deepcopy(layer) for layer in model]
    ema = ema_class(
        model, beta=0.5, update_after_step=0, update_every=1, param_or_buffer_names_no_ema={"0.weight"}
    )
    states = []
    for edit in edits:
        if edit[0] == "update":
            perturb(model, edit[1])
            ema.update()
        elif edit[0] == "average format":
            ema.ema_model.to(memory_format=edit[1])
        else:
            edit_model(model, spares, edit)
        states.append({k: v.clone() for k, v in ema.ema_model.state_dict().items()})
    return states


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**16), edits=EDITS)
def test_the_ema_pytorch_drop_in_follows_the_original_through_the_same_edits(seed, edits):
    """The original runs first, on a model of its own: its update sets buffers through
    `__setattr__` (a registration), which would hide a stale walk of ours if run in between."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    from swa_fast.integrations.ema_pytorch import EMA

    edits = [*edits, ("update", seed)]
    theirs = run_ema(ema_pytorch.EMA, seed, edits)
    ours = run_ema(EMA, seed, edits)
    for edit, their_state, our_state in zip(edits, theirs, ours):
        assert list(their_state) == list(our_state)
        for name, value in their_state.items():
            assert torch.equal(value, our_state[name]), f"after {edit}: {name}"
