"""multi_lerp_: what the op-parametrised tests (test_ops, test_errors, test_opcheck,
test_triton_launchers, test_op_properties) do not cover: nested lists, its vector of weights, the
split of more than 4 averages into passes, per-average weights 0 and 1, and averages of different
dtypes at one index."""

import numpy as np
import pytest
import torch

import swa_fast
from swa_fast import ops


def rand(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


SHAPES = [(4, 3), (7,), (0,), (2, 2, 2)]


def expected_lerps(avgs, src, weights, backend):
    """Each average as lerp_ on the same backend would leave it (one call per average)."""
    out = [[a.clone() for a in lst] for lst in avgs]
    for lst, w in zip(out, weights):
        swa_fast.lerp_(lst, [s.clone() for s in src], w, backend=backend)
    return out


def assert_same(got, want):
    for g_list, w_list in zip(got, want):
        for g, w in zip(g_list, w_list):
            assert g.dtype == w.dtype and torch.equal(g, w), (g, w)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_each_average_is_its_own_lerp(any_backend, count, as_tensor):
    """K averages in one call give what K lerp_ calls give, bit for bit (one rounding each), for any
    K (more than 4 run as several passes)."""
    avgs = [rand(SHAPES, seed=k + 1) for k in range(count)]
    src = rand(SHAPES, torch.bfloat16)
    weights = [0.05 * (k + 1) for k in range(count)]
    want = expected_lerps(avgs, src, weights, any_backend)
    swa_fast.multi_lerp_(avgs, src, torch.tensor(weights) if as_tensor else weights, backend=any_backend)
    assert_same(avgs, want)


def test_the_concatenated_form_is_the_nested_one(any_backend):
    nested = [rand(SHAPES, seed=1), rand(SHAPES, seed=2)]
    flat = [t.clone() for lst in nested for t in lst]
    src = rand(SHAPES, seed=3)
    swa_fast.multi_lerp_(nested, src, (0.25, 0.75), backend=any_backend)
    swa_fast.multi_lerp_(flat, src, (0.25, 0.75), backend=any_backend)
    assert all(torch.equal(a, b) for a, b in zip(flat, [t for lst in nested for t in lst]))


@pytest.mark.parametrize("weights", [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1, True]])
def test_weights_zero_and_one_per_average(any_backend, weights):
    """Weight 0 leaves that average exactly as it was, even where src is not finite; weight 1 writes
    src, even where the average is not finite; the other average is unaffected."""
    nan, inf = float("nan"), float("inf")
    src = [torch.tensor([inf, nan, 2.0, -0.0])]
    avgs = [[torch.tensor([nan, 1.0, -inf, 0.0])], [torch.tensor([-0.0, inf, 3.0, nan])]]
    before = [lst[0].clone() for lst in avgs]
    swa_fast.multi_lerp_(avgs, src, weights, backend=any_backend)
    for k, w in enumerate(weights):
        want = src[0] if w else before[k]
        assert torch.equal(avgs[k][0].view(torch.int32), want.view(torch.int32)), (k, avgs[k][0])


def test_averages_of_different_dtypes_at_one_index(any_backend):
    """Each average rounds once into its own dtype; a source that is one of the averages is read as
    it was before the call by every average."""
    src = rand(SHAPES, torch.float32, seed=5)
    avgs = [rand(SHAPES, torch.bfloat16, seed=6), rand(SHAPES, torch.float64, seed=7), list(src)]
    weights = [0.3, 0.6, 0.9]
    want = expected_lerps(avgs, [s.clone() for s in src], weights, any_backend)
    swa_fast.multi_lerp_(avgs, src, weights, backend=any_backend)
    assert_same(avgs, want)


