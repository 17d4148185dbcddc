"""swa_fast.integrations.ema_pytorch.EMA against the real ema-pytorch EMA: the same training
trajectory through both gives the same EMA weights, buffers and counts at every step, and their
state_dicts load into each other.

Exact equality throughout: the original lerps each tensor with torch.lerp at weight 1 - decay, and
the fused op computes torch.lerp's formula in the same opmath dtype (fp32 for fp32 and bf16) with
one rounding; the decay is computed in the original's float32 arithmetic; copies are copies.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import cnn_with_bn, random_batch

ema_pytorch = pytest.importorskip("ema_pytorch")
from swa_fast.integrations.ema_pytorch import EMA  # noqa: E402

IMAGE = (1, 6, 6)

SETTINGS = {
    "warmup": dict(beta=0.99, update_after_step=3, update_every=2, power=3 / 4),
    "every_step_min_value": dict(beta=0.9, update_after_step=0, update_every=1, inv_gamma=2.0, min_value=0.5),
    "defaults_after_100": dict(update_after_step=5, update_every=3),
    "names": dict(
        beta=0.95,
        update_after_step=2,
        update_every=1,
        ignore_names={"0.bias"},
        ignore_startswith_names={"4."},
        param_or_buffer_names_no_ema={"1.running_mean", "1.weight"},
    ),
    "model_follows_ema_copy": dict(
        beta=0.9, update_after_step=2, update_every=1, update_model_with_ema_every=4
    ),
    "model_follows_ema_lerp": dict(
        beta=0.9,
        update_after_step=2,
        update_every=2,
        update_model_with_ema_every=3,
        update_model_with_ema_beta=0.5,
    ),
    "frozen": dict(beta=1.0, update_after_step=2, update_every=1),
    "not_saving_online_model": dict(
        beta=0.9, update_after_step=1, update_every=1, include_online_model=False
    ),
    "foreach": dict(beta=0.9, update_after_step=1, update_every=1, use_foreach=True),
}


def _train_both(original, ours, model_a, model_b, steps, seed=0, check=None):
    """Train two equal models on the same batches, updating each EMA after every step; `check` is
    called after each update."""
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.2, momentum=0.9)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    dtype = next(model_a.parameters()).dtype
    image = (model_a[0].in_channels, *IMAGE[1:])
    for step in range(steps):
        x, y = random_batch(8, image, classes=3, generator=g)
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            model.train()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x.to(dtype)).float(), y).backward()
            opt.step()
        original.update()
        ours.update()
        if check is not None:
            check(step)


def _assert_same_state(a: dict, b: dict, where: str) -> None:
    assert list(a) == list(b), where
    for name in a:
        assert a[name].dtype == b[name].dtype, f"{where}: {name}"
        assert torch.equal(a[name], b[name]), f"{where}: {name} differs by {(a[name] - b[name]).abs().max()}"


def _pair(settings: dict, dtype=torch.float32, channels_last=False):
    model_a = cnn_with_bn(IMAGE[-1], in_channels=3 if channels_last else 1).to(dtype)
    if channels_last:
        model_a = model_a.to(memory_format=torch.channels_last)
    model_b = copy.deepcopy(model_a)
    return ema_pytorch.EMA(model_a, **settings), EMA(model_b, **settings), model_a, model_b


def _compare_every_step(original, ours, model_a, model_b, steps=16):
    start = int(original.step)

    def check(step):
        where = f"step {step}"
        _assert_same_state(original.state_dict(), ours.state_dict(), where)
        _assert_same_state(model_a.state_dict(), model_b.state_dict(), where + " (online models)")
        assert original.get_current_decay() == ours.get_current_decay(), where
        assert int(ours.step) == start + step + 1 and bool(ours.initted)

    _train_both(original, ours, model_a, model_b, steps, check=check)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_same_trajectory_as_ema_pytorch(name):
    _compare_every_step(*_pair(SETTINGS[name]))


def test_same_trajectory_bf16():
    _compare_every_step(*_pair(SETTINGS["warmup"], dtype=torch.bfloat16))


def test_same_trajectory_channels_last():
    """A channels_last EMA copy is written through its strides."""
    original, ours, model_a, model_b = _pair(SETTINGS["every_step_min_value"], channels_last=True)
    _compare_every_step(original, ours, model_a, model_b, steps=6)
    assert not ours.ema_model[0].weight.is_contiguous()


def test_an_ema_copy_converted_to_channels_last_after_it_started_goes_on_as_the_original():
    """`ema.ema_model.to(memory_format=torch.channels_last)` between updates, the convolution's
    weight copied rather than averaged (that plan is checked before the average is written): the
    same EMA as the original's at every step."""
    settings = dict(SETTINGS["every_step_min_value"], param_or_buffer_names_no_ema={"0.weight"})
    model_a = cnn_with_bn(IMAGE[-1], in_channels=3)  # three channels: channels_last is strided
    model_b = copy.deepcopy(model_a)
    original, ours = ema_pytorch.EMA(model_a, **settings), EMA(model_b, **settings)
    _train_both(original, ours, model_a, model_b, 3)
    original.ema_model.to(memory_format=torch.channels_last)
    ours.ema_model.to(memory_format=torch.channels_last)
    _compare_every_step(original, ours, model_a, model_b, steps=4)
    assert ours.ema_model[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_fp32_average_of_bf16_model():
    """dtype=float32 keeps the EMA in fp32: the same as the original given an fp32 EMA copy with
    coerce_dtype (a bf16 value converts to fp32 exactly, then both lerp in fp32)."""
    settings = dict(beta=0.999, update_after_step=1, update_every=1)
    model_a = cnn_with_bn(IMAGE[-1]).to(torch.bfloat16)
    model_b = copy.deepcopy(model_a)
    fp32_copy = copy.deepcopy(model_a).float()
    original = ema_pytorch.EMA(model_a, ema_model=fp32_copy, coerce_dtype=True, **settings)
    ours = EMA(model_b, dtype=torch.float32, **settings)
    _compare_every_step(original, ours, model_a, model_b, steps=8)
    assert ours.ema_model[0].weight.dtype == torch.float32


def test_state_dicts_load_both_ways():
    settings = SETTINGS["warmup"]
    original, ours, model_a, model_b = _pair(settings)
    _train_both(original, ours, model_a, model_b, 9)
    # ours resumed from the original's checkpoint, and the original from ours, then both trained on
    resumed_ours = EMA(copy.deepcopy(model_a), **settings)
    resumed_ours.load_state_dict(original.state_dict())
    resumed_original = ema_pytorch.EMA(copy.deepcopy(model_b), **settings)
    resumed_original.load_state_dict(ours.state_dict())
    assert resumed_ours.get_current_decay() == original.get_current_decay()
    _compare_every_step(resumed_original, resumed_ours, resumed_original.model, resumed_ours.model, steps=12)
    _train_both(original, ours, model_a, model_b, 12)
    _assert_same_state(original.state_dict(), resumed_ours.state_dict(), "resumed")


def test_copy_helpers_and_forward():
    original, ours, model_a, model_b = _pair(dict(beta=0.5, update_after_step=0, update_every=1))
    _train_both(original, ours, model_a, model_b, 4)
    x, _ = random_batch(4, IMAGE, classes=3)
    ours.eval()
    original.eval()
    assert torch.equal(ours(x), original(x))
    assert torch.equal(ours.forward_eval(x), original.forward_eval(x))
    original.copy_params_from_ema_to_model()
    ours.copy_params_from_ema_to_model()
    _assert_same_state(model_a.state_dict(), model_b.state_dict(), "ema to model")
    with torch.no_grad():
        for p in model_b.parameters():
            p.add_(1.0)
    ours.copy_params_from_model_to_ema()
    for name, p in model_b.named_parameters():
        assert torch.equal(dict(ours.ema_model.named_parameters())[name], p)
    # the integer buffer is neither averaged nor copied, as in the original
    assert int(ours.ema_model[1].num_batches_tracked) == int(original.ema_model[1].num_batches_tracked) == 0


def test_lazy_init_forward_methods_and_optimizer_hook():
    model_a = cnn_with_bn(IMAGE[-1])
    model_b = copy.deepcopy(model_a)
    settings = dict(beta=0.9, update_after_step=1, update_every=1, lazy_init_ema=True)
    original = ema_pytorch.EMA(model_a, **settings)
    ours = EMA(model_b, **settings, forward_method_names=("extra_repr",))
    assert ours.ema_model is None and list(ours.state_dict()) == list(original.state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model_a, model_b)]
    handles = [ema.add_to_optimizer_post_step_hook(opt) for ema, opt in zip((original, ours), optimizers)]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = random_batch(8, IMAGE, classes=3, generator=g)
        for model, opt in zip((model_a, model_b), optimizers):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()  # the hook updates the EMA
    for handle in handles:
        handle.remove()
    assert int(ours.step) == 5
    assert ours.extra_repr == ours.ema_model.extra_repr
    _assert_same_state(original.state_dict(), ours.state_dict(), "after hooked updates")


