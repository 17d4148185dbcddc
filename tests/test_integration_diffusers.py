"""swa_fast.integrations.diffusers.EMAModel against the real diffusers EMAModel: the same training
trajectory through both gives the same shadow parameters, decay and step count at every step
(warmup and update_after_step phases included), and state_dicts and save_pretrained checkpoints
load both ways.

To one rounding, not bit for bit: diffusers computes s - (1 - decay) * (s - p) with separate
roundings (foreach=False: three; foreach=True: torch's sub_ with alpha), where lerp_ computes
torch.lerp's formula in fp32 with one rounding (and its other branch when 1 - decay >= 0.5, the
first steps); in bf16 diffusers also rounds each intermediate to bf16. The decay, step count and
which parameters are copied are exact.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cnn_with_bn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.training_utils import EMAModel as DiffusersEMAModel
from integration_trajectory import IMAGE_SIDE, assert_refuses_other_models, assert_same, trajectory

from swa_fast.integrations.diffusers import EMAModel

SETTINGS = {
    "defaults": (torch.float32, dict(decay=0.9999), False),
    "foreach, update_after_step": (torch.float32, dict(decay=0.95, update_after_step=3, foreach=True), False),
    "warmup, min_decay": (
        torch.float32,
        dict(decay=0.99, use_ema_warmup=True, inv_gamma=2.0, power=0.75, min_decay=0.4, update_after_step=1),
        False,
    ),
    "frozen parameter": (torch.float32, dict(decay=0.9), True),
    "frozen parameter, foreach": (torch.float32, dict(decay=0.9, foreach=True), True),
    "bf16": (torch.bfloat16, dict(decay=0.9, foreach=True), False),
}


class TinyDenoiser(ModelMixin, ConfigMixin):
    """A diffusers model class (what `model_cls` is in training scripts) around conftest's CNN."""

    @register_to_config
    def __init__(self, side: int = IMAGE_SIDE):
        super().__init__()
        self.net = cnn_with_bn(side)

    def forward(self, x):
        return self.net(x)


def _frozen_bias_moves(model: torch.nn.Module) -> None:
    """A parameter that does not require grad but changes (diffusers copies it each step)."""
    with torch.no_grad():
        model[0].bias.add_(0.5)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_follows_diffusers_at_every_step(setting):
    dtype, kwargs, frozen = SETTINGS[setting]
    model = cnn_with_bn(IMAGE_SIDE).to(dtype)
    if frozen:
        model[0].bias.requires_grad_(False)
    theirs, ours = DiffusersEMAModel(model.parameters(), **kwargs), EMAModel(model.parameters(), **kwargs)
    assert isinstance(ours, DiffusersEMAModel)
    for step in trajectory(model, 14):
        if frozen:
            _frozen_bias_moves(model)
        theirs.step(model.parameters())
        ours.step(model.parameters())
        assert (ours.optimization_step, ours.cur_decay_value) == (
            theirs.optimization_step,
            theirs.cur_decay_value,
        )
        assert_same(theirs.shadow_params, ours.shadow_params, False, f"step {step}")
        if frozen:
            assert torch.equal(ours.shadow_params[1], model[0].bias)


def test_fp32_average_of_a_bf16_model():
    """dtype=torch.float32 (swa_fast's option): the average diffusers keeps for an fp32 model with
    the bf16 model's values."""
    model = cnn_with_bn(IMAGE_SIDE).to(torch.bfloat16)
    mirror = cnn_with_bn(IMAGE_SIDE)
    ours = EMAModel(model.parameters(), decay=0.99, dtype=torch.float32)
    mirror.load_state_dict(model.state_dict())
    theirs = DiffusersEMAModel(mirror.parameters(), decay=0.99)
    for step in trajectory(model, 10):
        mirror.load_state_dict(model.state_dict())
        theirs.step(mirror.parameters())
        ours.step(model.parameters())
        assert_same(theirs.shadow_params, ours.shadow_params, False, f"step {step}")
    ours.copy_to(model.parameters())
    assert_same([p.to(torch.bfloat16) for p in theirs.shadow_params], list(model.parameters()), False)