@pytest.mark.parametrize("own", [0, 1])
def test_a_source_that_is_an_average_changed_by_its_own_pass_is_read_as_it_was(any_backend, own):
    """With averages of different dtypes (one pass each), average `own` is the source itself, and
    its pass changes it where it is inf (lerp of inf with itself is NaN): every other average still
    reads the source as it was before the call."""
    src = rand(SHAPES, torch.float32, seed=5)
    src[0][1, 2], src[1][3] = float("inf"), float("-inf")
    others = [rand(SHAPES, torch.float64, seed=6), rand(SHAPES, torch.bfloat16, seed=7)]
    avgs = others[:own] + [list(src)] + others[own:]
    weights = [0.5, 0.25, 1.0]
    want = expected_lerps(avgs, [s.clone() for s in src], weights, any_backend)
    swa_fast.multi_lerp_(avgs, src, weights, backend=any_backend)
    for g_list, w_list in zip(avgs, want):
        for g, w in zip(g_list, w_list):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "weights",
    [
        lambda: np.array([0.25, 0.5]),
        lambda: (w for w in (0.25, 0.5)),
        lambda: (np.float32(0.25), np.float16(0.5)),
        lambda: torch.tensor([0.25, 0.5]).half(),
    ],
    ids=["ndarray", "generator", "numpy-scalars", "half-tensor"],
)
def test_any_real_weights(any_backend, weights):
    avgs, src = [rand(SHAPES, seed=1), rand(SHAPES, seed=2)], rand(SHAPES, seed=3)
    want = expected_lerps(avgs, src, [0.25, 0.5], any_backend)
    swa_fast.multi_lerp_(avgs, src, weights(), backend=any_backend)
    assert_same(avgs, want)


def test_a_strided_weights_tensor_is_read_at_its_strides(any_backend):
    avgs, src = [rand(SHAPES, seed=1), rand(SHAPES, seed=2)], rand(SHAPES, seed=3)
    weights = torch.tensor([0.25, -1.0, 0.5, -1.0])[::2]
    want = expected_lerps(avgs, src, [0.25, 0.5], any_backend)
    swa_fast.multi_lerp_(avgs, src, weights, backend=any_backend)
    assert_same(avgs, want)


def assert_rejected(backend, avgs, src, weights, *patterns):
    before = [[t.clone() for t in lst] for lst in avgs]
    with pytest.raises(ValueError) as info:
        swa_fast.multi_lerp_(avgs, src, weights, backend=backend)
    for p in patterns:
        assert p in str(info.value), f"{p!r} not in {info.value}"
    assert all(torch.equal(t, b) for lst, bl in zip(avgs, before) for t, b in zip(lst, bl)), "written"


@pytest.mark.parametrize(
    "weights,patterns",
    [
        (torch.tensor(0.5), ["`weights` must be a 1-D tensor", "got shape []"]),
        (torch.ones(2, 1), ["`weights` must be a 1-D tensor", "got shape [2, 1]"]),
        (torch.tensor([1, 2]), ["`weights` must be a floating-point tensor, got torch.int64"]),
        (torch.tensor([0.5, 0.5], device="meta"), ["`weights` is on meta but the tensors are on cpu"]),
        (0.5, ["`weights` must be a sequence of real numbers or a 1-D floating-point tensor, got float"]),
        ("ab", ["`weights` must be a sequence of real numbers", "got str"]),
        ([0.5, "a"], ["`weights[1]` must be a real number, got str"]),
        ([0.5, torch.tensor(0.5)], ["`weights[1]` must be a real number, got Tensor"]),
        ([0.5, 0.5j], ["`weights[1]` must be a real number, got complex"]),
    ],
    ids=["0-dim", "2-D", "int", "meta", "float", "str", "str-item", "tensor-item", "complex-item"],
)
def test_bad_weights(any_backend, weights, patterns):
    avgs, src = [rand(SHAPES, seed=1), rand(SHAPES, seed=2)], rand(SHAPES, seed=3)
    assert_rejected(any_backend, avgs, src, weights, "swa_fast.multi_lerp_", *patterns)


def test_no_weights(any_backend):
    assert_rejected(any_backend, [], [], [], "`weights` has 0 elements", "1 to 4 averages per call")


def test_more_lists_than_weights(any_backend):
    avgs = [rand(SHAPES, seed=k) for k in range(3)]
    assert_rejected(any_backend, avgs, rand(SHAPES), [0.5, 0.5], "`avgs` has 3 lists but `weights` has 2")


