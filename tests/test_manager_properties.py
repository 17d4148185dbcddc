"""Property-based tests of SWA and EMA (hypothesis): random small models (mixed dtypes, with or
without BatchNorm) and random sequences of training steps, update, copy_to, swap,
average_applied, state_dict round trips, pickling and replaced parameters, run against a model of
what the managers promise, written here in float64 with plain torch:

    SWA   avg <- avg + (x - avg) / (n + 1), n the updates counted so far: the equal-weight mean
    EMA   avg <- decay_t * avg + (1 - decay_t) * x, with EMA's schedule (first update a copy,
          update_after_step, update_every, timm's warmup)

with `check_finite` leaving a non-finite update out, integer buffers copied, a swap exchanging the
average and the live weights exactly (or refusing, model and average unchanged, when their dtypes
differ), `average_applied` giving the model back exactly, and a replaced parameter refused before
anything is written.
"""

import copy
import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import swa_fast

DTYPES = (torch.float32, torch.bfloat16, torch.float64)
STEPS = 12  # operations per example, at most
PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@st.composite
def small_models(draw) -> torch.nn.Module:
    """Linear layers of 1 to 4 features, each in its own dtype, with BatchNorm1d between them or not."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    widths = draw(st.lists(st.integers(1, 4), min_size=2, max_size=4))
    batch_norm = draw(st.booleans())
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(n_in, n_out).to(draw(st.sampled_from(DTYPES))))
        if batch_norm and i < len(widths) - 2:
            layers.append(torch.nn.BatchNorm1d(n_out).to(draw(st.sampled_from(DTYPES))))
    return torch.nn.Sequential(*layers)


@st.composite
def manager_settings(draw, kind: str) -> dict:
    options = {
        "use_buffers": draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float32, None])),
        "check_finite": draw(st.booleans()),
    }
    if kind == "EMA":
        options["decay"] = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
        options["warmup_gamma"] = draw(st.sampled_from([None, 1.0, 3.0]))
        options["update_after_step"] = draw(st.integers(0, 2))
        options["update_every"] = draw(st.integers(1, 3))
    return options


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("step"), st.integers(0, 2**16), st.booleans()),
        st.tuples(st.just("update")),
        st.tuples(st.just("copy_to")),
        st.tuples(st.just("swap")),
        st.tuples(st.just("average_applied"), st.integers(0, 2**16)),
        st.tuples(st.just("resume")),
        st.tuples(st.just("pickle")),
        st.tuples(st.just("replace"), st.integers(0, 100)),
    ),
    max_size=STEPS,
)


class Promise:
    """What the manager promises, in float64: the average of each tracked floating tensor, the
    integer buffers it keeps, its counts."""

    def __init__(self, kind: str, model: torch.nn.Module, options: dict) -> None:
        self.kind = kind
        self.options = options
        self.names = [n for n, _ in model.named_parameters()]
        if options["use_buffers"]:
            self.names += [n for n, _ in model.named_buffers()]
        tensors = self.tracked(model)
        self.floating = [n for n in self.names if tensors[n].is_floating_point()]
        self.integer = [n for n in self.names if not tensors[n].is_floating_point()]
        dtype = options["dtype"]
        self.stored_dtype = {n: dtype or tensors[n].dtype for n in self.floating}
        self.average = {
            n: tensors[n].detach().to(self.stored_dtype[n]).double().clone() for n in self.floating
        }
        self.integers = {n: tensors[n].clone() for n in self.integer}
        self.n_averaged = self.n_skipped = self.calls = self.updates = 0
        self.attached = True  # tracking `model`: a replaced parameter is refused

    def tracked(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        everything = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        return {n: everything[n] for n in self.names}

    def weight(self) -> float | None:
        """This update call's weight (after `calls` counted it); None: the call is skipped."""
        if self.kind == "SWA":
            return 1.0 / (self.n_averaged + 1)
        o = self.options
        t = self.calls - o["update_after_step"] - 1
        if t > 0 and t % o["update_every"]:
            return None
        if t <= 0:
            decay = 0.0
        elif o["warmup_gamma"] is None:
            decay = o["decay"]
        else:
            decay = min(o["decay"], 1 - (1 + t / o["warmup_gamma"]) ** -(2 / 3))
        return 1.0 - decay

    def update(self, model: torch.nn.Module) -> None:
        self.calls += 1
        w = self.weight()
        if w is None:
            return
        self.updates += 1
        tensors = self.tracked(model)
        finite = all(tensors[n].isfinite().all() for n in self.floating)
        if self.options["check_finite"] and not finite:
            self.n_skipped += 1
            return
        for n in self.floating:
            self.average[n] += w * (tensors[n].detach().double() - self.average[n])
        for n in self.integer:
            self.integers[n] = tensors[n].clone()
        self.n_averaged += 1

    def tolerance(self, name: str, dtype: torch.dtype) -> float:
        """Rounding allowed: the stored dtype's at every update, then a cast to `dtype`."""
        average = self.average[name]
        scale = 1 + float(average.abs().max()) if average.numel() else 1
        stored = torch.finfo(self.stored_dtype[name]).eps * (self.updates + 2)
        return (stored + torch.finfo(dtype).eps) * scale

    def assert_holds_the_average(self, tensors: dict[str, torch.Tensor]) -> None:
        """`tensors` (the manager's average, or a model given it) hold what was promised."""
        for n in self.floating:
            tol = self.tolerance(n, tensors[n].dtype)
            torch.testing.assert_close(tensors[n].double(), self.average[n], rtol=0, atol=tol, msg=n)
        for n in self.integer:
            assert torch.equal(tensors[n], self.integers[n]), n


