"""weighted_sum_: what the op-parametrised tests (test_ops, test_errors, test_opcheck,
test_triton_launchers, test_op_properties) do not cover: nested lists, any count of lists of sources
(more than the 8 of one pass too), one rounding (also across passes, and from an fp64 sum into bf16),
mixed dtypes at one index, a dst that is only written, a source that is dst itself, and each
refusal leaving dst as it was, with one message on every backend."""

import pytest
import torch

import swa_fast
from swa_fast import ops

SHAPES = [(4, 3), (7,), (0,), (2, 2, 2)]


def exact(shapes, dtype=torch.float32, seed=0):
    """Multiples of 1/8 below 8 in magnitude: exact in every float dtype, and their products with
    exact_weights and sums of a few dozen of them are exact in fp32, so every backend's result is
    the float64 one rounded once, whatever the order of its roundings."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(-64, 64, s, generator=g, dtype=torch.float64) / 8).to(dtype) for s in shapes]


def exact_weights(count):
    return [((k % 5) - 2) / 4 + 1 / 16 for k in range(count)]  # -0.4375 .. 0.5625


def float64_sum(srcs, weights, like):
    """Each index's sum in float64, rounded once into like[i]'s dtype."""
    out = []
    for i, d in enumerate(like):
        total = sum(
            (w * lst[i].double() for w, lst in zip(weights, srcs)), torch.zeros(d.shape, dtype=torch.float64)
        )
        out.append(total.to(d.dtype))
    return out


def assert_same(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), (g, w)


@pytest.mark.parametrize("count", [1, 2, 5, 8, 9, 17])
@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_any_count_of_lists(any_backend, count, dst_dtype):
    """K lists in one call (more than 8 in several passes) give the float64 sum rounded once."""
    srcs = [exact(SHAPES, torch.bfloat16 if k % 2 else torch.float32, seed=k) for k in range(count)]
    weights = exact_weights(count)
    dst = [torch.full(s, float("nan"), dtype=dst_dtype) for s in SHAPES]  # only written
    swa_fast.weighted_sum_(dst, srcs, weights, backend=any_backend)
    assert_same(dst, float64_sum(srcs, weights, dst))


@pytest.mark.parametrize("count", [2, 9])
def test_weights_as_a_tensor_and_the_concatenated_form(any_backend, count):
    srcs = [exact(SHAPES, seed=k) for k in range(count)]
    weights = exact_weights(count)
    want = float64_sum(srcs, weights, exact(SHAPES))
    for weights_arg in (torch.tensor(weights), torch.tensor(weights, dtype=torch.float64)[::1]):
        nested, flat = exact(SHAPES, seed=99), exact(SHAPES, seed=98)
        swa_fast.weighted_sum_(nested, srcs, weights_arg, backend=any_backend)
        swa_fast.weighted_sum_(flat, [t for lst in srcs for t in lst], weights_arg, backend=any_backend)
        assert_same(nested, want)
        assert_same(flat, want)


@pytest.mark.parametrize("count", [2, 9])
def test_a_bf16_dst_is_rounded_once(any_backend, count):
    """1 + 2^-8 is a tie between two bf16 numbers: the sum 1 + 2^-8 + 2^-9 rounds once to 1 + 2^-7,
    where rounding the first terms (or the sources, or one pass) first would give 1."""
    head = [1 + 2**-8] if count == 2 else [0.125 + 2**-11] * (count - 1)  # (eight terms: 1 + 2^-8)
    srcs = [[torch.tensor([v])] for v in head] + [[torch.tensor([2**-9])]]
    dst = [torch.zeros(1, dtype=torch.bfloat16)]
    swa_fast.weighted_sum_(dst, srcs, [1.0] * count, backend=any_backend)
    assert dst[0].item() == 1 + 2**-7


@pytest.mark.parametrize("dst_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("count", [2, 9])
def test_an_fp64_sum_into_bf16_or_fp16_is_rounded_once(any_backend, dst_dtype, count):
    """An fp64 source makes the sum fp64; it is rounded once into a bf16 or fp16 dst, where torch's
    conversion (through fp32) rounds 1 + ulp/2 + 2^-40 to the tie 1 + ulp/2, then to 1."""
    half_ulp = torch.finfo(dst_dtype).eps / 2
    zeros = [[torch.zeros(2)]] * (count - 2)
    srcs = [
        [torch.tensor([1 + half_ulp, -1 - half_ulp], dtype=torch.float64)],
        *zeros,
        [torch.tensor([2**-40, -(2**-40)])],
    ]
    assert torch.tensor(1 + half_ulp + 2**-40, dtype=torch.float64).to(dst_dtype).item() == 1  # torch's
    dst = [torch.zeros(2, dtype=dst_dtype)]
    swa_fast.weighted_sum_(dst, srcs, [1.0] * count, backend=any_backend)
    assert dst[0].tolist() == [1 + 2 * half_ulp, -1 - 2 * half_ulp]


def test_an_fp64_source_makes_the_sum_fp64_for_an_fp32_dst(any_backend):
    """1e8 + 1 - 1e8 is 1 in fp64, 0 in fp32."""
    srcs = [[torch.tensor([1e8 + 1], dtype=torch.float64)], [torch.tensor([-1e8])]]  # (-1e8: exact in fp32)
    dst = [torch.zeros(1)]
    swa_fast.weighted_sum_(dst, srcs, [1.0, 1.0], backend=any_backend)
    assert dst[0].item() == 1.0


def test_mixed_dtypes_at_one_index(any_backend):
    """Sources of four dtypes at one index, into each dst dtype, in one call."""
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float64]
    srcs = [exact(SHAPES, d, seed=k) for k, d in enumerate(dtypes)]
    weights = exact_weights(4)
    for dst_dtype in dtypes:
        dst = exact(SHAPES, dst_dtype, seed=7)
        swa_fast.weighted_sum_(dst, srcs, weights, backend=any_backend)
        assert_same(dst, float64_sum(srcs, weights, dst))
    # and per index: each tensor of a list with its own dtype
    rotated = [
        [exact([s], dtypes[(k + i) % 4], seed=k * 10 + i)[0] for i, s in enumerate(SHAPES)] for k in range(4)
    ]
    dst = [torch.empty(s, dtype=dtypes[i % 4]) for i, s in enumerate(SHAPES)]
    swa_fast.weighted_sum_(dst, rotated, weights, backend=any_backend)
    assert_same(dst, float64_sum(rotated, weights, dst))


@pytest.mark.parametrize("count", [2, 9])
def test_a_source_may_be_dst_itself(any_backend, count):
    """Task arithmetic in place: base = base + sum of scaled task vectors, base given as a source
    (first, or last: read before any pass writes dst)."""
    for position in (0, count - 1):
        base = exact(SHAPES, seed=50)
        others = [exact(SHAPES, seed=k) for k in range(count - 1)]
        srcs = others[:position] + [base] + others[position:]
        weights = exact_weights(count)
        want = float64_sum([[t.clone() for t in lst] for lst in srcs], weights, base)
        swa_fast.weighted_sum_(base, srcs, weights, backend=any_backend)
        assert_same(base, want)


def test_non_finite_values_and_weight_zero(any_backend):
    """Plain arithmetic: inf and NaN propagate, and a weight of 0 still reads its source (0 * inf is
    NaN); a first term of -0 stays -0."""
    nan, inf = float("nan"), float("inf")
    srcs = [[torch.tensor([inf, 1.0, -0.0, 2.0])], [torch.tensor([1.0, inf, -0.0, nan])]]
    dst = [torch.zeros(4)]
    swa_fast.weighted_sum_(dst, srcs, [0.5, 0.0], backend=any_backend)
    assert dst[0][0].item() == inf and dst[0][1:2].isnan().all() and dst[0][3].isnan()
    assert dst[0][2].item() == 0 and torch.signbit(dst[0][2])


def test_strided_and_negated_sources(any_backend):
    srcs = [
        [exact([(4, 6)], seed=1)[0].t(), exact([(5, 6)], seed=2)[0][:, ::2]],
        [exact([(6, 4)], seed=3)[0]._neg_view(), exact([(1, 3)], seed=4)[0].expand(5, 3)],
    ]
    plain = [[t.resolve_neg().contiguous() for t in lst] for lst in srcs]
    dst = [torch.empty(6, 4), torch.empty(5, 3)]
    swa_fast.weighted_sum_(dst, srcs, [0.25, -1.5], backend=any_backend)
    assert_same(dst, float64_sum(plain, [0.25, -1.5], dst))


def test_empty_lists_and_tensors(any_backend):
    swa_fast.weighted_sum_([], [[], []], [0.5, 0.5], backend=any_backend)
    swa_fast.weighted_sum_([], [], [0.5] * 9, backend=any_backend)
    dst = [torch.empty(0), torch.empty(3, 0)]
    swa_fast.weighted_sum_(dst, [[torch.empty(0), torch.empty(3, 0)]] * 9, [0.5] * 9, backend=any_backend)


# --- refusals: before anything is written, the same message on every backend ---------------------


def refusal(backend, dst, srcs, weights) -> str:
    before = [t.clone() for t in dst]
    with pytest.raises(ValueError) as info:
        swa_fast.weighted_sum_(dst, srcs, weights, backend=backend)
    assert all(torch.equal(t, b) for t, b in zip(dst, before)), "written before raising"
    return str(info.value)


def refused_calls():
    """(name, dst, srcs, weights, what the message says) for each refusal."""
    dst, two = exact(SHAPES, seed=1), [exact(SHAPES, seed=2), exact(SHAPES, seed=3)]
    base = torch.randn(10)
    nine = [exact(SHAPES, seed=k) for k in range(9)]
    return [
        ("no weights", dst, [], [], "`weights` has 0 elements; the op sums 1 to 8 lists of sources per call"),
        ("lists vs weights", dst, two, [0.5], "`srcs` has 2 lists but `weights` has 1 elements"),
        ("nested length", dst, [two[0], two[1][:3]], [0.5, 0.5], "`srcs[1]` has 3 tensors but `dst` has 4"),
        (
            "flat length",
            dst,
            two[0] + two[1][:3],
            [0.5, 0.5],
            "`srcs` has 7 tensors but `dst` has 4; expected 2 lists of 4",
        ),
        (
            "shape",
            dst,
            [two[0], two[1][:3] + [torch.zeros(3)]],
            [0.5, 0.5],
            "`srcs[1][3]` has shape [3] but `dst[3]` has shape [2, 2, 2]",
        ),
        (
            "device",
            dst,
            [two[0][:3] + [two[0][3].to("meta")], two[1]],
            [0.5, 0.5],
            "`srcs[0][3]` is on meta but `dst[0]` is on cpu",
        ),
        (
            "integer source",
            dst,
            [two[0][:3] + [torch.zeros(2, 2, 2, dtype=torch.int32)], two[1]],
            [0.5, 0.5],
            "`srcs[0][3]` has dtype torch.int32; expected float32",
        ),
        (
            "complex dst",
            dst[:3] + [torch.zeros(2, 2, 2, dtype=torch.complex64)],
            two,
            [0.5, 0.5],
            "`dst[3]` has dtype torch.complex64",
        ),
        (
            "int weights",
            dst,
            two,
            torch.tensor([1, 2]),
            "`weights` must be a floating-point tensor, got torch.int64",
        ),
        (
            "2-D weights",
            dst,
            two,
            torch.ones(2, 1),
            "`weights` must be a 1-D tensor (one weight per list of sources), got shape [2, 1]",
        ),
        (
            "weights on meta",
            dst,
            two,
            torch.ones(2, device="meta"),
            "`weights` is on meta but the tensors are on cpu",
        ),
        (
            "overlap",
            [base[:4].view(4, 1)],
            [[base[3:7].view(4, 1)], [torch.zeros(4, 1)]],
            [0.5, 0.5],
            "`dst[0]` and `srcs[0][0]` overlap in memory",
        ),
        (
            "overlap past a pass",
            [base[:4].view(4, 1)],
            [[torch.zeros(4, 1)]] * 8 + [[base[2:6].view(4, 1)]],
            [0.5] * 9,
            "`dst[0]` and `srcs[8][0]` overlap in memory",
        ),
        (
            "non-contiguous dst",
            [torch.zeros(3, 4).t()],
            [[torch.zeros(4, 3)]],
            [1.0],
            "`dst[0]` is written in place and must be contiguous",
        ),
        (
            "dst twice",
            [base[:4], base[:4]],
            [[torch.zeros(4)] * 2],
            [1.0],
            "`dst[0]` and `dst[1]` overlap in memory",
        ),
        (
            "a bad tensor in the last pass",
            nine[0],
            nine[1:] + [nine[0][:3] + [torch.zeros(5)]],
            [0.5] * 9,
            "`srcs[8][3]` has shape [5]",
        ),
    ]


@pytest.mark.parametrize("call", refused_calls(), ids=lambda c: c[0])
def test_refusals_write_nothing_and_say_the_same_on_every_backend(call):
    _, dst, srcs, weights, says = call
    messages = {b: refusal(b, dst, srcs, weights) for b in ops.usable_backends("cpu", reference=True)}
    assert len(set(messages.values())) == 1, messages
    message = next(iter(messages.values()))
    assert message.startswith("swa_fast.weighted_sum_: ") and says in message, message


def test_the_op_sums_at_most_eight_lists_per_call():
    """torch.ops.swa_fast.weighted_sum_ is one pass; the public function splits more."""
    dst, srcs = exact(SHAPES), [t for k in range(9) for t in exact(SHAPES, seed=k)]
    op = torch.ops.swa_fast.weighted_sum_triton if ops._C is None else torch.ops.swa_fast.weighted_sum_
    with pytest.raises(
        ValueError, match="`weights` has 9 elements; the op sums 1 to 8 lists of sources per call"
    ):
        op(dst, srcs, torch.full((9,), 0.5))


def test_a_sum_beyond_the_caches_streams_dst_as_the_small_calls_write_it():
    """A weighted_sum_ whose dst exceeds 32 MB is written through buffers streamed past the caches
    (csrc/cpu): the same bits as calls small enough for the plain loop, at any alignment, and nothing
    written outside."""
    n = 9 << 20  # 36 MB of fp32
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g).bfloat16()
    out = torch.zeros(n + 5)
    halves = [slice(0, n // 2), slice(n // 2, n)]
    dst = [out[3 : n // 2 + 3], out[n // 2 + 3 : n + 3]]  # misaligned starts
    swa_fast.weighted_sum_(dst, [[a[h] for h in halves], [b[h] for h in halves]], (0.3, 0.7), backend="cpu")
    want, piece = torch.empty(n), 1 << 18
    for i in range(0, n, piece):
        part = slice(i, i + piece)
        swa_fast.weighted_sum_([want[part]], [[a[part]], [b[part]]], (0.3, 0.7), backend="cpu")
    assert torch.equal(out[3 : n + 3], want)
    assert out[:3].eq(0).all() and out[n + 3 :].eq(0).all()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compile_fullgraph_soup(backend):
    """A uniform soup of three models traced whole by torch.compile, with a weights tensor."""
    if swa_fast.backend_status("cpu")[backend] is not None:
        pytest.skip(swa_fast.backend_status("cpu")[backend])
    torch._dynamo.reset()
    models = [exact([(5, 3), (4,)], seed=k) for k in range(3)]
    dst = [torch.empty(5, 3), torch.empty(4)]

    @torch.compile(fullgraph=True)
    def soup(dst, models, weights):
        swa_fast.weighted_sum_(dst, models, weights, backend=backend)

    soup(dst, models, torch.full((3,), 0.25))
    assert_same(dst, float64_sum(models, [0.25] * 3, dst))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("count", [3, 9])
def test_device_weights_without_host_sync_and_mixed_sources(backend, count):
    """On the GPU: weights on the device read by the kernel (no host synchronisation after the
    warm-up), aligned and misaligned tensors, sources of one dtype and mixed, against the float64
    sum."""
    if swa_fast.backend_status("cuda")[backend] is not None:
        pytest.skip(swa_fast.backend_status("cuda")[backend])
    shapes = [(70_001,), (3, 5), (16_384 * 3 + 7,)]
    for dtypes in ([torch.bfloat16] * count, [torch.bfloat16, torch.float32, torch.float64] * 3):
        srcs = [[t.cuda() for t in exact(shapes, dtypes[k], seed=k)] for k in range(count)]
        srcs[0][1] = torch.empty(16, device="cuda", dtype=dtypes[0])[1:].view(3, 5).copy_(srcs[0][1])
        weights = exact_weights(count)
        device_weights = torch.tensor(weights, device="cuda")
        dst = [torch.empty(s, device="cuda", dtype=torch.bfloat16) for s in shapes]
        swa_fast.weighted_sum_(dst, srcs, device_weights, backend=backend)  # warm-up
        torch.cuda.set_sync_debug_mode("error")
        try:
            swa_fast.weighted_sum_(dst, srcs, device_weights, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        want = float64_sum([[t.cpu() for t in lst] for lst in srcs], weights, [d.cpu() for d in dst])
        assert_same([d.cpu() for d in dst], want)
