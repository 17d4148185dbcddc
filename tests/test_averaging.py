"""The native SWA / EMA managers: the math, exact restores, bit-exact resume, clear errors."""

import copy
import io

import numpy as np
import pytest
import torch
from conftest import BF16WithFP32Norm, cnn_with_bn, mlp, perturb_, state_copy, weights

import swa_fast
from swa_fast.placement import OtherDevice

# The batch perturb_ runs through mlp(6, ...) models: 8 rows of 6 inputs.
INPUTS = (8, 6)


def test_swa_is_the_mean_of_what_it_saw():
    model = mlp(6, 5, 2, batch_norm=True)
    swa = swa_fast.SWA(model, use_buffers=True)
    seen = []
    for s in range(5):
        perturb_(model, s, INPUTS)
        seen.append(weights(model))
        swa.update(model)
    swa.copy_to(model)
    for i, got in enumerate(weights(model)):
        stack = torch.stack([w[i] for w in seen])
        if got.is_floating_point():
            torch.testing.assert_close(got, stack.mean(0))
        else:  # num_batches_tracked: copied
            assert torch.equal(got, stack[-1])
    assert swa.n_averaged.item() == 5


def test_ema_matches_the_closed_form_with_warmup():
    model = torch.nn.Linear(3, 3)
    ema = swa_fast.EMA(model, decay=0.9, warmup_gamma=1.0, warmup_power=0.75, update_after_step=2)
    expected = None
    for call in range(1, 12):
        with torch.no_grad():
            model.weight.add_(torch.full_like(model.weight, float(call)))
        t = call - 2 - 1
        decay = 0.0 if t <= 0 else min(0.9, 1 - (1 + t / 1.0) ** -0.75)
        assert ema.decay_at(call) == pytest.approx(decay)
        current = model.weight.detach().double()
        expected = current if expected is None else decay * expected + (1 - decay) * current
        ema.update(model)
    applied = copy.deepcopy(model)
    ema.copy_to(applied)
    torch.testing.assert_close(applied.weight.double(), expected, rtol=1e-6, atol=1e-5)


def test_ema_update_every_skips_calls():
    model = torch.nn.Linear(2, 2)
    ema = swa_fast.EMA(model, decay=0.5, update_every=3)
    applied = 0
    for _ in range(10):
        before = ema.n_averaged.item()
        ema.update(model)
        applied += ema.n_averaged.item() - before
    assert applied == 4  # the first call (a copy), then calls 4, 7, 10


@pytest.mark.parametrize(
    "dtype, use_buffers", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)]
)
def test_average_applied_restores_the_live_model_exactly(dtype, use_buffers):
    """Also after the README's pattern, BatchNorm statistics recomputed for the average in the
    block, whether the average keeps buffers or not."""
    model = mlp(6, 5, 2, batch_norm=True, dtype=dtype)
    swa = swa_fast.SWA(model, use_buffers=use_buffers)
    for s in range(3):
        perturb_(model, s, INPUTS)
        swa.update(model)
    perturb_(model, 10, INPUTS)
    live = state_copy(model)
    with swa.average_applied(model):
        assert not all(torch.equal(v, live[k]) for k, v in model.state_dict().items())
        swa_fast.update_bn([torch.randn(INPUTS, dtype=dtype)], model)
        assert not torch.equal(model[1].running_mean, live["1.running_mean"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, live[name]), name


def test_swap_twice_is_identity():
    model = mlp(6, 5, 2, batch_norm=True)
    swa = swa_fast.SWA(model)
    perturb_(model, 1, INPUTS)
    swa.update(model)
    perturb_(model, 2, INPUTS)
    live = weights(model)
    swa.swap(model)
    swa.swap(model)
    for a, b in zip(weights(model), live):
        assert torch.equal(a, b)


def test_resume_is_bit_exact():
    def run(stop_at=None):
        model = mlp(6, 5, 2, batch_norm=True, dtype=torch.bfloat16)
        ema = swa_fast.EMA(model, decay=0.8, warmup_gamma=2.0, use_buffers=True)
        for s in range(8):
            if s == stop_at:  # a restart: new manager, state loaded from a saved dict
                saved = copy.deepcopy(ema.state_dict())
                ema = swa_fast.EMA(model, decay=0.8, warmup_gamma=2.0, use_buffers=True)
                ema.load_state_dict(saved)
            perturb_(model, s, INPUTS)
            ema.update(model)
        return ema.state_dict()["average"]

    straight, resumed = run(), run(stop_at=4)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_state_dict_of_another_model_raises_and_changes_nothing():
    swa = swa_fast.SWA(mlp(6, 5, 2, batch_norm=True))
    before = copy.deepcopy(swa.state_dict())
    other = swa_fast.SWA(mlp(6, 5, 3, batch_norm=True))
    with pytest.raises(
        ValueError, match=r"'2.weight' has shape \[3, 5\] in the state_dict but \[2, 5\] here"
    ):
        swa.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="no '0.weight'"):
        swa.load_state_dict({"average": {}, "n_averaged": torch.tensor(0), "calls": 0})
    for name, t in swa.state_dict()["average"].items():
        assert torch.equal(t, before["average"][name])


