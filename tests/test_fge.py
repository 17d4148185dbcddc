"""FGE snapshots: taken exactly at the cycle minima, an ensemble equal to separately saved models,
exact restore, storage dtype round trips, the full-store policy, state_dict round trips."""

import copy
import io

import pytest
import torch
from conftest import cnn_with_bn, random_batch, state_copy, train_step

import swa_fast

# cnn_with_bn(6)'s input: one-channel 6x6 images, of 3 classes.
IMAGE = (1, 6, 6)


def assert_same_state(model, state):
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k


def test_automatic_snapshots_are_taken_exactly_at_the_minima():
    model = cnn_with_bn(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = swa_fast.FGECyclicLR(opt, lr_max=0.1, lr_min=0.001, cycle_length=4)
    fge = swa_fast.FGE(model, scheduler=sched)
    x, y = random_batch(16, IMAGE, classes=3)
    expected = []  # the model right after each step taken at the minimum rate
    for _ in range(12):
        at_min = opt.param_groups[0]["lr"] == pytest.approx(0.001)
        train_step(model, opt, x, y)
        if at_min:
            expected.append(state_copy(model))
        sched.step()
    assert len(expected) == 3 and len(fge) == 3 and fge.n_taken == 3
    probe = cnn_with_bn(6)
    for snapshot, state in zip(fge.snapshots, expected):
        snapshot.load(fge.tracked.tensors(probe))
        assert_same_state(probe, state)
    fge.close()
    train_step(model, opt, x, y)
    for _ in range(4):
        sched.step()
        train_step(model, opt, x, y)
    assert len(fge) == 3  # no hook any more


def test_ensemble_equals_the_mean_of_separately_saved_models_and_restores_exactly():
    model = cnn_with_bn(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    fge = swa_fast.FGE(model)
    saved = []
    for s in range(3):
        x, y = random_batch(16, IMAGE, classes=3, seed=s)
        for _ in range(3):
            train_step(model, opt, x, y)
        fge.snapshot(model)
        saved.append(copy.deepcopy(model))
    # The live model differs from every snapshot.
    train_step(model, opt, *random_batch(16, IMAGE, classes=3, seed=9))
    model.train()
    live = state_copy(model)
    x_test, _ = random_batch(10, IMAGE, classes=3, seed=100)
    probs = fge.predict(model, x_test)
    logits = fge.predict(model, x_test, output="logits")
    with torch.no_grad():
        expected = torch.stack([m.eval()(x_test).softmax(-1) for m in saved]).mean(0)
        expected_logits = torch.stack([m.eval()(x_test) for m in saved]).mean(0)
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-6, atol=1e-6)
    assert_same_state(model, live)
    assert model.training and all(m.training for m in model.modules())


def two_snapshots():
    """cnn_with_bn(6) and an FGE of two different snapshots of it."""
    model = cnn_with_bn(6)
    fge = swa_fast.FGE(model)
    fge.snapshot(model)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    fge.snapshot(model)
    return model, fge


def test_predict_loader_concatenates_batches():
    model, fge = two_snapshots()
    x, y = random_batch(12, IMAGE, classes=3, seed=3)
    loader = [(x[:5], y[:5]), (x[5:], y[5:])]
    torch.testing.assert_close(fge.predict_loader(model, loader), fge.predict(model, x), rtol=1e-6, atol=1e-7)


def test_a_loader_that_changes_between_passes_raises():
    model = cnn_with_bn(6)
    fge = swa_fast.FGE(model)
    fge.snapshot(model)
    fge.snapshot(model)
    x, _ = random_batch(16, IMAGE, classes=3, seed=4)
    shuffled = iter([[x[:8], x[8:]], [x[:4], x[4:]]])

    class Reshuffling:
        def __iter__(self):
            return iter(next(shuffled))

    with pytest.raises(ValueError, match="shuffle=False"):
        fge.predict_loader(model, Reshuffling())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_storage_round_trips_within_its_precision(dtype):
    model = cnn_with_bn(6)
    fge = swa_fast.FGE(model, dtype=dtype)
    before = state_copy(model)
    fge.snapshot(model)
    assert all(v.dtype == dtype for v in fge.snapshots[0].flat.views)
    assert fge.nbytes() < sum(t.numel() * t.element_size() for t in before.values())
    probe = cnn_with_bn(6)
    with torch.no_grad():
        for p in probe.parameters():
            p.zero_()
    fge.snapshots[0].load(fge.tracked.tensors(probe))
    eps = torch.finfo(dtype).eps
    for k, v in probe.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, before[k], rtol=eps, atol=0)
            assert v.dtype == torch.float32
        else:
            assert torch.equal(v, before[k])


def test_drop_oldest_keeps_the_latest_and_reuses_storage():
    model = torch.nn.Linear(3, 2)
    fge = swa_fast.FGE(model, max_snapshots=2)
    for value in range(4):
        with torch.no_grad():
            model.weight.fill_(value)
        fge.snapshot(model)
    first_storage = fge.snapshots[0].flat.groups[0].buffer.data_ptr()
    assert [s.flat.views[0][0, 0].item() for s in fge.snapshots] == [2.0, 3.0]
    assert fge.n_taken == 4
    fge.snapshot(model)
    assert fge.snapshots[-1].flat.groups[0].buffer.data_ptr() == first_storage


def test_raise_when_full_keeps_the_store():
    model = torch.nn.Linear(3, 2)
    fge = swa_fast.FGE(model, max_snapshots=1, when_full="raise")
    fge.snapshot(model)
    kept = fge.snapshots[0].flat.views[0].clone()
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(RuntimeError, match="full"):
        fge.snapshot(model)
    assert len(fge) == 1 and torch.equal(fge.snapshots[0].flat.views[0], kept)


