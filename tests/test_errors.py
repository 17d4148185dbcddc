"""Bad input raises a ValueError that names the index, the expected and the received value, on every
backend, and writes nothing: the bad tensor sits last so that a backend writing as it goes would
already have changed the first ones."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import OPS, WEIGHTED, clone_lists, make_case

import swa_fast
from swa_fast import ops


def case(op):
    return make_case(op, [(4, 3), (5,), (2, 2)], torch.float32, torch.float32)


def replaced(lists, k, i, tensor):
    out = [list(lst) for lst in lists]
    out[k][i] = tensor
    return out


def assert_rejected(op, backend, lists, extra, *patterns):
    before = clone_lists(lists)
    with pytest.raises(ValueError) as info:
        getattr(swa_fast, op)(*lists, *extra, backend=backend)
    for p in patterns:
        assert p in str(info.value), f"{p!r} not in {info.value}"
    for k, lst in enumerate(lists):
        for t, b in zip(lst, before[k]):
            if t.device.type != "meta" and t.layout == torch.strided:
                assert torch.equal(t, b), f"{op} wrote list {k} before raising"


@pytest.mark.parametrize("op", OPS)
def test_unequal_lengths(op, any_backend):
    lists, extra = case(op)
    lists[-1] = lists[-1][:2]
    assert_rejected(op, any_backend, lists, extra, "has 2 tensors", "has 3", "equal lengths")


@pytest.mark.parametrize("op", OPS)
def test_shape_mismatch(op, any_backend):
    lists, extra = case(op)
    lists = replaced(lists, len(lists) - 1, 2, torch.zeros(5))
    assert_rejected(op, any_backend, lists, extra, "[2]", "shape [5]", "shape [2, 2]")


@pytest.mark.parametrize("op", OPS)
def test_same_numel_other_shape(op, any_backend):
    lists, extra = case(op)
    lists = replaced(lists, len(lists) - 1, 2, torch.zeros(4, 1))
    assert_rejected(op, any_backend, lists, extra, "[2]", "shape [4, 1]", "shape [2, 2]")


@pytest.mark.parametrize("op", OPS)
def test_device_mismatch(op, any_backend):
    lists, extra = case(op)
    lists = replaced(lists, len(lists) - 1, 2, torch.zeros(2, 2, device="meta"))
    assert_rejected(op, any_backend, lists, extra, "[2]", "meta", "cpu", "one device")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_floating_dtype(op, any_backend, dtype):
    lists, extra = case(op)
    lists = replaced(lists, len(lists) - 1, 2, torch.zeros(2, 2, dtype=dtype))
    # copy_ takes integer and bool tensors, copied only from their own dtype
    expected = (
        "copied only to and from its own dtype"
        if op == "copy_" and not dtype.is_complex
        else "expected float32"
    )
    assert_rejected(op, any_backend, lists, extra, "[2]", str(dtype).replace("torch.", ""), expected)


@pytest.mark.parametrize(
    "dst_dtype, src_dtype",
    [(torch.int64, torch.int32), (torch.bool, torch.uint8), (torch.int64, torch.float32)],
)
def test_copy_of_integers_needs_their_own_dtype(any_backend, dst_dtype, src_dtype):
    dst = [torch.zeros(3, dtype=torch.int16), torch.zeros(4, dtype=dst_dtype)]
    src = [torch.ones(3, dtype=torch.int16), torch.ones(4, dtype=src_dtype)]
    assert_rejected(
        "copy_",
        any_backend,
        [dst, src],
        (),
        "`src[1]`",
        str(src_dtype),
        f"`dst[1]` has dtype {dst_dtype}",
        "own dtype",
    )


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_destination(op, any_backend):
    lists, extra = case(op)
    lists = replaced(lists, 0, 0, torch.zeros(3, 4).t())
    assert_rejected(op, any_backend, lists, extra, "[0]", "contiguous", "strides [1, 4]")


def test_swap_dtype_mismatch(any_backend):
    lists, extra = case("swap_")
    lists = replaced(lists, 1, 2, torch.zeros(2, 2, dtype=torch.float64))
    assert_rejected("swap_", any_backend, lists, extra, "b[2]", "float64", "float32", "same dtype")


def test_moments_sq_dtype_differs_from_mean(any_backend):
    lists, extra = case("moments_")
    lists = replaced(lists, 1, 1, torch.zeros(5, dtype=torch.bfloat16))
    assert_rejected("moments_", any_backend, lists, extra, "sq[1]", "BFloat16".lower()[:4])


@pytest.mark.parametrize("op", OPS)
def test_check_raises_what_the_op_raises(op):
    """ops.check, which a caller uses to check several calls before making any, passes what the op
    runs and raises the op's own message, word for word, for what it refuses."""
    lists, extra = case(op)
    ops.check(op, *lists, *extra)
    bad_shape = replaced(lists, len(lists) - 1, 2, torch.zeros(5))
    bad_dtype = replaced(lists, len(lists) - 1, 1, torch.zeros(5, dtype=torch.complex64))
    for bad in (bad_shape, bad_dtype, [lst[:2] for lst in lists[:-1]] + [lists[-1]]):
        with pytest.raises(ValueError) as by_op:
            getattr(swa_fast, op)(*clone_lists(bad), *extra)
        with pytest.raises(ValueError) as by_check:
            ops.check(op, *bad, *extra)
        assert str(by_check.value) == str(by_op.value)