def test_changed_model_is_detected():
    model = mlp(6, 5, 2, batch_norm=True)
    swa = swa_fast.SWA(model)
    model[2] = torch.nn.Linear(5, 2)  # replaced: same shapes, different tensors
    with pytest.raises(ValueError, match="'2.weight' was replaced"):
        swa.update(model)
    model = mlp(6, 5, 2, batch_norm=True)
    swa = swa_fast.SWA(model)
    model.add_module("head", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="it had 6 tensors, it has 8"):
        swa.update(model)
    with pytest.raises(ValueError, match="expected '0.weight', found 'weight'"):
        swa.copy_to(torch.nn.Linear(6, 5))


def test_tied_weights_are_averaged_once_and_their_change_is_detected():
    model = mlp(6, 6, 6, 2)
    model[1].weight = model[0].weight  # tied, as a language model's embedding and output layer
    swa = swa_fast.SWA(model)
    seen = []
    for s in range(3):
        perturb_(model, s, INPUTS)
        seen.append(weights(model))
        swa.update(model)
    assert len(swa.average) == len(list(model.parameters())) == 5
    for got, *values in zip(swa.average.views, *seen):
        torch.testing.assert_close(got, torch.stack(values).mean(0), rtol=1e-6, atol=1e-6)
    model[1].weight = torch.nn.Parameter(model[0].weight.detach().clone())  # untied
    with pytest.raises(ValueError, match="expected '1.bias', found '1.weight'"):
        swa.update(model)


def test_replaced_parameter_is_detected_even_when_it_takes_the_old_ones_id():
    """A parameter dropped and then replaced: CPython gives the new tensor the freed one's id (it
    does every time in this sequence), which an id comparison alone takes for the old tensor."""
    for _ in range(5):
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2))
        swa = swa_fast.SWA(model)
        data = torch.randn(2, 5)
        model[1].weight = None  # the old parameter is freed here
        model[1].weight = torch.nn.Parameter(data)
        with pytest.raises(ValueError, match="'1.weight' was replaced"):
            swa.update(model)


def hook_free_changes():
    """Changes to a model that torch's registration hooks do not see, with the error each gives:
    the walk remembered between updates must see them all the same."""

    def buffers_moved(model):
        model.to(torch.float64)  # Module._apply writes new buffers straight into the dicts

    def layer_deleted(model):
        del model[2]  # __delattr__: no hook

    def parameter_unset(model):
        model[2].weight = None  # no hook for a None

    def written_into_the_dict(model):
        model[2]._parameters["weight"] = torch.nn.Parameter(model[2].weight.detach().clone())

    return [
        pytest.param(buffers_moved, "'1.running_mean' was replaced", id="buffers moved"),
        pytest.param(layer_deleted, "expected '2.weight', found '1.running_mean'", id="layer deleted"),
        pytest.param(parameter_unset, "expected '2.weight', found '2.bias'", id="parameter unset"),
        pytest.param(written_into_the_dict, "'2.weight' was replaced", id="written into the dict"),
    ]


@pytest.mark.parametrize("change, message", hook_free_changes())
def test_changes_no_registration_hook_sees_are_detected(change, message):
    model = mlp(6, 5, 2, batch_norm=True)
    swa = swa_fast.SWA(model, use_buffers=True)
    for s in range(2):  # the walk is remembered from here on
        perturb_(model, s, INPUTS)
        swa.update(model)
    before = copy.deepcopy(swa.state_dict())
    change(model)
    with pytest.raises(ValueError, match=message):
        swa.update(model)
    for name, t in swa.state_dict()["average"].items():
        assert torch.equal(t, before["average"][name]), name