def test_to_swa_is_the_mean_of_the_snapshots():
    model = cnn_with_bn(6)
    fge = swa_fast.FGE(model, dtype=torch.float64)
    states = []
    for s in range(4):
        batch = random_batch(16, IMAGE, classes=3, seed=s)
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), *batch)
        fge.snapshot(model)
        states.append(state_copy(model))
    swa = fge.to_swa(model)
    assert swa.n_averaged.item() == 4 and swa.state_dict()["updates"] == 4
    probe = cnn_with_bn(6)
    swa.copy_to(probe)
    for k, v in probe.state_dict().items():
        stacked = torch.stack([st[k] for st in states])
        if v.is_floating_point():
            torch.testing.assert_close(v, stacked.double().mean(0).float(), rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(v, stacked[-1])


def test_state_dict_round_trip_through_torch_save():
    model = cnn_with_bn(6)
    fge = swa_fast.FGE(model, max_snapshots=3, dtype=torch.bfloat16)
    for s in range(2):
        batch = random_batch(16, IMAGE, classes=3, seed=s)
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), *batch)
        fge.snapshot(model)
    buffer = io.BytesIO()
    torch.save(fge.state_dict(), buffer)
    buffer.seek(0)
    restored = swa_fast.FGE(cnn_with_bn(6), max_snapshots=3, dtype=torch.bfloat16)
    restored.load_state_dict(torch.load(buffer))
    assert len(restored) == 2 and restored.n_taken == 2
    x, _ = random_batch(16, IMAGE, classes=3, seed=7)
    assert torch.equal(restored.predict(model, x), fge.predict(model, x))


def test_loading_another_models_snapshots_raises_and_changes_nothing():
    fge = swa_fast.FGE(cnn_with_bn(6))
    fge.snapshot(cnn_with_bn(6))
    other = swa_fast.FGE(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    other.snapshot(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="has no '0.weight'|has shape"):
        fge.load_state_dict(other.state_dict())
    assert len(fge) == 1
    small = swa_fast.FGE(cnn_with_bn(6), max_snapshots=1)
    state = fge.state_dict()
    state["snapshots"] = state["snapshots"] * 2
    with pytest.raises(ValueError, match="at most 1"):
        small.load_state_dict(state)


def test_snapshot_of_a_changed_model_raises():
    model = torch.nn.Linear(3, 2)
    fge = swa_fast.FGE(model)
    model.weight = torch.nn.Parameter(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="'weight' was replaced"):
        fge.snapshot(model)
    assert len(fge) == 0


def test_predict_without_snapshots_raises():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="no members"):
        swa_fast.FGE(model).predict(model, torch.zeros(1, 3))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_snapshots=0), "max_snapshots"),
        (dict(when_full="drop_newest"), "when_full"),
        (dict(scheduler=object()), "FGECyclicLR"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        swa_fast.FGE(torch.nn.Linear(2, 2), **kwargs)


def test_a_one_shot_loader_raises_instead_of_averaging_with_empty_passes():
    model, fge = two_snapshots()
    model.train()
    live = state_copy(model)
    x, _ = random_batch(12, IMAGE, classes=3, seed=5)
    one_shot = (x[i : i + 4] for i in range(0, 12, 4))
    with pytest.raises(ValueError, match="3 batches for the first ensemble member and 0 for member 2"):
        fge.predict_loader(model, one_shot)
    assert_same_state(model, live)
    assert model.training
    # The same batches in a list (iterable again and again) give the ensemble's mean.
    probs = fge.predict_loader(model, [x[i : i + 4] for i in range(0, 12, 4)])
    torch.testing.assert_close(probs.sum(-1), torch.ones(12))


def test_an_empty_loader_raises():
    model = cnn_with_bn(6)
    fge = swa_fast.FGE(model)
    fge.snapshot(model)
    with pytest.raises(ValueError, match="no batches"):
        fge.predict_loader(model, [])


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinning works where there is a GPU")
def test_pin_memory_without_a_gpu_warns_and_stores_unpinned():
    model = cnn_with_bn(6)
    with pytest.warns(UserWarning, match="pin_memory"):
        fge = swa_fast.FGE(model, device="cpu", pin_memory=True)
    fge.snapshot(model)
    assert not fge.snapshots[0].flat.groups[0].buffer.is_pinned()
    probe = cnn_with_bn(6)
    with torch.no_grad():
        for p in probe.parameters():
            p.zero_()
    fge.snapshots[0].load(fge.tracked.tensors(probe))
    assert_same_state(probe, state_copy(model))


@pytest.mark.parametrize("max_snapshots", [1, 2])
def test_a_failed_snapshot_into_a_full_store_keeps_every_snapshot(max_snapshots):
    model = torch.nn.Linear(3, 2)
    fge = swa_fast.FGE(model, max_snapshots=max_snapshots)
    for value in range(max_snapshots):
        with torch.no_grad():
            model.weight.fill_(value)
        fge.snapshot(model)
    kept = [s.flat.groups[0].buffer.clone() for s in fge.snapshots]
    model.weight.data = torch.zeros(2, 4)  # the same Parameter, another shape
    with pytest.raises(ValueError, match=r"'weight' has shape \[2, 4\], its snapshots \[2, 3\]"):
        fge.snapshot(model)
    assert len(fge) == max_snapshots and fge.n_taken == max_snapshots
    assert all(torch.equal(s.flat.groups[0].buffer, k) for s, k in zip(fge.snapshots, kept))
