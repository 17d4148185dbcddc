"""What a new user meets first, each with the message they read: `import swa_fast` leaves Triton
alone on a CPU-only run, the habits of other libraries (parameters instead of the model, a dtype by
name) and a mistyped backend are refused when the manager is made, saying what was expected and
what came, a wrong state_dict says whose it should be, and an fp64 model keeps an fp64 average."""

import os
import subprocess
import sys

import pytest
import torch

import swa_fast
from swa_fast.averaging import AT_LEAST_FLOAT32
from swa_fast.ops import triton_kernels


def model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).to(dtype)


def test_import_and_cpu_averaging_do_not_import_triton():
    """Importing Triton costs most of a second; a CPU-only run (no GPU visible, no interpreter)
    averages without it, and it is imported once something needs it."""
    code = (
        "import sys, torch, swa_fast\n"
        "m = torch.nn.Linear(3, 2)\n"
        "ema = swa_fast.EMA(m)\n"
        "ema.update(m)\n"
        "swa_fast.lerp_([torch.zeros(3)], [torch.ones(3)], 0.5)\n"
        "print('triton' in sys.modules)\n"
        "print(swa_fast.ops.triton_kernels.version())\n"
        "print('triton' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    before, version, after = out.stdout.split("\n")[:3]
    assert before == "False"
    if triton_kernels.TRITON_ERROR is None:  # installed: imported when asked for its version
        assert after == "True" and version == triton_kernels.triton.__version__


@pytest.mark.parametrize("make", [swa_fast.SWA, swa_fast.EMA, swa_fast.SWAG, swa_fast.FGE])
def test_parameters_instead_of_the_model_are_refused_with_what_to_pass(make):
    m = model()
    with pytest.raises(ValueError) as refused:
        make(m.parameters())
    said = str(refused.value)
    assert f"swa_fast.{make.__name__}: expected the model itself (a torch.nn.Module), got a generator" in said
    assert "model.parameters()" in said and "ExponentialMovingAverage" in said
    with pytest.raises(ValueError, match="expected the model itself .* got a list"):
        make(list(m.parameters()))
    with pytest.raises(ValueError, match="expected the model itself .* got a tensor"):
        make(m[0].weight)


def test_update_given_parameters_is_refused_and_changes_nothing():
    m = model()
    ema = swa_fast.EMA(m, decay=0.5)
    ema.update(m)
    saved = {k: v.clone() for k, v in ema.state_dict()["average"].items()}
    with pytest.raises(ValueError, match=r"swa_fast.EMA: expected the model itself .* got a generator"):
        ema.update(m.parameters())
    assert all(torch.equal(saved[k], v) for k, v in ema.state_dict()["average"].items())
    assert ema.state_dict()["calls"] == 1


def test_an_unknown_backend_is_refused_when_the_manager_is_made():
    with pytest.raises(ValueError, match="unknown backend 'cudaa'; expected one of cuda, triton, cpu"):
        swa_fast.EMA(model(), backend="cudaa")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        swa_fast.FGE(model(), backend="fast")
    # known, but not for where the average lives: said now, with the reason
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable for cpu tensors"):
        swa_fast.SWA(model(), backend="cuda")
    swa_fast.EMA(model(), backend="foreach").update(model())  # one that runs is taken


def test_a_dtype_given_by_name_is_refused_naming_the_torch_dtype():
    with pytest.raises(ValueError) as refused:
        swa_fast.EMA(model(), dtype="float32")
    said = str(refused.value)
    assert "dtype must be torch.float32, torch.float64, torch.float16, torch.bfloat16, None" in said
    assert said.endswith("got the string 'float32': pass torch.float32")
    with pytest.raises(ValueError, match="got the string 'fp32'$"):  # no torch dtype of that name
        swa_fast.SWA(model(), dtype="fp32")


def test_a_state_dict_of_something_else_says_whose_it_should_be():
    ema = swa_fast.EMA(model())
    with pytest.raises(ValueError) as refused:
        ema.load_state_dict({"decay": 0.9})
    said = str(refused.value)
    assert said.startswith("swa_fast.EMA.load_state_dict: expected the state_dict of a swa_fast.EMA")
    assert "missing ['average', 'n_averaged', 'calls']" in said and "not a EMA" not in said


def test_the_default_average_is_fp32_and_fp64_for_an_fp64_model():
    expected_of = {torch.float64: torch.float64, torch.bfloat16: torch.float32, torch.float32: torch.float32}
    for dtype, expected in expected_of.items():
        m = model(dtype)
        ema = swa_fast.EMA(m)
        assert {g.dtype for g in ema.average.groups} == {expected}, dtype
        ema.update(m)  # the first update copies: exactly, for fp64 too (no rounding through fp32)
        for name, p in m.named_parameters():
            assert torch.equal(ema.state_dict()["average"][name], p.detach().to(expected)), name
    mixed = model()
    mixed[2].to(torch.float64)
    assert {g.dtype for g in swa_fast.SWA(mixed).average.groups} == {torch.float64}
    # asked for, fp32 it is (and None keeps each tensor's own)
    asked = swa_fast.SWA(model(torch.float64), dtype=torch.float32)
    assert {g.dtype for g in asked.average.groups} == {torch.float32}
    assert {g.dtype for g in swa_fast.SWAG(model(torch.bfloat16), dtype=None).average.groups} == {
        torch.bfloat16
    }
    assert swa_fast.EMA.__init__.__kwdefaults__["dtype"] == AT_LEAST_FLOAT32