def test_remembered_walk_follows_parameters_registered_anew():
    """Registration (setattr, add_module) walks the model again: a tied weight counts once."""
    model = mlp(6, 6, 6, 2)
    swa = swa_fast.SWA(model)
    swa.update(model)
    model[1].weight = model[0].weight  # tied after the walk: nn.Module lists it once
    with pytest.raises(ValueError, match="expected '1.weight', found '1.bias'"):
        swa.update(model)


def test_resized_parameter_raises_before_writing():
    model = torch.nn.Linear(4, 3)
    swa = swa_fast.SWA(model)
    swa.update(model)
    before = copy.deepcopy(swa.state_dict())
    with torch.no_grad():
        model.weight.data = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"shape \[2, 4\]"):
        swa.update(model)
    for name, t in swa.state_dict()["average"].items():
        assert torch.equal(t, before["average"][name])


def test_wrapped_models_keep_their_names():
    model = mlp(6, 5, 2, batch_norm=True)
    compiled = torch.compile(model)
    swa = swa_fast.SWA(compiled)
    assert swa.names[0] == "0.weight"
    swa.update(compiled)
    swa.update(model)  # the same tensors, wrapped or not
    assert swa.n_averaged.item() == 2


def test_bf16_model_fp32_average_keeps_small_updates():
    model = torch.nn.Linear(16, 16).to(torch.bfloat16)
    swa = swa_fast.SWA(model)
    assert swa.average.views[0].dtype == torch.float32
    total = torch.zeros(16, 16, dtype=torch.float64)
    for s in range(50):
        perturb_(model, s)
        total += model.weight.double()
        swa.update(model)
    torch.testing.assert_close(swa.average.views[0].double(), total / 50, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite_skips_a_non_finite_update(bad):
    model = mlp(6, 5, 2, batch_norm=True)
    swa = swa_fast.SWA(model, check_finite=True, use_buffers=True)
    perturb_(model, 0, INPUTS)
    swa.update(model)
    before = copy.deepcopy(swa.state_dict())
    with torch.no_grad():
        model[2].weight[0, 0] = bad
    swa.update(model)
    assert swa.n_averaged.item() == 1 and swa.n_skipped.item() == 1
    for name, t in swa.state_dict()["average"].items():
        assert torch.equal(t, before["average"][name]), name
    with torch.no_grad():
        model[2].weight[0, 0] = 0.5
    swa.update(model)  # finite again: counted
    assert swa.n_averaged.item() == 2 and swa.n_skipped.item() == 1


def test_without_check_finite_nan_enters_the_average_as_in_torch():
    model = torch.nn.Linear(2, 2)
    swa = swa_fast.SWA(model)
    swa.update(model)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    swa.update(model)
    assert swa.average.views[0].isnan().any()


def staged(manager, model):
    """Route `manager`'s updates through a copy of the model, as `device="cpu"` does for a GPU model
    (on this CPU-only machine the model and the average cannot be on different devices)."""
    tensors = manager.tracked.tensors(model)
    manager._placement = OtherDevice(manager.tracked, tensors, torch.device("cpu"), pin_memory=False)
    return manager


def test_a_refused_update_of_an_average_kept_elsewhere_stages_nothing():
    """A model tensor given another shape makes the staging copy refuse the update: the next update
    must not apply the previous one's staged tensors again with the refused update's weight."""
    model = mlp(6, 5, 2)
    direct, deferred = swa_fast.SWA(model), staged(swa_fast.SWA(model), model)
    managers = (direct, deferred)
    for manager in managers:
        manager.update(model)
    weight = model[0].weight
    kept = weight.data
    weight.data = torch.zeros(3, 3)
    for manager in managers:
        with pytest.raises(ValueError, match="shape"):
            manager.update(model)
    weight.data = kept
    perturb_(model, 1, INPUTS)
    for manager in managers:
        manager.update(model)
    state, expected = deferred.state_dict(), direct.state_dict()
    assert state["updates"] == expected["updates"] == 2
    for name, value in expected["average"].items():
        assert torch.equal(state["average"][name], value), name


@pytest.mark.parametrize(
    "make",
    [
        lambda m: swa_fast.SWA(m, use_buffers=True),
        lambda m: swa_fast.EMA(m, decay=0.8, update_after_step=1, update_every=2, use_buffers=True),
        lambda m: swa_fast.SWAG(m, max_rank=2, use_buffers=True),
        lambda m: swa_fast.SWA(m, check_finite=True),
    ],
    ids=["swa", "ema", "swag", "swa-check-finite"],
)
def test_an_average_kept_elsewhere_applies_each_update_at_the_next_call_or_read(make):
    model = mlp(6, 5, 2, batch_norm=True)
    direct, deferred = make(model), staged(make(model), model)
    for s in range(6):
        perturb_(model, s, INPUTS)
        direct.update(model)
        deferred.update(model)
        assert deferred.updates <= direct.updates  # the latest update may still be on its way
    state, expected = deferred.state_dict(), direct.state_dict()  # a read applies it
    assert state["updates"] == expected["updates"] == direct.updates
    for key in ("average", "sq", "deviation"):
        for name, value in expected.get(key, {}).items():
            assert torch.equal(state[key][name], value), (key, name)
    assert torch.equal(state["n_averaged"], expected["n_averaged"])
    perturb_(model, 99, INPUTS)
    deferred.update(model)
    direct.update(model)
    averaged = direct.state_dict()["average"].keys()
    with deferred.average_applied(model):
        inside = {k: v.clone() for k, v in model.state_dict().items() if k in averaged}
    direct.copy_to(probe := mlp(6, 5, 2, batch_norm=True))
    for name, value in inside.items():
        assert torch.equal(value, probe.state_dict()[name]), name


def test_swap_refuses_an_average_kept_on_another_device():
    model = mlp(6, 5, 2, batch_norm=True)
    swa = staged(swa_fast.SWA(model, dtype=None), model)
    swa.update(model)
    before = weights(model)
    with pytest.raises(ValueError, match="average_applied"):
        swa.swap(model)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))