def test_lists_of_unequal_lengths(any_backend):
    avgs = [rand(SHAPES, seed=1), rand(SHAPES[:3], seed=2)]
    assert_rejected(
        any_backend, avgs, rand(SHAPES), [0.5, 0.5], "`avgs[1]` has 3 tensors but `avgs[0]` has 4"
    )
    flat = rand(SHAPES, seed=1) + rand(SHAPES[:3], seed=2)
    assert_rejected(any_backend, [flat], rand(SHAPES), [0.5, 0.5], "`avgs` has 1 lists")
    assert_rejected(
        any_backend, flat, rand(SHAPES), [0.5, 0.5], "`avgs` has 7 tensors", "not a multiple of the 2"
    )
    assert_rejected(any_backend, [rand(SHAPES)] * 2, rand(SHAPES[:3]), [0.5, 0.5], "`src` has 3 tensors")


@pytest.mark.parametrize("count", [2, 6])
def test_an_average_written_twice_is_refused(any_backend, count):
    """The same tensor as two averages (at any index, also across passes) overlaps itself."""
    avgs = [rand(SHAPES, seed=k) for k in range(count)]
    avgs[-1][1] = avgs[0][1]
    assert_rejected(
        any_backend, avgs, rand(SHAPES), [0.5] * count, "`avgs[0][1]` and `avgs[", "overlap in memory"
    )


def test_the_op_takes_at_most_four_averages_per_call():
    """torch.ops.swa_fast.multi_lerp_ is one pass; the public function splits more."""
    avgs, src = [t for k in range(5) for t in rand(SHAPES, seed=k)], rand(SHAPES)
    op = torch.ops.swa_fast.multi_lerp_triton if ops._C is None else torch.ops.swa_fast.multi_lerp_
    with pytest.raises(ValueError, match="`weights` has 5 elements; the op updates 1 to 4 averages per call"):
        op(avgs, src, torch.full((5,), 0.5))


def test_written_averages_bump_their_version(backend):
    avgs, src = [rand(SHAPES, seed=1), rand(SHAPES, seed=2)], rand(SHAPES, seed=3)
    before = [t._version for lst in avgs for t in lst] + [t._version for t in src]
    swa_fast.multi_lerp_(avgs, src, [0.5, 0.25], backend=backend)
    after = [t._version for lst in avgs for t in lst] + [t._version for t in src]
    n = len(before) - len(src)
    assert all(a > b for a, b in zip(after[:n], before[:n])) and after[n:] == before[n:]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compile_fullgraph_two_averages(backend):
    """Two EMAs of a model traced whole by torch.compile, with device-side weights."""
    if swa_fast.backend_status("cpu")[backend] is not None:
        pytest.skip(swa_fast.backend_status("cpu")[backend])
    torch._dynamo.reset()
    avgs = [[torch.zeros(5, 3), torch.zeros(4)] for _ in range(2)]
    params = [torch.randn(5, 3), torch.randn(4)]

    @torch.compile(fullgraph=True)
    def update(avgs, params, weights):
        swa_fast.multi_lerp_(avgs, params, weights, backend=backend)

    for n in range(3):
        update(avgs, params, torch.tensor([1.0 / (n + 1), 0.5]))
    for a, p in zip(avgs[0], params):
        torch.testing.assert_close(a, p)
    for a, p in zip(avgs[1], params):
        torch.testing.assert_close(a, p * 0.875)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_device_weights_without_host_sync_and_in_a_cuda_graph(backend):
    """Weights on the device are read by the kernel: no host synchronisation after the warm-up, and
    a captured update replays with the weights' new values."""
    if swa_fast.backend_status("cuda")[backend] is not None:
        pytest.skip(swa_fast.backend_status("cuda")[backend])
    avgs = [[torch.zeros(3000, device="cuda"), torch.zeros(7, device="cuda")] for _ in range(3)]
    src = [torch.randn(3000, device="cuda"), torch.randn(7, device="cuda")]
    weights = torch.ones(3, device="cuda")
    swa_fast.multi_lerp_(avgs, src, weights, backend=backend)  # warm-up outside the graph
    torch.cuda.set_sync_debug_mode("error")
    try:
        swa_fast.multi_lerp_(avgs, src, weights, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for lst in avgs:
        for a in lst:
            a.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        swa_fast.multi_lerp_(avgs, src, weights, backend=backend)
    weights.copy_(torch.tensor([0.5, 0.0, 1.0]))
    graph.replay()
    torch.cuda.synchronize()
    for k, factor in enumerate((0.5, 0.0, 1.0)):
        for a, s in zip(avgs[k], src):
            torch.testing.assert_close(a, factor * s)
