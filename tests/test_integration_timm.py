"""swa_fast.integrations.timm against the real timm: the same training trajectory through timm's
ModelEmaV3 / ModelEmaV2 and through ours gives the same averaged weights and buffers after every
update, and checkpoints (`ema.module.state_dict()`) load both ways.

Exact (bit for bit) for ModelEmaV3 wherever timm lerps: timm calls torch.lerp / _foreach_lerp_
at weight 1 - decay, and lerp_ computes torch.lerp's formula in the same fp32 arithmetic with one
rounding; its bf16 stochastic rounding is timm's own arithmetic and draws, run on our flat buffer.
To one rounding where timm does other arithmetic: ModelEmaV3 with `dtype` differing from the
model's and foreach (timm: mul_ then add_, two roundings) and ModelEmaV2 (timm: decay * e +
(1 - decay) * m in the tensor's dtype, three roundings; its integer buffers are exact).
"""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from conftest import BF16WithFP32Norm, cnn_with_bn
from integration_trajectory import IMAGE_SIDE, assert_same, trajectory
from timm.utils import model_ema as timm_ema

from swa_fast.integrations.timm import ModelEmaV2, ModelEmaV3

V3_SETTINGS = {
    "fp32 default": (torch.float32, dict(), False, True),
    "fp32 steps, warmup, update_after_step": (
        torch.float32,
        dict(decay=0.95, update_after_step=3, use_warmup=True, warmup_gamma=2.0, min_decay=0.3),
        True,
        True,
    ),
    "fp32 steps, no warmup": (torch.float32, dict(decay=0.9, update_after_step=2), True, True),
    "fp32 not foreach": (torch.float32, dict(decay=0.9, foreach=False), True, True),
    "fp32 exclude_buffers": (torch.float32, dict(decay=0.9, exclude_buffers=True), True, True),
    "bf16 stochastic rounding": (torch.bfloat16, dict(decay=0.99), True, True),
    "bf16 stochastic rounding, not foreach": (torch.bfloat16, dict(decay=0.99, foreach=False), True, True),
    "bf16 round to nearest": (torch.bfloat16, dict(decay=0.9, stochastic_rounding=False), True, True),
    "bf16 model, fp32 average, not foreach": (
        torch.bfloat16,
        dict(decay=0.99, dtype=torch.float32, foreach=False),
        True,
        True,
    ),
    "bf16 model, fp32 average (timm: mul_ then add_)": (
        torch.bfloat16,
        dict(decay=0.99, dtype=torch.float32),
        True,
        False,
    ),
    "fp32 model, bf16 average, stochastic rounding": (
        torch.float32,
        dict(decay=0.99, dtype=torch.bfloat16),
        True,
        True,
    ),
}


def _state(ema) -> list[torch.Tensor]:
    return list(ema.module.state_dict().values())


@pytest.mark.parametrize("setting", list(V3_SETTINGS))
def test_v3_follows_timm_at_every_update(setting):
    dtype, kwargs, with_steps, exact = V3_SETTINGS[setting]
    model = cnn_with_bn(IMAGE_SIDE).to(dtype)
    theirs, ours = timm_ema.ModelEmaV3(model, **kwargs), ModelEmaV3(model, **kwargs)
    assert isinstance(ours, timm_ema.ModelEmaV3)
    for step in trajectory(model, 12):
        theirs.update(model, step=step if with_steps else None)
        ours.update(model, step=step if with_steps else None)
        assert ours.get_decay(step) == theirs.get_decay(step)
        assert_same(_state(theirs), _state(ours), exact, f"step {step}")
    x = torch.randn(2, 1, IMAGE_SIDE, IMAGE_SIDE).to(next(ours.module.parameters()).dtype)
    assert_same([theirs(x).detach()], [ours(x).detach()], exact)  # forward: the average, in eval mode


def test_v3_mixed_precision_model_with_stochastic_rounding():
    """bf16 layers (stochastically rounded, timm's chunks) beside an fp32 norm (lerp) in one model."""
    model = BF16WithFP32Norm()
    theirs, ours = timm_ema.ModelEmaV3(model, decay=0.98), ModelEmaV3(model, decay=0.98)
    for step in trajectory(model, 8):
        theirs.update(model, step=step)
        ours.update(model, step=step)
        assert_same(_state(theirs), _state(ours), True, f"step {step}")