def test_shadow_params_are_updated_in_place():
    model = cnn_with_bn(IMAGE_SIDE)
    ours = EMAModel(model.parameters(), decay=0.9)
    shadow = list(ours.shadow_params)
    before = [s.clone() for s in shadow]
    for _ in trajectory(model, 3):
        ours.step(model.parameters())
    assert all(a is b for a, b in zip(shadow, ours.state_dict()["shadow_params"]))
    # each moved where its parameter moved (a conv bias before BatchNorm gets no gradient)
    moved = [not torch.equal(a, b) for a, b in zip(before, shadow)]
    assert moved == [not torch.equal(a, p) for a, p in zip(before, model.parameters())] and any(moved)


def _train_both(theirs, ours, model, steps):
    for _ in trajectory(model, steps, seed=1):
        theirs.step(model.parameters())
        ours.step(model.parameters())


def test_state_dicts_load_both_ways(tmp_path):
    model = cnn_with_bn(IMAGE_SIDE)
    kwargs = dict(decay=0.95, update_after_step=2, foreach=True)
    theirs, ours = DiffusersEMAModel(model.parameters(), **kwargs), EMAModel(model.parameters(), **kwargs)
    _train_both(theirs, ours, model, 5)
    torch.save(ours.state_dict(), tmp_path / "ours.pt")
    torch.save(theirs.state_dict(), tmp_path / "theirs.pt")
    resumed_theirs = DiffusersEMAModel(model.parameters(), foreach=True)
    resumed_ours = EMAModel(model.parameters(), foreach=True)
    resumed_theirs.load_state_dict(torch.load(tmp_path / "ours.pt"))
    resumed_ours.load_state_dict(torch.load(tmp_path / "theirs.pt"))
    assert resumed_ours.optimization_step == resumed_theirs.optimization_step == 5
    assert resumed_ours.update_after_step == 2
    assert_same(theirs.shadow_params, resumed_ours.shadow_params, True)
    assert_same(ours.shadow_params, resumed_theirs.shadow_params, True)
    _train_both(resumed_theirs, resumed_ours, model, 4)
    assert resumed_ours.optimization_step == 9
    assert_same(resumed_theirs.shadow_params, resumed_ours.shadow_params, False)


def test_save_pretrained_loads_both_ways(tmp_path):
    model = TinyDenoiser()
    kwargs = dict(decay=0.9, model_cls=TinyDenoiser, model_config=model.config)
    theirs, ours = DiffusersEMAModel(model.parameters(), **kwargs), EMAModel(model.parameters(), **kwargs)
    _train_both(theirs, ours, model.net, 4)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    loaded_theirs = DiffusersEMAModel.from_pretrained(tmp_path / "ours", TinyDenoiser)
    loaded_ours = EMAModel.from_pretrained(tmp_path / "theirs", TinyDenoiser)
    assert isinstance(loaded_ours, EMAModel)
    assert loaded_ours.optimization_step == loaded_theirs.optimization_step == 4
    assert loaded_ours.decay == 0.9
    assert_same(ours.shadow_params, loaded_theirs.shadow_params, True)
    assert_same(theirs.shadow_params, loaded_ours.shadow_params, True)
    _train_both(loaded_theirs, loaded_ours, model.net, 3)
    assert_same(loaded_theirs.shadow_params, loaded_ours.shadow_params, False)


def test_to_store_restore_and_copy_to():
    model = cnn_with_bn(IMAGE_SIDE)
    theirs, ours = DiffusersEMAModel(model.parameters(), decay=0.9), EMAModel(model.parameters(), decay=0.9)
    _train_both(theirs, ours, model, 3)
    theirs.to(dtype=torch.float64)
    ours.to(dtype=torch.float64)
    assert all(s.dtype == torch.float64 for s in ours.shadow_params)
    model.double()
    _train_both(theirs, ours, model, 3)
    assert_same([t.float() for t in theirs.shadow_params], [s.float() for s in ours.shadow_params], False)
    trained = [p.detach().clone() for p in model.parameters()]
    ours.store(model.parameters())
    ours.copy_to(model.parameters())
    assert_same(ours.shadow_params, list(model.parameters()), True)
    ours.restore(model.parameters())
    assert_same(trained, list(model.parameters()), True)


def test_bad_input_raises_before_writing():
    model = cnn_with_bn(IMAGE_SIDE)
    ours = EMAModel(model.parameters(), decay=0.9)
    assert_refuses_other_models(ours.step, ours.shadow_params, "expected 6 parameters, got 4")
    assert ours.optimization_step == 0
    with pytest.raises(ValueError, match="dtype must be None or a floating torch.dtype, got torch.int32"):
        EMAModel(model.parameters(), dtype=torch.int32)
