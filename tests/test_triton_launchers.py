"""The Triton launchers called directly on CPU tensors (TRITON_INTERPRET=1, set in conftest)."""

import pytest
import torch
from conftest import assert_matches_reference, clone_lists, make_case

from swa_fast import ops
from swa_fast.ops import triton_kernels

pytestmark = pytest.mark.skipif(
    not triton_kernels.runs_on(torch.device("cpu")), reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)

LAUNCHERS = {name: spec.triton for name, spec in ops.OP_TABLE.items()}


@pytest.mark.parametrize("op", LAUNCHERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_launcher_matches_reference(op, dtype):
    lists, extra = make_case(op, [(triton_kernels.BLOCK + 3,), (2, 5), (0,)], dtype, torch.float32)
    before = clone_lists(lists)
    LAUNCHERS[op](*lists, *extra)
    assert_matches_reference(op, before, lists, extra)


def test_launch_table_is_reused_for_the_same_list():
    avg, src = [torch.zeros(10), torch.zeros(3)], [torch.ones(10), torch.ones(3)]
    triton_kernels._LAUNCH_TABLES.clear()
    LAUNCHERS["lerp_"](avg, src, 0.5)
    LAUNCHERS["lerp_"](avg, src, 0.5)
    assert len(triton_kernels._LAUNCH_TABLES) == 1
    torch.testing.assert_close(avg[0], torch.full((10,), 0.75))


def test_bf16_rounding_is_to_nearest_even():
    """Values exactly between two bf16 numbers round to the even one, as PyTorch does."""
    lo = torch.tensor([1.0, 1.0078125], dtype=torch.bfloat16)  # consecutive bf16 values
    halfway = (lo[0].float() + lo[1].float()) / 2  # 1.00390625: a tie
    dst = [torch.zeros(1, dtype=torch.bfloat16)]
    LAUNCHERS["copy_"](dst, [halfway.reshape(1)])
    assert torch.equal(dst[0], halfway.reshape(1).to(torch.bfloat16))
    nan = [torch.zeros(1, dtype=torch.bfloat16)]
    LAUNCHERS["copy_"](nan, [torch.tensor([float("nan")])])
    assert nan[0].isnan().all()


@pytest.mark.parametrize("op", ["copy_", "lerp_"])
def test_bf16_subnormals_widen_exactly(op):
    """bf16 subnormals (fp32's range, so common after an underflow) are read as PyTorch reads them,
    not flushed to zero as the interpreter's cast would."""
    src = torch.tensor([9.1835e-41, -3e-39, 1.0, float("-inf")]).bfloat16()
    dst = [torch.zeros(4)]
    LAUNCHERS[op](dst, [src], *([1.0] if op == "lerp_" else []))
    assert torch.equal(dst[0], src.float())