# The ops taking one 0-dim weight (not multi_lerp_'s vector of weights).
ONE_WEIGHT = [op for op in OPS if WEIGHTED[op] and ops.OP_TABLE[op].weight_name == "weight"]


@pytest.mark.parametrize(
    "weight,pattern",
    [
        (torch.tensor([0.5]), "0-dim"),
        (torch.tensor(1, dtype=torch.int64), "must be a floating-point tensor, got torch.int64"),
        (torch.tensor(0.5, device="meta"), "meta"),
        ("0.5", "must be a real number or a 0-dim floating-point tensor, got str"),
    ],
)
@pytest.mark.parametrize("op", ONE_WEIGHT)
def test_bad_weight(op, any_backend, weight, pattern):
    """A 0-dim weight's errors (multi_lerp_'s vector of weights: tests/test_multi_lerp.py)."""
    lists, _ = case(op)
    assert_rejected(op, any_backend, lists, (weight,), "weight", pattern)


def test_unknown_or_unavailable_backend():
    lists, extra = case("lerp_")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        swa_fast.lerp_(*lists, *extra, backend="gpu")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable for cpu tensors"):
        swa_fast.lerp_(*lists, *extra, backend="cuda")


ENV_BACKEND_RUN = """
import pytest, torch, swa_fast
a, b = [torch.zeros(3)], [torch.ones(3)]
if swa_fast.ops.ENV_BACKEND == "cuda":
    with pytest.raises(RuntimeError, match="'cuda' is unavailable"):
        swa_fast.lerp_(a, b, 0.5)
    assert a[0].eq(0).all()
else:
    assert swa_fast.choose_backend("cpu") == "reference"
    assert swa_fast.choose_backend("cpu", "foreach") == "foreach"  # an argument still wins
    swa_fast.lerp_(a, b, 0.5)
    assert a[0].eq(0.5).all()
"""


