"""capturable=True: SWA and EMA updates whose counts, schedule and weight live on the device. Each
update equals the host-scheduled manager's bit for bit, and torch.compile traces it whole (one
graph, no recompilation per call). The CUDA-graph replay is in test_cuda.py (needs a GPU)."""

import copy

import pytest
import torch
from conftest import assert_same_manager, cnn_with_bn, perturb_

import swa_fast

IMAGES = (5, 1, 8, 8)  # the batch perturb_ runs through cnn_with_bn(8)

CONFIGS = {
    "swa": (swa_fast.SWA, {}),
    "swa, buffers, check_finite": (swa_fast.SWA, {"use_buffers": True, "check_finite": True}),
    "ema": (swa_fast.EMA, {"decay": 0.9}),
    "ema, schedule": (
        swa_fast.EMA,
        {"decay": 0.9, "warmup_gamma": 2.0, "update_after_step": 1, "update_every": 2, "use_buffers": True},
    ),
    "ema, schedule, check_finite": (
        swa_fast.EMA,
        {"decay": 0.95, "update_after_step": 2, "update_every": 3, "check_finite": True, "use_buffers": True},
    ),
}


def step_models(models, step, nan=False):
    """The same training step's worth of change in each model; with `nan`, step 4 puts a NaN in one
    weight, which step 5 takes out."""
    for model in models:
        perturb_(model, step, IMAGES)
        if nan and step == 4:
            with torch.no_grad():
                model[0].weight[0, 0, 0, 0] = float("nan")
        elif nan and step == 5:
            with torch.no_grad():
                model[0].weight.nan_to_num_(0.0)


@pytest.mark.parametrize("config", CONFIGS)
def test_capturable_updates_equal_the_host_scheduled_ones(config):
    cls, options = CONFIGS[config]
    model = cnn_with_bn(8)
    twin = copy.deepcopy(model)
    captured, host = cls(model, capturable=True, **options), cls(twin, **options)
    assert captured.capturable and not host.capturable
    for step in range(9):
        step_models([model, twin], step, nan=options.get("check_finite", False))
        captured.update(model)
        host.update(twin)
        assert_same_manager(captured, host, step)


def test_a_capturable_state_resumes_in_a_host_scheduled_manager_and_back():
    cls, options = CONFIGS["ema, schedule"]
    model = cnn_with_bn(8)
    captured = cls(model, capturable=True, **options)
    for step in range(5):
        perturb_(model, step, IMAGES)
        captured.update(model)
    host = cls(model, **options)
    host.load_state_dict(captured.state_dict())
    back = cls(model, capturable=True, **options)
    back.load_state_dict(host.state_dict())
    for step in range(5, 10):
        perturb_(model, step, IMAGES)
        host.update(model)
        back.update(model)
        assert_same_manager(back, host, step)


@pytest.mark.parametrize("config", ["swa, buffers, check_finite", "ema, schedule"])
def test_torch_compile_traces_a_capturable_update_whole(config):
    """fullgraph=True: no graph break; error_on_recompile: the counts are not baked into the
    graph (a host count would be guarded on, and recompiled for, at every call)."""
    cls, options = CONFIGS[config]
    torch._dynamo.reset()
    model = cnn_with_bn(8)
    twin = copy.deepcopy(model)
    captured, host = cls(model, capturable=True, **options), cls(twin, **options)

    @torch.compile(fullgraph=True)
    def update():
        captured.update(model)

    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(8):
            step_models([model, twin], step, nan=options.get("check_finite", False))
            update()
            host.update(twin)
            assert_same_manager(captured, host, step)


def test_a_replaced_parameter_still_raises_when_compiled():
    model = cnn_with_bn(8)
    swa = swa_fast.SWA(model, capturable=True)
    torch._dynamo.reset()
    swa.update(model)
    model[4].weight = torch.nn.Parameter(model[4].weight.detach().clone())
    with pytest.raises(ValueError, match="'4.weight' was replaced"):
        torch.compile(swa.update)(model)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: swa_fast.SWAG(m, capturable=True),
        lambda m: swa_fast.PostHocEMA(m, capturable=True),
    ],
)
def test_managers_whose_update_decides_on_the_host_refuse_capturable(make):
    with pytest.raises(ValueError, match="capturable=True is for SWA and EMA"):
        make(cnn_with_bn(8))