def test_deepcopy_keeps_updating_its_own_models():
    original, ours, model_a, model_b = _pair(dict(beta=0.9, update_after_step=0, update_every=1))
    _train_both(original, ours, model_a, model_b, 3)
    twin = copy.deepcopy(ours)
    twin.update()
    ours.update()
    _assert_same_state(twin.state_dict(), ours.state_dict(), "deep copy")
    assert twin.ema_model[0].weight.data_ptr() != ours.ema_model[0].weight.data_ptr()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta=1.5), "beta must be a finite real number in \\[0.0, 1.0\\], got 1.5"),
        (dict(update_every=0), "update_every must be an int >= 1, got 0"),
        (dict(update_after_step=-1), "update_after_step must be an int >= 0, got -1"),
        (dict(inv_gamma=0.0), "inv_gamma must be a finite real number > 0.0"),
        (dict(param_or_buffer_names_no_ema="0.bias"), "must be a set or list of names, got str"),
        (dict(dtype=torch.int64), "dtype must be a floating torch.dtype"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EMA(cnn_with_bn(IMAGE[-1]), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_updates_without_host_syncs_and_like_the_original():
    """On a GPU every update, copies and averages alike, runs without a host synchronisation
    (the original reads step, initted and its decay back each time). The decay of the original is
    computed on the GPU, ours on the CPU: equal up to float32 pow's last bit, so compared closely."""
    settings = dict(beta=0.99, update_after_step=2, update_every=1)
    model_a = cnn_with_bn(IMAGE[-1]).cuda()
    model_b = copy.deepcopy(model_a)
    original, ours = ema_pytorch.EMA(model_a, **settings), EMA(model_b, **settings)
    for step in range(6):
        with torch.no_grad():
            for pa, pb in zip(model_a.parameters(), model_b.parameters()):
                noise = torch.randn(pa.shape, generator=torch.Generator().manual_seed(step)).cuda()
                pa.add_(noise)
                pb.add_(noise)
        original.update()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ours.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for name, value in original.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[name], value, rtol=1e-6, atol=1e-7, msg=name)


def _ema_with_a_copied_name():
    """A model and its EMA, "1.weight" copied rather than averaged, past its first updates."""
    model = cnn_with_bn(IMAGE[1])
    ema = EMA(model, beta=0.9, update_after_step=0, param_or_buffer_names_no_ema={"1.weight"})
    ema.update()
    ema.update()
    return model, ema


def _assert_refused_writing_nothing(ema, model, message):
    before = {k: v.clone() for k, v in ema.ema_model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        ema.update_moving_average(ema.ema_model, model)
    for name, value in ema.ema_model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_refused_update_copies_no_tensor_without_ema():
    """An update the average refuses (a parameter changed shape) writes nothing: the names without
    EMA, which are copied, were copied before the check that raised."""
    model, ema = _ema_with_a_copied_name()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    model[4].weight.data = torch.zeros(2, 2)
    _assert_refused_writing_nothing(ema, model, r"shape")


def test_a_refused_copy_of_a_tensor_without_ema_averages_nothing():
    """The other way round: a name without EMA that changed shape (copied, not averaged) is
    refused before the averages are written."""
    model, ema = _ema_with_a_copied_name()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].weight.data = torch.ones(7)
    _assert_refused_writing_nothing(ema, model, r"shape \[7\]")


def test_the_optimizer_hook_on_swa_fasts_swa_wrapper_goes_on_the_optimizer_it_wraps():
    """swa_fast.optim.SWA runs no step hooks of its own (it does not call Optimizer.__init__, as
    torchcontrib's): the hook goes on the optimizer it wraps, and each of its steps updates."""
    from swa_fast.optim import SWA

    model = cnn_with_bn(IMAGE[-1])
    opt = SWA(torch.optim.SGD(model.parameters(), lr=0.1))
    ours = EMA(model, update_after_step=0, update_every=1)
    ours.add_to_optimizer_post_step_hook(opt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, *IMAGE)).square().mean().backward()
        opt.step()
    assert int(ours.step) == 3
