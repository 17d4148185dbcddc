"""The pieces every manager's update is made of: the weights and settings of weighting.py,
UpdateCounts, FlatBuffer and writes into strided tensors, and Averager.update_from (what FGE.to_swa
builds an SWA from)."""

import pickle

import numpy as np
import pytest
import torch

import swa_fast
from swa_fast.counts import UpdateCounts
from swa_fast.flat import FlatBuffer, write_through_strides
from swa_fast.weighting import ema_decay, ema_weight, real_number, swa_weight


def test_swa_weight_is_one_over_n_plus_one_on_the_host_and_on_a_count_tensor():
    assert [swa_weight(n) for n in range(4)] == [1.0, 0.5, 1 / 3, 0.25]
    assert swa_weight(torch.tensor(3)) == 0.25  # a CPU count is read, not computed on


def test_ema_decay_copies_first_then_decays_with_timms_warmup():
    assert ema_decay(0.9, 0) == 0.0 and ema_decay(0.9, 1) == 0.9
    # timm's ModelEmaV3 warmup: 1 - (1 + t / gamma) ** -power, capped at the decay
    assert ema_decay(0.999, 3, warmup_gamma=1.0, warmup_power=1.0) == pytest.approx(1 - 1 / 4)
    assert ema_decay(0.5, 3, warmup_gamma=1.0, warmup_power=1.0) == 0.5
    assert ema_weight(0.9, 0) == 1.0 and ema_weight(0.9, torch.tensor(5)) == pytest.approx(0.1)


@pytest.mark.parametrize("warmup", [None, (2.0, 2 / 3), (10.0, 1.0)])
def test_the_weights_from_a_count_tensor_are_the_host_ones_bit_for_bit(warmup):
    """A capturable update works its weights out on the device: the same rules in the same float64
    arithmetic, so its average is the host-scheduled one's exactly."""
    gamma, power = warmup or (None, 2 / 3)
    for t in range(-3, 60):
        on_device = ema_decay(0.999, torch.tensor(t), gamma, power)
        assert on_device.dtype == torch.float64 and on_device.item() == ema_decay(0.999, t, gamma, power), t
    for n in range(60):
        assert swa_weight(torch.tensor(n), capturable=True).item() == swa_weight(n)


def test_counts_stay_on_the_host_until_read_unless_the_device_decides():
    counts = UpdateCounts(torch.device("cpu"), device_decides=False)
    counts.add()
    counts.add()
    assert counts.current() == 2 and counts.n_averaged.item() == 2
    counts.set(torch.tensor(7), 1)
    assert counts.current() == 7 and counts.n_skipped.item() == 1
    on_device = UpdateCounts(torch.device("cpu"), device_decides=True)
    on_device.add(torch.tensor(True))
    on_device.add(torch.tensor(False))
    assert on_device.n_averaged.item() == 1 and on_device.n_skipped.item() == 1
    assert isinstance(on_device.current(), torch.Tensor)


def test_update_from_tensors_laid_out_as_the_model_equals_updates_from_the_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    direct, stored = swa_fast.SWA(model, use_buffers=True), swa_fast.SWA(model, use_buffers=True)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(5, 3))  # BatchNorm statistics and its integer counter move too
        direct.update(model)
        copies = [
            t.detach().clone().to(torch.float64 if t.is_floating_point() else t.dtype)
            for t in direct.tracked.tensors(model)
        ]
        stored.update_from(copies)
    got, want = stored.state_dict(), direct.state_dict()
    assert got["updates"] == want["updates"] == 3 and got["calls"] == 3
    for name, value in want["average"].items():
        torch.testing.assert_close(got["average"][name], value, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="expected 7 tensors"):
        stored.update_from(copies[:2])


def test_a_state_dict_saved_with_the_older_folds_key_resumes():
    model = torch.nn.Linear(2, 2)
    ema = swa_fast.EMA(model, decay=0.5, update_every=2)
    for _ in range(3):
        ema.update(model)
    state = ema.state_dict()
    state["folds"] = state.pop("updates")
    resumed = swa_fast.EMA(model, decay=0.5, update_every=2)
    resumed.load_state_dict(state)
    assert resumed.updates == ema.updates == 2 and resumed.calls == 3


def test_real_number_takes_what_torch_takes_and_says_what_came():
    assert real_number(np.float32(0.5), "x", 0.0, 1.0) == 0.5
    assert real_number(torch.tensor(0.25, dtype=torch.bfloat16), "x", 0.0, 1.0) == 0.25
    assert type(real_number(np.float64(0.5), "x")) is float
    for bad in (1.5, -0.1, float("nan"), float("inf"), 0.5j, torch.tensor([0.5]), "0.5", None):
        expected = r"swa_fast.EMA: decay must be a finite real number in \[0.0, 1.0\]"
        with pytest.raises(ValueError, match=expected):
            real_number(bad, "EMA: decay", 0.0, 1.0)
    with pytest.raises(ValueError, match="must be a finite real number > 0.0, got 0"):
        real_number(0, "gamma", 0.0, above_low=True)


def test_write_through_strides_reaches_strided_tensors_and_leaves_them_when_the_op_raises():
    contiguous, transposed = torch.zeros(2, 3), torch.zeros(3, 2).t()
    src = [torch.randn(2, 3), torch.randn(2, 3)]
    write_through_strides([contiguous, transposed], lambda dst: swa_fast.copy_(dst, src))
    assert torch.equal(contiguous, src[0]) and torch.equal(transposed, src[1])
    assert not transposed.is_contiguous()
    kept = transposed.clone()
    other = [torch.randn(2, 3), torch.randn(3, 3)]  # the second does not fit: copy_ raises
    with pytest.raises(ValueError, match="shape"):
        write_through_strides([contiguous, transposed], lambda dst: swa_fast.copy_(dst, other))
    assert torch.equal(transposed, kept) and torch.equal(contiguous, src[0])
    a = [torch.randn(2, 3)]
    b = [torch.randn(3, 2).t()]
    before = a[0].clone(), b[0].clone()
    write_through_strides(b, lambda stand_ins: swa_fast.swap_(a, stand_ins), keep_values=True)
    assert torch.equal(a[0], before[1]) and torch.equal(b[0], before[0])


def test_a_pickled_flat_buffer_keeps_its_views_in_its_buffers():
    buffer = FlatBuffer([torch.randn(2, 3), torch.randn(4, dtype=torch.float64), torch.randn(5)])
    loaded = pickle.loads(pickle.dumps(buffer))
    for group in loaded.groups:
        group.buffer.add_(1)
    for view, kept in zip(loaded.views, buffer.views):
        assert torch.equal(view, kept + 1)
