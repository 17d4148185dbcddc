"""torch.library.opcheck on every op (compiled and Triton), and one torch.compile(fullgraph=True)."""

import pytest
import torch
from conftest import OPS, make_case

import swa_fast
from swa_fast import ops
from swa_fast.ops import reference
from swa_fast.ops.checks import ONE_WEIGHT, read, written

COMPILED = pytest.mark.skipif(ops._C is None, reason=f"{ops.EXTENSION_ERROR}")


def op_args(op, dst_dtype=torch.float32, src_dtype=torch.bfloat16):
    lists, extra = make_case(op, [(3, 4), (7,), (0,)], dst_dtype, src_dtype)
    return (*lists, *(torch.tensor(w, dtype=torch.float32) for w in extra))


@COMPILED
@pytest.mark.parametrize("op", OPS)
def test_opcheck_compiled(op):
    src_dtype = torch.float32 if op == "swap_" else torch.bfloat16
    torch.library.opcheck(getattr(torch.ops.swa_fast, op), op_args(op, src_dtype=src_dtype))


@pytest.mark.parametrize("op", OPS)
def test_opcheck_triton(op):
    src_dtype = torch.float32 if op == "swap_" else torch.bfloat16
    torch.library.opcheck(
        getattr(torch.ops.swa_fast, ops.OP_TABLE[op].triton_op), op_args(op, src_dtype=src_dtype)
    )


@pytest.mark.parametrize("op", OPS)
def test_table_row_matches_the_registered_schemas(op):
    """The op table's lists, written lists and weight are what csrc/ops.cpp declares (when the
    extension is loaded) and what the Triton op was registered with."""
    spec = ops.OP_TABLE[op]

    def registered(name):
        return str(getattr(torch.ops.swa_fast, name).default._schema)

    assert registered(spec.triton_op) == f"swa_fast::{spec.triton_op}{spec.schema}"
    if ops._C is not None:
        assert registered(op) == f"swa_fast::{op}{spec.schema}"
        assert hasattr(ops._C, op), "the extension has no eager entry point of this name"


def test_a_row_the_backends_cannot_read_is_refused():
    """The launcher, the fallback and the schema take the written lists first, and a list of one
    list per weight with a weight per list: a row otherwise is refused when the table is made."""
    with pytest.raises(ValueError, match=r"lists it writes before those it reads, got src \(read\), avg"):
        ops.OpSpec("x_", (read("src"), written("avg")), ONE_WEIGHT, lambda src, avg: [src], reference.lerp_)
    with pytest.raises(ValueError, match="when the weight is WEIGHT_PER_LIST, got .* ONE_WEIGHT"):
        ops.OpSpec(
            "x_", (written("avgs", per_weight=True), read("src")), ONE_WEIGHT, lambda *a: [], reference.lerp_
        )


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compile_fullgraph_update(backend):
    """An SWA update traced whole by torch.compile: the op stays one node, the result is right."""
    if swa_fast.backend_status("cpu")[backend] is not None:
        pytest.skip(swa_fast.backend_status("cpu")[backend])
    torch._dynamo.reset()
    avg = [torch.zeros(5, 3), torch.zeros(4)]
    params = [torch.randn(5, 3), torch.randn(4)]

    @torch.compile(fullgraph=True)
    def update(avg, params, weight):
        swa_fast.lerp_(avg, params, weight, backend=backend)

    for n in range(3):
        update(avg, params, torch.tensor(1.0 / (n + 1)))
    for a, p in zip(avg, params):
        torch.testing.assert_close(a, p)