@pytest.mark.parametrize("change", ["model.float()", "norm.float()"])
def test_v3_stochastic_rounding_follows_the_models_dtypes_now(change):
    """A bf16 model made fp32 (whole, or one layer) after the EMA was made: timm rounds the model's
    tensors as they are now (its chunks are torch.cat of them), and so do ours: the same bits."""
    model = cnn_with_bn(IMAGE_SIDE).to(torch.bfloat16)
    theirs, ours = timm_ema.ModelEmaV3(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    for step in trajectory(model, 3):
        theirs.update(model, step=step)
        ours.update(model, step=step)
    model.float() if change == "model.float()" else model[1].float()
    for step in trajectory(model, 4, seed=1):
        theirs.update(model, step=step)
        ours.update(model, step=step)
        assert_same(_state(theirs), _state(ours), True, f"step {step} after {change}")


def test_v3_averages_in_place_and_integer_buffers_are_copied():
    model = cnn_with_bn(IMAGE_SIDE)
    ours = ModelEmaV3(model, decay=0.9)
    weight = ours.module[0].weight
    before = weight.clone()
    for _ in trajectory(model, 3):
        ours.update(model)
    assert weight is ours.module[0].weight and not torch.equal(weight, before)
    assert ours.module[1].num_batches_tracked.item() == model[1].num_batches_tracked.item() == 3


def test_v2_follows_timm_at_every_update():
    model = cnn_with_bn(IMAGE_SIDE)
    theirs, ours = timm_ema.ModelEmaV2(model, decay=0.9), ModelEmaV2(model, decay=0.9)
    assert isinstance(ours, timm_ema.ModelEmaV2)
    for step in trajectory(model, 12):
        theirs.update(model)
        ours.update(model)
        assert_same(_state(theirs), _state(ours), False, f"step {step}")
    # timm blends num_batches_tracked in fp32 and truncates: it lags the model's count; ours too
    assert ours.module[1].num_batches_tracked.item() == theirs.module[1].num_batches_tracked.item() < 12


@pytest.mark.parametrize("cls", [ModelEmaV3, ModelEmaV2])
def test_set_copies_the_model(cls):
    model = cnn_with_bn(IMAGE_SIDE)
    ours = cls(model, decay=0.9)
    for _ in trajectory(model, 2):
        ours.update(model)
    ours.set(model)
    assert_same(list(model.state_dict().values()), _state(ours), True)


@pytest.mark.parametrize(
    "timm_cls, cls", [(timm_ema.ModelEmaV3, ModelEmaV3), (timm_ema.ModelEmaV2, ModelEmaV2)]
)
def test_checkpoints_load_both_ways(tmp_path, timm_cls, cls):
    """timm's resume path: `ema.module.load_state_dict(checkpoint)`; after loading each other's
    checkpoints, both go on updating alike."""
    model = cnn_with_bn(IMAGE_SIDE)
    theirs, ours = timm_cls(model, decay=0.9), cls(model, decay=0.9)
    steps = trajectory(model, 8)
    for _ in range(4):
        next(steps)
        theirs.update(model)
        ours.update(model)
    torch.save(ours.module.state_dict(), tmp_path / "ours.pt")
    torch.save(theirs.module.state_dict(), tmp_path / "theirs.pt")
    resumed_theirs, resumed_ours = timm_cls(model, decay=0.9), cls(model, decay=0.9)
    resumed_theirs.module.load_state_dict(torch.load(tmp_path / "ours.pt"))
    resumed_ours.module.load_state_dict(torch.load(tmp_path / "theirs.pt"))
    exact = cls is ModelEmaV3
    assert_same(_state(theirs), _state(resumed_ours), True)
    assert_same(_state(ours), _state(resumed_theirs), True)
    for _ in steps:
        resumed_theirs.update(model)
        resumed_ours.update(model)
        ours.update(model)
    assert_same(_state(resumed_theirs), _state(resumed_ours), exact)
    assert_same(_state(ours), _state(resumed_ours), exact)


def test_v3_keeps_averaging_after_its_tensors_get_new_storage():
    """`load_state_dict(assign=True)` and `.to()` replace the copy's storage: the next update puts
    the new tensors into flat buffers again, and timm's results are kept."""
    model = cnn_with_bn(IMAGE_SIDE)
    theirs, ours = timm_ema.ModelEmaV3(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    steps = trajectory(model, 6)
    for step in steps:
        if step == 2:
            ours.module.load_state_dict(
                {k: v.clone() for k, v in ours.module.state_dict().items()}, assign=True
            )
        if step == 4:
            ours.to(torch.float64).to(torch.float32)
        theirs.update(model)
        ours.update(model)
        assert_same(_state(theirs), _state(ours), True, f"step {step}")


def _saved_bytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def test_a_saved_part_of_the_state_holds_only_its_own_bytes_as_timms():
    """The copy's tensors view one flat buffer, and torch.save writes a view's whole storage: a
    part of `ema.module.state_dict()` (the head, picked from the whole state or asked of the head
    itself) is saved in as many bytes as timm's, and the entries are still the average (no copy)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(200, 200), torch.nn.Linear(10, 10))
    theirs, ours = timm_ema.ModelEmaV3(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    for _ in range(2):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        theirs.update(model)
        ours.update(model)
    whole = ours.module.state_dict()
    head, their_head = (
        {k: v for k, v in ema.module.state_dict().items() if k.startswith("1.")} for ema in (ours, theirs)
    )
    assert _saved_bytes(head) == _saved_bytes(their_head) < 4_000
    assert _saved_bytes(ours.module[1].state_dict()) == _saved_bytes(theirs.module[1].state_dict())
    assert _saved_bytes(whole) <= _saved_bytes(theirs.module.state_dict())
    assert whole["0.weight"].data_ptr() == ours.module[0].weight.data_ptr()
    assert head["1.bias"].data_ptr() == ours.module[1].bias.data_ptr()
    ours.update(model)  # the entries are the average: an update shows in them
    assert torch.equal(whole["0.weight"], ours.module[0].weight)
    restored = ModelEmaV3(model, decay=0.9)
    restored.module.load_state_dict(torch.load(io.BytesIO(_saved(whole)), weights_only=True))
    assert_same(_state(ours), _state(restored), True)


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_another_model_raises_before_writing():
    model = cnn_with_bn(IMAGE_SIDE)
    for ours in (ModelEmaV3(model, decay=0.9), ModelEmaV2(model, decay=0.9)):
        before = [t.clone() for t in _state(ours)]
        with pytest.raises(ValueError, match="expected 9 tensors in the model.*got 7"):
            ours.update(torch.nn.Sequential(*list(cnn_with_bn(IMAGE_SIDE))[:2]))  # no Linear
        with pytest.raises(ValueError, match="shape"):
            ours.update(cnn_with_bn(IMAGE_SIDE + 1))
        with pytest.raises(ValueError, match="expected 9 tensors, got 2"):
            ours.set(torch.nn.Linear(2, 2))
        assert_same(before, _state(ours), True)


def _resize_head(model):
    model.head.weight.data = torch.zeros(5, 3, dtype=torch.bfloat16)


def _resize_count(model):
    model[1].num_batches_tracked = torch.zeros(2, dtype=torch.long)


def _resize_running_mean(model):
    model[1].running_mean = torch.zeros(5)


@pytest.mark.parametrize(
    "cls, kwargs, make, change",
    [
        (ModelEmaV3, {}, BF16WithFP32Norm, _resize_head),  # fp32 lerp_, then bf16 rounding
        (ModelEmaV3, {}, lambda: cnn_with_bn(IMAGE_SIDE), _resize_count),  # lerp_, then integer copies
        (ModelEmaV2, {}, lambda: cnn_with_bn(IMAGE_SIDE), _resize_count),
        (ModelEmaV3, {"exclude_buffers": True}, lambda: cnn_with_bn(IMAGE_SIDE), _resize_running_mean),
    ],
    ids=["stochastic rounding after lerp_", "v3 integer copy", "v2 integer blend", "exclude_buffers copy"],
)
def test_an_update_checks_every_part_before_writing_any(cls, kwargs, make, change):
    """An update writes in parts (the lerp_, then the bf16 rounding, the integer buffers or the
    buffers copied): a tensor of a later part whose shape changed raises before the first is written."""
    model = make()
    ours = cls(model, decay=0.5, **kwargs)
    ours.update(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    change(model)
    before = [t.clone() for t in _state(ours)]
    with pytest.raises(ValueError, match="shape"):
        ours.update(model)
    assert_same(before, _state(ours), True)


def test_importing_swa_fast_imports_none_of_the_libraries():
    code = (
        "import sys, swa_fast, swa_fast.integrations; "
        "libraries = ('timm', 'diffusers', 'torch_ema', 'ema_pytorch', 'lightning'); "
        "print([m for m in libraries if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tied_weights_are_averaged_once_per_update():
    """The documented difference: timm's state_dict lists a tied weight twice and lerps it twice."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    theirs, ours = timm_ema.ModelEmaV3(model, decay=0.5), ModelEmaV3(model, decay=0.5)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    theirs.update(model)
    ours.update(model)
    assert ours.module[1].weight is ours.module[0].weight
    torch.testing.assert_close(ours.module[0].weight, start + 0.5)
    torch.testing.assert_close(theirs.module[0].weight, start + 0.75)