def test_swap_of_an_average_in_another_dtype_says_what_to_use_instead_and_changes_nothing():
    """An fp32 average (the default) of a bf16 model cannot be exchanged in place: the error names
    the tensor and points to average_applied / copy_to, or dtype=None."""
    model = BF16WithFP32Norm()
    ema = swa_fast.EMA(model, decay=0.5)
    ema.update(model)
    perturb_(model, 1)
    live, average = weights(model), [v.clone() for v in ema.average.views]
    with pytest.raises(
        ValueError,
        match=r"average is torch.float32 but 'inner.weight' is torch.bfloat16.*average_applied\(model\)",
    ) as info:
        ema.swap(model)
    assert "copy_to(model)" in str(info.value) and "dtype=None" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(weights(model), live))
    assert all(torch.equal(a, b) for a, b in zip(ema.average.views, average))


def test_side_stream_needs_a_gpu_model():
    with pytest.raises(ValueError, match="CUDA GPU"):
        swa_fast.SWA(mlp(6, 5, 2, batch_norm=True), side_stream=True)


@pytest.mark.parametrize("backend", ["cpu", "foreach", "reference"])
@pytest.mark.parametrize(
    "make, check_finite",  # (SWAG refuses check_finite)
    [
        (swa_fast.SWA, False),
        (swa_fast.SWA, True),
        (swa_fast.EMA, False),
        (swa_fast.EMA, True),
        (swa_fast.SWAG, False),
    ],
)
def test_update_outside_no_grad_records_no_graph(make, check_finite, backend):
    model = mlp(6, 5, 2, batch_norm=True)
    manager = make(model, use_buffers=True, check_finite=check_finite, backend=backend)
    assert torch.is_grad_enabled()
    for s in range(3):
        perturb_(model, s, INPUTS)
        manager.update(model)
    kept = [*manager.average.views, manager.n_averaged, manager.n_skipped]
    assert not any(t.requires_grad or t.grad_fn is not None for t in kept)
    assert all(p.grad is None for p in model.parameters())


# --- strided model tensors, exact restores, several flat groups ------------------------------------


def strided_models():
    """A channels_last CNN (its convolution weight is strided) and an MLP whose first weight is a
    transposed view: models that can be averaged and must also receive the average."""
    cnn = cnn_with_bn(6, in_channels=3).to(memory_format=torch.channels_last)
    transposed = mlp(6, 5, 2, batch_norm=True)
    transposed[0].weight.data = transposed[0].weight.data.t().contiguous().t()
    return {"channels_last": (cnn, (8, 3, 6, 6)), "transposed": (transposed, INPUTS)}