def make(kind: str, model: torch.nn.Module, options: dict):
    return swa_fast.SWA(model, **options) if kind == "SWA" else swa_fast.EMA(model, **options)


def step_(model: torch.nn.Module, seed: int, non_finite: bool) -> None:
    """A training step: new values for every floating parameter and buffer, the integer counters
    advanced; with `non_finite`, one NaN in the first parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 2)
            else:
                t.add_(1)
        first = next(model.parameters())
        if non_finite and first.numel():
            first.view(-1)[0] = math.nan


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Bit for bit, NaN where NaN was."""
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=name)


def assert_same(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert_identical(v, before[k], k)


def run(kind: str, model: torch.nn.Module, options: dict, operations: list) -> None:
    trial = Trial(kind, model, options)
    for op, *args in operations:
        getattr(trial, op)(*args)
        trial.assert_state_kept()


class Trial:
    """A manager and the Promise of what it holds, given the operations of OPERATIONS alike (one
    method each, by name) and compared after every one."""

    def __init__(self, kind: str, model: torch.nn.Module, options: dict) -> None:
        self.kind, self.model, self.options = kind, model, options
        self.manager = make(kind, model, options)
        self.promise = Promise(kind, model, options)

    def step(self, seed: int, non_finite: bool) -> None:
        step_(self.model, seed, non_finite=non_finite and self.options["check_finite"])

    def update(self) -> None:
        self.manager.update(self.model)
        self.promise.update(self.model)
        self.promise.attached = True

    def copy_to(self) -> None:
        promise = self.promise
        target = copy.deepcopy(self.model)
        untracked = {k: v.clone() for k, v in target.state_dict().items() if k not in promise.names}
        self.manager.copy_to(target)
        promise.assert_holds_the_average(promise.tracked(target))
        for k, v in untracked.items():
            assert torch.equal(target.state_dict()[k], v), k
        del target  # the only reference: a manager tracking nothing yet lets it go

    def swap(self) -> None:
        if not all(t.isfinite().all() for t in self.model.parameters()):
            return  # a NaN swapped into the average stays there: not the subject here
        promise = self.promise
        live = {n: t.detach().clone() for n, t in promise.tracked(self.model).items()}
        if any(live[n].dtype != promise.stored_dtype[n] for n in promise.floating):
            self._swap_refused()
        else:
            self._swap_exchanged(live)
        promise.attached = True

    def _swap_refused(self) -> None:
        before, kept = snapshot(self.model), copy.deepcopy(self.manager.state_dict()["average"])
        with pytest.raises(ValueError, match="must be kept in its own dtype. Use average_applied"):
            self.manager.swap(self.model)
        assert_same(self.model, before)
        for n, v in self.manager.state_dict()["average"].items():
            assert_identical(v, kept[n], n)

    def _swap_exchanged(self, live: dict[str, torch.Tensor]) -> None:
        promise = self.promise
        self.manager.swap(self.model)
        promise.assert_holds_the_average({**promise.tracked(self.model), **self._integers()})
        for n in promise.floating:  # the average holds the live weights, exactly
            assert_identical(self.manager.state_dict()["average"][n], live[n], n)
            promise.average[n] = live[n].double().clone()

    def average_applied(self, seed: int) -> None:
        before = snapshot(self.model)
        with self.manager.average_applied(self.model):
            self.promise.assert_holds_the_average({**self.promise.tracked(self.model), **self._integers()})
            step_(self.model, seed, non_finite=False)  # what update_bn or a user may change
        assert_same(self.model, before)
        self.promise.attached = True

    def resume(self) -> None:
        state = copy.deepcopy(self.manager.state_dict())
        self.manager = make(self.kind, self.model, self.options)
        self.manager.load_state_dict(state)
        self.promise.attached = True

    def pickle(self) -> None:
        saved = io.BytesIO()
        torch.save(self.manager, saved)
        saved.seek(0)
        self.manager = torch.load(saved, weights_only=False)
        self.promise.attached = False  # it tracks the next model it is given

    def replace(self, index: int) -> None:
        if not self.promise.attached:
            return
        names = [n for n, _ in self.model.named_parameters()]
        name = names[index % len(names)]
        module_name, _, attribute = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        original = getattr(module, attribute)
        kept = copy.deepcopy(self.manager.state_dict())
        setattr(module, attribute, torch.nn.Parameter(original.detach().clone()))
        with pytest.raises(ValueError, match=f"'{name}' was replaced"):
            self.manager.update(self.model)
        setattr(module, attribute, original)
        for n, v in self.manager.state_dict()["average"].items():
            assert_identical(v, kept["average"][n], n)

    def _integers(self) -> dict[str, torch.Tensor]:
        """The integer buffers as the manager keeps them: what a model given the average holds."""
        return {n: self.promise.integers[n] for n in self.promise.integer}

    def assert_state_kept(self) -> None:
        state, promise = self.manager.state_dict(), self.promise
        promise.assert_holds_the_average(state["average"])
        assert state["calls"] == promise.calls and state["updates"] == promise.updates
        assert int(state["n_averaged"]) == promise.n_averaged
        assert int(state["n_skipped"]) == promise.n_skipped


@PROPERTY_SETTINGS
@given(model=small_models(), options=manager_settings("SWA"), operations=OPERATIONS)
def test_swa_keeps_its_promise(model, options, operations):
    run("SWA", model, options, operations)


@PROPERTY_SETTINGS
@given(model=small_models(), options=manager_settings("EMA"), operations=OPERATIONS)
def test_ema_keeps_its_promise(model, options, operations):
    run("EMA", model, options, operations)
