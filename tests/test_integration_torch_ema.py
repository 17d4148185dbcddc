"""swa_fast.integrations.torch_ema.ExponentialMovingAverage against the real torch-ema: the same
training trajectory through both gives the same shadow parameters and update counts at every
update, and state_dicts load both ways.

To one rounding, not bit for bit: torch-ema computes s - (1 - decay) * (s - p) in three rounded
steps, where lerp_ computes torch.lerp's formula in fp32 with one rounding (and its other branch
while 1 - decay >= 0.5: the first updates under use_num_updates). The counts are exact.
"""

from __future__ import annotations

import pytest
import torch
import torch_ema
from conftest import cnn_with_bn
from integration_trajectory import IMAGE_SIDE, assert_refuses_other_models, assert_same, trajectory

from swa_fast.integrations.torch_ema import ExponentialMovingAverage

SETTINGS = {
    "use_num_updates": (torch.float32, dict(decay=0.99)),
    "fixed decay": (torch.float32, dict(decay=0.9, use_num_updates=False)),
    "bf16": (torch.bfloat16, dict(decay=0.9)),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_follows_torch_ema_at_every_update(setting):
    dtype, kwargs = SETTINGS[setting]
    model = cnn_with_bn(IMAGE_SIDE).to(dtype)
    theirs = torch_ema.ExponentialMovingAverage(model.parameters(), **kwargs)
    ours = ExponentialMovingAverage(model.parameters(), **kwargs)
    assert isinstance(ours, torch_ema.ExponentialMovingAverage)
    for step in trajectory(model, 14):
        theirs.update()  # the parameters it was given, through its weak references
        ours.update(model.parameters())
        assert ours.num_updates == theirs.num_updates
        assert_same(theirs.shadow_params, ours.shadow_params, False, f"update {step}")


def test_fp32_average_of_a_bf16_model():
    """dtype=torch.float32 (swa_fast's option): the average torch-ema keeps for an fp32 model with
    the bf16 model's values; copy_to casts it back, and a state_dict round trip keeps it fp32."""
    model = cnn_with_bn(IMAGE_SIDE).to(torch.bfloat16)
    mirror = cnn_with_bn(IMAGE_SIDE)
    mirror.load_state_dict(model.state_dict())
    theirs = torch_ema.ExponentialMovingAverage(mirror.parameters(), decay=0.99)
    ours = ExponentialMovingAverage(model.parameters(), decay=0.99, dtype=torch.float32)
    for step in trajectory(model, 10):
        mirror.load_state_dict(model.state_dict())
        theirs.update()
        ours.update()
        assert_same(theirs.shadow_params, ours.shadow_params, False, f"update {step}")
    resumed = ExponentialMovingAverage(model.parameters(), decay=0.5, dtype=torch.float32)
    resumed.load_state_dict(ours.state_dict())
    assert_same(ours.shadow_params, resumed.shadow_params, True)
    with resumed.average_parameters():
        assert_same([s.to(torch.bfloat16) for s in ours.shadow_params], list(model.parameters()), True)


def test_average_parameters_store_restore_and_in_place_shadow():
    model = cnn_with_bn(IMAGE_SIDE)
    ours = ExponentialMovingAverage(model.parameters(), decay=0.9)
    shadow = list(ours.shadow_params)
    for _ in trajectory(model, 3):
        ours.update()
    assert all(a is b for a, b in zip(shadow, ours.state_dict()["shadow_params"]))
    trained = [p.detach().clone() for p in model.parameters()]
    with ours.average_parameters():
        assert_same(shadow, [p.detach() for p in model.parameters()], True)
    assert_same(trained, [p.detach() for p in model.parameters()], True)


def test_state_dicts_load_both_ways(tmp_path):
    model = cnn_with_bn(IMAGE_SIDE)
    theirs = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.95)
    ours = ExponentialMovingAverage(model.parameters(), decay=0.95)
    steps = trajectory(model, 8)
    for _ in range(4):
        next(steps)
        theirs.update()
        ours.update()
    ours.store()
    torch.save(ours.state_dict(), tmp_path / "ours.pt")
    torch.save(theirs.state_dict(), tmp_path / "theirs.pt")
    resumed_theirs = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.5)
    resumed_ours = ExponentialMovingAverage(model.parameters(), decay=0.5)
    resumed_theirs.load_state_dict(torch.load(tmp_path / "ours.pt"))
    resumed_ours.load_state_dict(torch.load(tmp_path / "theirs.pt"))
    assert (resumed_ours.decay, resumed_ours.num_updates) == (
        resumed_theirs.decay,
        resumed_theirs.num_updates,
    )
    assert resumed_theirs.collected_params is not None and resumed_ours.collected_params is None
    assert_same(theirs.shadow_params, resumed_ours.shadow_params, True)
    assert_same(ours.shadow_params, resumed_theirs.shadow_params, True)
    for _ in steps:
        resumed_theirs.update()
        resumed_ours.update()
    assert resumed_ours.num_updates == 8
    assert_same(resumed_theirs.shadow_params, resumed_ours.shadow_params, False)


def test_to_moves_and_casts_like_torch_ema():
    model = cnn_with_bn(IMAGE_SIDE)
    theirs = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.9)
    ours = ExponentialMovingAverage(model.parameters(), decay=0.9)
    theirs.store()
    ours.store()
    theirs.to(device="cpu", dtype=torch.float64)
    ours.to(device="cpu", dtype=torch.float64)
    assert [s.dtype for s in ours.shadow_params + ours.collected_params] == [torch.float64] * 12
    for _ in trajectory(model, 3):
        theirs.update()
        ours.update()
    assert_same([t.float() for t in theirs.shadow_params], [s.float() for s in ours.shadow_params], False)


def test_bad_input_raises_before_writing():
    model = cnn_with_bn(IMAGE_SIDE)
    ours = ExponentialMovingAverage(model.parameters(), decay=0.9)
    assert_refuses_other_models(ours.update, ours.shadow_params, "Number of parameters")  # torch-ema's check
    assert ours.num_updates == 0
    with pytest.raises(ValueError, match="Decay must be between 0 and 1"):
        ExponentialMovingAverage(model.parameters(), decay=1.5)
    with pytest.raises(ValueError, match="parameter 0 is torch.int64"):
        ExponentialMovingAverage([torch.zeros(3, dtype=torch.long)], decay=0.9)
    with pytest.raises(ValueError, match="dtype must be None or a floating torch.dtype, got torch.int32"):
        ExponentialMovingAverage(model.parameters(), decay=0.9, dtype=torch.int32)