@pytest.mark.parametrize("backend", ["cpu", "foreach", "reference"])
@pytest.mark.parametrize("kind", ["channels_last", "transposed"])
def test_strided_model_tensors_receive_the_average(kind, backend):
    model, inputs = strided_models()[kind]
    assert not all(p.is_contiguous() for p in model.parameters())
    swa = swa_fast.SWA(model, dtype=None, backend=backend)
    seen = []
    for s in range(3):
        perturb_(model, s, inputs)
        seen.append(weights(model, buffers=False))
        swa.update(model)
    mean = [torch.stack(values).mean(0) for values in zip(*seen)]
    live = weights(model)
    with swa.average_applied(model):
        for got, want in zip(model.parameters(), mean):
            torch.testing.assert_close(got, want)
    assert all(torch.equal(a, b) for a, b in zip(weights(model), live))
    target = copy.deepcopy(model)
    swa.copy_to(target)
    for got, want in zip(target.parameters(), mean):
        torch.testing.assert_close(got, want)
    swa.swap(model)  # the model holds the average, the average the live weights
    for got, want in zip(model.parameters(), mean):
        torch.testing.assert_close(got, want)
    swa.swap(model)
    assert all(torch.equal(a, b) for a, b in zip(weights(model), live))
    assert not all(p.is_contiguous() for p in model.parameters())  # written through, not replaced


def test_complex_tensors_are_refused_at_construction():
    model = mlp(6, 5, 2)
    model[0].weight.data = model[0].weight.data.to(torch.complex64)
    for make in (swa_fast.SWA, swa_fast.EMA, swa_fast.SWAG):
        with pytest.raises(ValueError, match="'0.weight' is complex"):
            make(model)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_a_non_floating_average_dtype_is_refused_at_construction(dtype):
    with pytest.raises(ValueError, match=f"dtype must be .* got {dtype}"):
        swa_fast.SWA(mlp(6, 5, 2), dtype=dtype)


def test_several_flat_groups_are_all_checked_before_any_is_written():
    model = BF16WithFP32Norm()
    swa = swa_fast.SWA(model, dtype=None)  # a bf16 group, then an fp32 one
    assert len(swa.average.groups) == 2
    swa.update(model)
    perturb_(model, 1)
    swa.update(model)
    kept = [v.clone() for v in swa.average.views]

    wider = BF16WithFP32Norm()
    wider.norm = torch.nn.LayerNorm(4)  # the fp32 group (written second) no longer fits
    untouched = weights(wider)
    with pytest.raises(ValueError, match=r"'norm.weight' has shape \[4\]"):
        swa.copy_to(wider)
    assert all(torch.equal(a, b) for a, b in zip(weights(wider), untouched))

    with torch.no_grad():
        model.norm.weight.data = torch.ones(4)  # resized in place of the tracked parameter
    with pytest.raises(ValueError, match=r"'norm.weight' has shape \[4\]"):
        swa.update(model)
    assert all(torch.equal(a, b) for a, b in zip(swa.average.views, kept))


def test_a_resized_parameter_is_named_in_the_error():
    model = torch.nn.Linear(4, 3)
    swa = swa_fast.SWA(model)
    model.weight.data = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"'weight' has shape \[2, 4\]"):
        swa.update(model)


# --- settings: any real number, checked at construction --------------------------------------------


@pytest.mark.parametrize(
    "decay",
    [np.float32(0.75), np.float64(0.75), torch.tensor(0.75, dtype=torch.bfloat16), torch.tensor(0.75)],
)
def test_ema_takes_a_decay_torch_takes(decay):
    model = mlp(6, 5, 2)
    ema, plain = swa_fast.EMA(model, decay=decay), swa_fast.EMA(model, decay=0.75)
    for s in range(3):
        perturb_(model, s)
        ema.update(model)
        plain.update(model)
    assert type(ema.decay) is float
    assert all(torch.equal(a, b) for a, b in zip(ema.average.views, plain.average.views))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"decay": 1.5}, "decay must be a finite real number in"),
        ({"decay": float("nan")}, "decay must be"),
        ({"decay": torch.tensor([0.5])}, "decay must be"),
        ({"decay": 0.5j}, "decay must be"),
        ({"decay": "0.9"}, "decay must be"),
        ({"warmup_gamma": 0}, "warmup_gamma must be a finite real number > 0"),
        ({"warmup_gamma": -1.0}, "warmup_gamma must be"),
        ({"warmup_gamma": 1.0, "warmup_power": -0.5}, "warmup_power must be"),
    ],
)
def test_ema_settings_are_checked_at_construction(settings, message):
    with pytest.raises(ValueError, match=message):
        swa_fast.EMA(mlp(6, 5, 2), **settings)