@pytest.mark.parametrize("forced", ["cuda", "reference"])
def test_env_var_forces_backend(forced):
    """SWA_FAST_BACKEND is read when swa_fast is imported (a new process sets it)."""
    env = {**os.environ, "SWA_FAST_BACKEND": forced}
    done = subprocess.run([sys.executable, "-c", ENV_BACKEND_RUN], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_empty_lists(any_backend):
    for op in ["lerp_", "moments_", "copy_", "swap_"]:
        lists, extra = case(op)
        getattr(swa_fast, op)(*[[] for _ in lists], *extra, backend=any_backend)


def test_non_tensor_in_list(any_backend):
    lists, extra = case("lerp_")
    lists = replaced(lists, 1, 1, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"src\[1\]` is a list, expected a Tensor"):
        swa_fast.lerp_(*lists, *extra, backend=any_backend)


@pytest.mark.parametrize(
    "weight,pattern",
    [
        (0.5 + 0.25j, "got complex"),
        (None, "got NoneType"),
        (torch.tensor(0.5 + 0j), "floating"),
    ],
    ids=["complex", "None", "complex-tensor"],
)
@pytest.mark.parametrize("op", [op for op in OPS if WEIGHTED[op]])
def test_weight_that_is_not_a_real_number(op, any_backend, weight, pattern):
    lists, _ = case(op)
    assert_rejected(op, any_backend, lists, (weight,), "weight", pattern)


def test_numpy_complex_weight(any_backend):
    import numpy as np

    lists, _ = case("lerp_")
    assert_rejected("lerp_", any_backend, lists, (np.complex64(0.5),), "weight", "got complex64")


def two_views(op, first, second):
    """The op's lists with its first list's last tensor replaced by `first` and its last list's
    last tensor by `second`."""
    lists, extra = case(op)
    lists = replaced(lists, 0, 2, first)
    return replaced(lists, len(lists) - 1, 2, second), extra


@pytest.mark.parametrize("op", OPS)
def test_partially_overlapping_destination_and_source(op, any_backend):
    base = torch.randn(6)
    lists, extra = two_views(op, base[:4].view(2, 2), base[2:].view(2, 2))
    assert_rejected(op, any_backend, lists, extra, "[2]` and `", "overlap in memory")


@pytest.mark.parametrize("op", OPS)
def test_overlapping_tensors_at_two_indices_of_a_written_list(op, any_backend):
    lists, extra = case(op)
    base = torch.randn(9)
    lists = replaced(replaced(lists, 0, 1, base[:5]), 0, 2, base[4:8].view(2, 2))
    assert_rejected(op, any_backend, lists, extra, "[1]` and `", "[2]`", "overlap in memory")


@pytest.mark.parametrize("op", OPS)
def test_one_tensor_twice_in_a_written_list(op, any_backend):
    lists, extra = case(op)
    lists = replaced(lists, 0, 2, lists[0][1].view(5)[:4].view(2, 2))
    assert_rejected(op, any_backend, lists, extra, "[1]` and `", "[2]`", "overlap in memory")


@pytest.mark.parametrize("op", OPS)
def test_source_overlapping_another_index_destination(op, any_backend):
    lists, extra = case(op)
    lists = replaced(lists, len(lists) - 1, 2, lists[0][1][1:].view(2, 2))
    assert_rejected(op, any_backend, lists, extra, "[1]` and `", "[2]`", "overlap in memory")


@pytest.mark.parametrize("op", ["lerp_", "moments_", "copy_"])
def test_strided_source_within_a_destination(op, any_backend):
    base = torch.randn(8)
    strided = base[1:5:2].view(2, 1).expand(2, 2)  # elements 1 and 3 of the destination
    lists, extra = two_views(op, base[:4].view(2, 2), strided)
    assert_rejected(op, any_backend, lists, extra, "[2]` and `", "overlap in memory")


def test_swap_of_a_tensor_with_itself(any_backend):
    """Refused like any two written tensors sharing memory: a swap with itself is never meant."""
    lists, extra = case("swap_")
    lists = replaced(lists, 1, 2, lists[0][2])
    assert_rejected("swap_", any_backend, lists, extra, "`a[2]` and `b[2]`", "overlap in memory")


def test_moments_with_mean_and_sq_one_tensor(any_backend):
    lists, extra = case("moments_")
    lists = replaced(lists, 1, 2, lists[0][2])
    assert_rejected("moments_", any_backend, lists, extra, "`mean[2]` and `sq[2]`", "overlap in memory")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr"])
def test_sparse_tensor(op, any_backend, layout):
    lists, extra = case(op)
    dense = torch.randn(2, 2)
    sparse = dense.to_sparse() if layout == "sparse_coo" else dense.to_sparse_csr()
    lists = replaced(lists, len(lists) - 1, 2, sparse)
    assert_rejected(op, any_backend, lists, extra, "[2]`", f"layout torch.{layout}", "expected a strided")


@pytest.mark.parametrize("op", OPS)
def test_negated_view_written_in_place(op, any_backend):
    lists, extra = case(op)
    lists = replaced(lists, 0, 2, torch.randn(2, 2)._neg_view())
    assert_rejected(op, any_backend, lists, extra, "[2]`", "negated view", "is_neg()")


@pytest.mark.parametrize("op", OPS)
def test_an_op_under_vmap_says_it_is_not_batched_and_writes_nothing(op, any_backend):
    """vmap's batched tensors have no storage: the op says it is not batched, naming itself (torch
    says "Cannot access data pointer of Tensor that doesn't have storage"), and writes nothing."""
    lists, extra = make_case(op, [(3, 4), (3,)], torch.float32, torch.float32)
    before = clone_lists(lists)

    def call(batched):
        getattr(swa_fast, op)(*batched, *extra, backend=any_backend)
        return batched[0][0]

    with pytest.raises(
        RuntimeError, match=rf"swa_fast\.{op} is not batched: it was called under torch\.func\.vmap"
    ):
        torch.func.vmap(call)(lists)
    for k, lst in enumerate(lists):
        assert all(torch.equal(t, b) for t, b in zip(lst, before[k])), f"{op} wrote list {k}"