# --- models with nothing, or with empty tensors, to check ------------------------------------------


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_check_finite_with_a_zero_size_parameter_and_without_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 0), torch.nn.Linear(0, 2))  # empty weights
    swa = swa_fast.SWA(model, check_finite=True)
    perturb_(model, 0)
    swa.update(model)
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    swa.update(model)
    assert swa.n_averaged.item() == 1 and swa.n_skipped.item() == 1
    empty = torch.nn.ReLU()
    nothing = swa_fast.EMA(empty, check_finite=True)
    nothing.update(empty)
    nothing.update(empty)
    assert nothing.n_averaged.item() == 2 and nothing.n_skipped.item() == 0


# --- pickling, and malformed states ----------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda m: swa_fast.SWA(m, use_buffers=True),
        lambda m: swa_fast.EMA(m, decay=0.5, dtype=None),
        lambda m: swa_fast.SWAG(m, max_rank=2),
    ],
    ids=["swa", "ema", "swag"],
)
@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_a_pickled_manager_copies_and_continues_like_the_original(make, how):
    model = BF16WithFP32Norm()
    manager = make(model)
    for s in range(3):
        perturb_(model, s)
        manager.update(model)
    if how == "torch.save":
        saved = io.BytesIO()
        torch.save(manager, saved)
        saved.seek(0)
        loaded = torch.load(saved, weights_only=False)
    else:
        loaded = copy.deepcopy(manager)
    original_copy, loaded_copy = BF16WithFP32Norm(seed=1), BF16WithFP32Norm(seed=2)
    manager.copy_to(original_copy)
    loaded.copy_to(loaded_copy)  # a model of the same architecture: tracked from now on
    assert all(torch.equal(a, b) for a, b in zip(weights(original_copy), weights(loaded_copy)))
    perturb_(model, 9)
    manager.update(model)
    loaded.update(model)
    for key, value in manager.state_dict().items():
        if isinstance(value, dict):
            for name, tensor in value.items():
                assert torch.equal(loaded.state_dict()[key][name], tensor), (key, name)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(loaded.state_dict()[key], value), key
        else:
            assert loaded.state_dict()[key] == value, key


def _saved_bytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


@pytest.mark.parametrize("make", [swa_fast.SWA, lambda m: swa_fast.SWAG(m, max_rank=0)], ids=["swa", "swag"])
def test_a_saved_part_of_a_state_dict_holds_only_its_own_bytes(make):
    """The average lives in one flat buffer and torch.save writes a view's whole storage: a part of
    `state_dict()` is saved in the bytes of its own tensors, and the entries are still the average
    (no copy: a load into them, or DCP's, writes the buffer)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(200, 200), torch.nn.Linear(10, 10))
    manager = make(model)
    manager.update(model)
    state = manager.state_dict()
    for key in ("average", "sq") if "sq" in state else ("average",):
        head = {k: v for k, v in state[key].items() if k.startswith("1.")}
        assert _saved_bytes(head) == _saved_bytes({k: v.clone() for k, v in head.items()}) < 4_000, key
    assert _saved_bytes(state) <= _saved_bytes(copy.deepcopy(state))
    assert state["average"]["0.weight"].data_ptr() == manager.average.views[0].data_ptr()
    saved = copy.deepcopy(state)
    perturb_(model, 1)
    manager.update(model)
    manager.load_state_dict(saved)
    assert all(torch.equal(v, saved["average"][k]) for k, v in manager.state_dict()["average"].items())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update(calls="abc"), "'calls' must be a count"),
        (lambda s: s.update(n_averaged=torch.tensor([1, 2])), "'n_averaged' must be a count"),
        (lambda s: s.update(n_skipped=-1), "'n_skipped' must be a count"),
        (lambda s: s.update(updates=1.5), "'updates' must be a count"),
        (lambda s: s.pop("calls"), r"missing \['calls'\]"),
    ],
)
def test_a_malformed_state_is_refused_before_the_average_is_written(change, message):
    model = mlp(6, 5, 2, batch_norm=True)
    swa = swa_fast.SWA(model)
    swa.update(model)
    state = copy.deepcopy(swa.state_dict())
    for value in state["average"].values():
        value.add_(1)  # a load that went ahead would show
    change(state)
    kept = [v.clone() for v in swa.average.views]
    with pytest.raises(ValueError, match=message):
        swa.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(swa.average.views, kept))
    assert swa.n_averaged.item() == 1 and swa.calls == 1
