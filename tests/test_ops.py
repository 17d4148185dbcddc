"""Each op on each CPU backend (compiled C++, Triton interpreted, foreach) against reference.py."""

import itertools
import pickle

import pytest
import torch
from conftest import FLOATS, OPS, clone_lists, integer_copy_case, make_case, run_and_check, same_bits

import swa_fast
from swa_fast.ops.checks import INTEGER_DTYPES

# 0, 1, odd, around each backend's chunk (CPU 65536, Triton 4096, CUDA 16384), and 1e6+.
SIZES = [0, 1, 7, 4095, 4097, 16385, 65535, 65536, 65537]
DTYPE_PAIRS = list(itertools.product(FLOATS, FLOATS))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dst_dtype,src_dtype", DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
def test_dtype_pairs(op, backend, dst_dtype, src_dtype):
    run_and_check(op, backend, [(3, 5), (17,), (2, 3, 4)], dst_dtype, src_dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("size", SIZES)
def test_sizes(op, backend, size):
    run_and_check(op, backend, [(size,)], torch.float32, torch.float32)
    run_and_check(op, backend, [(size,)], torch.bfloat16, torch.bfloat16, seed=1)


@pytest.mark.parametrize("op", OPS)
def test_large_tensor(op, backend):
    run_and_check(op, backend, [(1_000_003,), (5,)], torch.float32, torch.bfloat16)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n_tensors", [1, 2, 100, 2000])
def test_many_tensors(op, backend, n_tensors):
    shapes = [((i * 37) % 300,) for i in range(n_tensors)]  # includes empty tensors
    run_and_check(op, backend, shapes, torch.float32, torch.float32)


@pytest.mark.parametrize("op", OPS)
def test_mixed_dtypes_in_one_list(op, backend):
    """A list whose tensors each pair a different dtype runs as one call."""
    lists_by_pair = []
    for d, s in DTYPE_PAIRS:
        from conftest import make_case

        lists, extra = make_case(op, [(33,)], d, s, seed=len(lists_by_pair))
        lists_by_pair.append(lists)
    lists = [[t for lists in lists_by_pair for t in lists[k]] for k in range(len(lists_by_pair[0]))]
    from conftest import assert_matches_reference, clone_lists

    import swa_fast

    before = clone_lists(lists)
    getattr(swa_fast, op)(*lists, *extra, backend=backend)
    assert_matches_reference(op, before, lists, extra)


@pytest.mark.parametrize("op", ["lerp_", "moments_", "copy_"])
def test_non_contiguous_source(op, backend):
    from conftest import assert_matches_reference, clone_lists, make_case

    import swa_fast

    lists, extra = make_case(op, [(6, 4), (5, 3)], torch.float32, torch.float32)
    src = [torch.randn(4, 6).t(), torch.randn(5, 6)[:, ::2]]
    assert not any(s.is_contiguous() for s in src)
    lists[-1] = src
    before = clone_lists(lists)
    getattr(swa_fast, op)(*lists, *extra, backend=backend)
    assert_matches_reference(op, before, lists, extra)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float64])
def test_tensor_weight(backend, weight_dtype):
    from conftest import assert_matches_reference, clone_lists, make_case

    import swa_fast

    lists, _ = make_case("lerp_", [(100,), (3,)], torch.float32, torch.float32)
    weight = torch.tensor(0.125, dtype=weight_dtype)
    before = clone_lists(lists)
    swa_fast.lerp_(*lists, weight, backend=backend)
    assert_matches_reference("lerp_", before, lists, (weight,))


def test_swa_average_of_known_tensors(backend):
    """Weights 1/(n+1) over N tensors give their arithmetic mean."""
    import swa_fast

    values = [torch.full((1000,), float(v)) for v in (1.0, 2.0, 6.0, -3.0)]
    avg = [torch.zeros(1000)]
    for n, v in enumerate(values):
        swa_fast.lerp_(avg, [v], torch.tensor(1.0 / (n + 1)), backend=backend)
    torch.testing.assert_close(avg[0], torch.full((1000,), 1.5))


@pytest.mark.parametrize("op", OPS)
def test_written_tensors_bump_their_version(op, backend):
    """As for any in-place PyTorch op, so autograd notices tensors changed under it."""
    from conftest import WRITTEN, make_case

    import swa_fast

    lists, extra = make_case(op, [(3,), (4,)], torch.float32, torch.float32)
    before = [[t._version for t in lst] for lst in lists]
    getattr(swa_fast, op)(*lists, *extra, backend=backend)
    for k, lst in enumerate(lists):
        changed = [t._version > v for t, v in zip(lst, before[k])]
        assert all(changed) if k < WRITTEN[op] else not any(changed), (k, changed)


def test_tuples_and_generators_are_accepted(backend):
    import swa_fast

    avg = (torch.zeros(3), torch.zeros(2))
    swa_fast.lerp_(avg, iter([torch.ones(3), torch.ones(2)]), 0.5, backend=backend)
    assert all(torch.equal(a, torch.full_like(a, 0.5)) for a in avg)


def test_every_fp16_value_widens_exactly(backend):
    """All 65,536 fp16 bit patterns (subnormals, infinities, NaN) load as PyTorch converts them."""
    import swa_fast

    half = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    out = [torch.empty(half.shape)]
    swa_fast.copy_(out, [half], backend=backend)
    want = half.float()
    nan = want.isnan()
    assert torch.equal(out[0][~nan].view(torch.int32), want[~nan].view(torch.int32))
    assert out[0][nan].isnan().all()


def test_fp32_narrows_to_fp16_as_torch_rounds(backend):
    """fp32 -> fp16 on a sweep of every 499th fp32 bit pattern of both signs and the edges of fp16's
    range (the largest finite value, the carry into infinity, the smallest subnormal and the halfway
    cases below it, NaN): the bits PyTorch's conversion gives, NaN kept NaN."""
    import swa_fast

    edges = [
        0x477FE000,
        0x477FEFFF,
        0x477FF000,
        0x38800000,
        0x387FFFFF,
        0x33000000,
        0x33000001,
        0x32FFFFFF,
        0x33400000,
        0x7F800000,
        0x7F800001,
        0x7FC00000,
    ]
    bits = torch.cat([torch.arange(0, 2**31, 499, dtype=torch.int64), torch.tensor(edges)])
    x = torch.cat([bits, bits - 2**31]).to(torch.int32).view(torch.float32)  # (bits - 2**31: the sign set)
    out = [torch.empty(x.shape, dtype=torch.float16)]
    swa_fast.copy_(out, [x], backend=backend)
    want = x.to(torch.float16)
    nan = x.isnan()
    assert torch.equal(out[0][~nan].view(torch.int16), want[~nan].view(torch.int16))
    assert out[0][nan].isnan().all()


@pytest.mark.parametrize("counted", [False, True], ids=["copy_", "lerp_ with stats"])
def test_fp32_narrows_to_bf16_as_torch_rounds(counted, backend):
    """fp32 -> bf16 to nearest even on a sweep of every 499th fp32 bit pattern of both signs and the
    edges (ties either way, the carry into infinity, NaN): the bits PyTorch's conversion gives, NaN
    kept NaN; by copy_ and by lerp_ at weight 1 with `stats` (the CPU's loop that counts)."""
    import swa_fast
    from swa_fast.ops.pass_stats import stats_tensor

    edges = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x7F7F8000, 0x7F7F7FFF, 0x7F800000, 0x7F800001, 0x7FFFFFFF]
    bits = torch.cat([torch.arange(0, 2**31, 499, dtype=torch.int64), torch.tensor(edges)])
    x = torch.cat([bits, bits - 2**31]).to(torch.int32).view(torch.float32)  # (bits - 2**31: the sign set)
    out = [torch.zeros(x.shape, dtype=torch.bfloat16)]
    if counted:
        swa_fast.lerp_(out, [x], 1.0, stats=stats_tensor(1), backend=backend)
    else:
        swa_fast.copy_(out, [x], backend=backend)
    want = x.to(torch.bfloat16)
    nan = x.isnan()
    assert torch.equal(out[0][~nan].view(torch.int16), want[~nan].view(torch.int16))
    assert out[0][nan].isnan().all()


@pytest.mark.parametrize("op", ["lerp_", "moments_"])
def test_weight_one_copies_exactly(op, backend):
    """Weight 1 (the first SWA update, 1/(0+1)) gives the source bit for bit, as torch.lerp does,
    even where avg + 1 * (src - avg) would round."""
    import swa_fast

    src = torch.tensor([1.0, 3e-8, -7.1, 1e-30])
    dst = [torch.tensor([1e10, 1.0, 2.0, -5.0])]
    sq = [torch.full_like(src, 9.0)]
    getattr(swa_fast, op)(dst, *([sq] if op == "moments_" else []), [src], torch.tensor(1.0), backend=backend)
    assert torch.equal(dst[0], src)
    if op == "moments_":
        assert torch.equal(sq[0], src * src)


@pytest.mark.parametrize("op", ["lerp_", "moments_"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_weight_zero_keeps_the_destination_even_for_non_finite_sources(op, backend, as_tensor):
    """What lets a manager skip a non-finite update on the device: weight 0 changes nothing."""
    import swa_fast

    src = torch.tensor([float("inf"), float("nan"), -float("inf"), 2.0])
    dst = [torch.tensor([1.0, -2.0, 3.5, 4.0])]
    sq = [torch.tensor([1.0, 4.0, 12.25, 16.0])]
    before = [dst[0].clone(), sq[0].clone()]
    weight = torch.tensor(0.0) if as_tensor else 0.0
    getattr(swa_fast, op)(dst, *([sq] if op == "moments_" else []), [src], weight, backend=backend)
    assert torch.equal(dst[0], before[0]) and torch.equal(sq[0], before[1])


@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_copy_moves_integers_and_bools_bit_for_bit(any_backend, dtype):
    """A model's buffers hold integers (BatchNorm's num_batches_tracked) beside its floats: copy_
    takes both in one call, the integers bit for bit in their own dtype."""
    dst, src = integer_copy_case(dtype)
    floats = [torch.zeros(5, dtype=torch.bfloat16)], [torch.randn(5)]
    swa_fast.copy_(dst + floats[0], src + floats[1], backend=any_backend)
    assert all(same_bits(d, s) for d, s in zip(dst, src))
    assert torch.equal(floats[0][0], floats[1][0].bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64])
def test_copy_beyond_the_caches(dtype):
    """copy_ of more than 32 MB between tensors of one dtype streams its stores past the caches
    (csrc/cpu): every byte must still land, at any alignment, and a cast copy of that size too."""
    import swa_fast

    n = (40 << 20) // torch.tensor([], dtype=dtype).element_size()
    base = torch.randn(n + 3, dtype=torch.float64).mul(1e6).to(dtype)
    src = [base[1 : n // 2 + 1], base[n // 2 + 1 : n + 2].view(-1, 1)]  # misaligned starts
    out = torch.zeros(n + 5, dtype=dtype)
    dst = [out[3 : n // 2 + 3], out[n // 2 + 3 : n + 4].view(-1, 1)]
    swa_fast.copy_(dst, src, backend="cpu")
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    assert out[:3].eq(0).all() and out[n + 4 :].eq(0).all()  # nothing written outside
    if dtype.is_floating_point:
        wide = [torch.zeros(s.shape, dtype=torch.float32) for s in src]
        swa_fast.copy_(wide, src, backend="cpu")
        assert all(torch.equal(w, s.float()) for w, s in zip(wide, src))


def test_bema_beyond_the_caches_streams_out_as_the_small_passes_write_it():
    """bema_ over more than 32 MB writes its `out` list through buffers streamed past the caches
    (csrc/cpu): the same bits as calls small enough for the plain loop, at any alignment, and
    nothing written outside."""
    import swa_fast

    n = 10 << 20  # 40 MB of fp32 per list
    g = torch.Generator().manual_seed(0)
    ema, start, src = (torch.randn(n, generator=g) for _ in range(3))
    out = torch.zeros(n + 5)
    outs = [out[3 : n // 2 + 3], out[n // 2 + 3 : n + 3]]  # misaligned starts
    halves = [slice(0, n // 2), slice(n // 2, n)]
    ema_big = [ema[h].clone() for h in halves]
    swa_fast.bema_(
        ema_big, outs, [start[h] for h in halves], [src[h] for h in halves], (0.3, 0.7), backend="cpu"
    )
    piece = 1 << 20  # 4 MB per list: the plain loop
    want_ema, want_out = ema.clone(), torch.empty(n)
    for i in range(0, n, piece):
        part = slice(i, i + piece)
        swa_fast.bema_(
            [want_ema[part]], [want_out[part]], [start[part]], [src[part]], (0.3, 0.7), backend="cpu"
        )
    assert torch.equal(torch.cat(ema_big), want_ema)
    assert torch.equal(out[3 : n + 3], want_out)
    assert out[:3].eq(0).all() and out[n + 3 :].eq(0).all()


@pytest.mark.parametrize("backend", ["cpu", "foreach"])  # (Triton's CPU interpreter is not thread-safe)
def test_float_weights_from_several_threads_at_once(backend):
    """Each thread's float weight is its own, also while the kernels run without the GIL."""
    import threading

    import swa_fast

    weights = [0.125, 0.25, 0.5, 0.75]
    results = {}

    def run(k):
        avg = [torch.zeros(20_000) for _ in range(8)]
        src = [torch.ones(20_000) for _ in range(8)]
        for _ in range(50):
            swa_fast.lerp_(avg, src, weights[k], backend=backend)
        results[k] = avg

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(weights))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, w in enumerate(weights):
        expected = torch.zeros(20_000)
        for _ in range(50):
            expected.lerp_(torch.ones(20_000), w)
        assert all(torch.allclose(a, expected, rtol=1e-6, atol=0) for a in results[k]), w


@pytest.mark.parametrize("op", ["lerp_", "moments_"])
@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_weight_one_writes_the_source_even_over_non_finite_destinations(op, any_backend, as_tensor, dtype):
    """An average that holds inf or NaN (a diverged run, a model initialised on the meta device)
    becomes the source at weight 1, as torch's AveragedModel does on its first update."""
    import swa_fast

    nan, inf = float("nan"), float("inf")
    src = torch.tensor([1.5, -2.0, 3.0, 0.25], dtype=dtype)
    dst = [torch.tensor([nan, inf, -inf, nan], dtype=dtype)]
    sq = [torch.tensor([inf, nan, 1.0, -inf], dtype=dtype)]
    weight = torch.tensor(1.0) if as_tensor else 1.0
    getattr(swa_fast, op)(dst, *([sq] if op == "moments_" else []), [src], weight, backend=any_backend)
    assert torch.equal(dst[0], src)
    if op == "moments_":
        assert torch.equal(sq[0], src * src)


@pytest.mark.parametrize("op", ["lerp_", "moments_"])
def test_weight_zero_keeps_non_finite_destinations_on_every_backend(op, any_backend):
    import swa_fast

    src = torch.tensor([float("inf"), float("nan"), 2.0])
    dst = [torch.tensor([float("nan"), 1.0, float("inf")])]
    sq = [torch.tensor([1.0, float("-inf"), float("nan")])]
    before = [dst[0].clone(), sq[0].clone()]
    getattr(swa_fast, op)(dst, *([sq] if op == "moments_" else []), [src], 0.0, backend=any_backend)
    assert torch.equal(dst[0].view(torch.int32), before[0].view(torch.int32))
    assert torch.equal(sq[0].view(torch.int32), before[1].view(torch.int32))


def test_low_precision_destinations_are_rounded_once(any_backend):
    """fp32 arithmetic, then one rounding into bf16: casting the source to bf16 first (1.5625)
    would give 0.21484375 here instead of the correctly rounded 0.2158203125."""
    import swa_fast

    src = torch.tensor([1.5558264255523682])  # an fp32 value
    avg = [torch.tensor([-1.125], dtype=torch.bfloat16)]
    swa_fast.lerp_(avg, [src], 0.5, backend=any_backend)
    exact = (-1.125 + src.double()) / 2
    assert torch.equal(avg[0], exact.to(torch.bfloat16)), avg[0].item()
    assert avg[0].item() == 0.2158203125


def test_squares_of_low_precision_moments_are_taken_in_fp32(any_backend):
    """300^2 overflows fp16, but the updated second moment 0.01 * 300^2 = 900 does not."""
    import swa_fast

    mean, sq = [torch.zeros(2, dtype=torch.float16)], [torch.zeros(2, dtype=torch.float16)]
    for src in (torch.full((2,), 300.0), torch.full((2,), 300.0, dtype=torch.float16)):
        mean[0].zero_(), sq[0].zero_()
        swa_fast.moments_(mean, sq, [src], 0.01, backend=any_backend)
        assert torch.equal(sq[0], torch.full((2,), 900.0, dtype=torch.float16)), sq[0]
        assert torch.equal(mean[0], torch.full((2,), 3.0, dtype=torch.float16)), mean[0]


def _real_weights():
    from fractions import Fraction

    import numpy as np

    return [
        np.float32(0.25),
        np.float64(0.25),
        np.float16(0.25),
        Fraction(1, 4),
        torch.tensor(0.25, dtype=torch.bfloat16),
        torch.tensor(0.25, dtype=torch.float16),
        torch.tensor(0.25, dtype=torch.float64),
    ]


@pytest.mark.parametrize("op", ["lerp_", "moments_"])
@pytest.mark.parametrize(
    "weight", _real_weights(), ids=lambda w: f"{type(w).__name__}{getattr(w, 'dtype', '')}"
)
def test_any_real_weight_is_accepted(op, any_backend, weight):
    """Weights torch.lerp accepts: numpy scalars, other real numbers, 0-dim tensors of any floating
    dtype; each acts as the float it stands for."""
    import swa_fast

    lists, _ = make_case(op, [(5, 3), (7,)], torch.float32, torch.float32)
    expected = clone_lists(lists)
    getattr(swa_fast, op)(*expected, 0.25, backend=any_backend)
    getattr(swa_fast, op)(*lists, weight, backend=any_backend)
    for got, want in zip(lists, expected):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("weight", [1, True, 0, False])
def test_integer_and_bool_weights_are_exact_ends(any_backend, weight):
    import swa_fast

    avg, src = [torch.tensor([float("nan"), 2.0])], [torch.tensor([3.0, 5.0])]
    swa_fast.lerp_(avg, src, weight, backend=any_backend)
    want = src[0] if weight else torch.tensor([float("nan"), 2.0])
    torch.testing.assert_close(avg[0], want, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["lerp_", "moments_", "copy_"])
def test_negated_views_are_read_as_their_values(op, any_backend):
    """x._neg_view() shares x's memory with a lazy sign bit: it must be read as -x."""
    import swa_fast

    lists, extra = make_case(op, [(4, 3), (6,)], torch.float32, torch.float32)
    values = [torch.randn(4, 3), torch.randn(6)]
    lists[-1] = [v._neg_view() for v in values]
    assert all(s.is_neg() for s in lists[-1])
    expected = clone_lists(lists[:-1]) + [[-v for v in values]]
    getattr(swa_fast, op)(*expected, *extra, backend="reference")
    getattr(swa_fast, op)(*lists, *extra, backend=any_backend)
    for k in range(len(lists) - 1):
        for got, want in zip(lists[k], expected[k]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["lerp_", "moments_", "copy_"])
def test_a_source_may_be_its_own_destination(op, any_backend):
    import swa_fast

    lists, extra = make_case(op, [(4, 3), (6,)], torch.float32, torch.float32)
    lists[-1] = list(lists[0])  # the same tensors: read, then written in place
    before = clone_lists(lists)
    getattr(swa_fast, op)(*lists, *extra, backend=any_backend)
    for got, want in zip(lists[0], before[0]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weight", [-0.5, -2.0, 0.75, 1.5])
def test_non_finite_values_give_what_torch_lerp_gives(any_backend, weight):
    """Each side of |weight| = 0.5 uses torch.lerp's formula, so inf and NaN come out where they
    come out of torch.lerp, negative weights included."""
    import swa_fast

    inf = float("inf")
    start = torch.tensor([2.0, inf, -inf, 1.0, inf])
    end = torch.tensor([inf, 1.0, 3.0, -inf, inf])
    avg = [start.clone()]
    swa_fast.lerp_(avg, [end], weight, backend=any_backend)
    torch.testing.assert_close(avg[0], torch.lerp(start, end, weight), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_disjoint_views_of_one_buffer_in_any_order(op, any_backend):
    """Views of one buffer that share no element are independent tensors, whatever their order in
    the list (the overlap check sorts them)."""
    import swa_fast

    lists, extra = make_case(op, [(3, 2), (5,), (4,)], torch.float32, torch.float32)
    buffers = [torch.empty(5 * len(lst)) for lst in lists]  # multi_lerp_'s avgs: two lists of three
    views = []
    for buffer, lst in zip(buffers, lists):
        parts = []
        for start in range(0, len(buffer), 15):
            part = buffer[start : start + 15]
            parts += [part[9:15].view(3, 2), part[0:5], part[5:9]]  # out of address order
        for part, t in zip(parts, lst):
            part.copy_(t)
        views.append(parts)
    before = clone_lists(views)
    getattr(swa_fast, op)(*views, *extra, backend=any_backend)
    expected = clone_lists(before)
    getattr(swa_fast, op)(*expected, *extra, backend="reference")
    for got, want in zip(views, expected):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", sorted(swa_fast.ops._BINDABLE))
def test_a_bound_op_is_the_public_op_and_pickles_as_its_arguments(op, backend):
    """ops.BoundOp (what the managers call on every update): the same values as the public op on
    the same backend, a pickled one works, and bad input raises the public op's error, before
    writing."""
    bound = pickle.loads(pickle.dumps(swa_fast.ops.BoundOp(op, "cpu", backend)))
    lists, extra = make_case(op, [(3, 5), (17,)], torch.float32, torch.bfloat16)
    expected = clone_lists(lists)
    getattr(swa_fast, op)(*expected, *extra, backend=backend)
    bound(*lists, *extra)
    for got_list, want_list in zip(lists, expected):
        for got, want in zip(got_list, want_list):
            assert torch.equal(got, want)
    lists[1][1] = lists[1][1][:-1]  # a shorter tensor, last
    before = clone_lists(lists)
    with pytest.raises(ValueError, match=r"\[1\]"):
        bound(*lists, *extra)
    for got_list, want_list in zip(lists, before):
        assert all(torch.equal(g, w) for g, w in zip(got_list, want_list))


def test_a_bound_op_on_an_unavailable_backend_raises_at_the_call_as_the_public_op():
    bound = swa_fast.ops.BoundOp("lerp_", "cpu", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable for cpu tensors"):
        bound([torch.zeros(2)], [torch.ones(2)], 0.5)


@pytest.mark.skipif(swa_fast.ops.eager_lerp_then_copy is None, reason="needs the compiled extension")
def test_eager_lerp_then_copy_is_lerp_then_copy_and_says_when_the_copy_was_refused():
    """The drop-in's update in one call: lerp_ then copy_. A lerp_ refused raises before anything is
    written; a copy_ refused returns False with the lerp_ done and the copy's lists untouched."""
    run = swa_fast.ops.eager_lerp_then_copy
    avg, src = [torch.zeros(3), torch.ones(2)], [torch.ones(3), torch.full((2,), 3.0)]
    dst, buffers = [torch.zeros(4), torch.tensor(0)], [torch.arange(4.0), torch.tensor(9)]
    assert run(avg, src, 0.5, dst, buffers) is True
    assert torch.equal(avg[0], torch.full((3,), 0.5)) and torch.equal(avg[1], torch.full((2,), 2.0))
    assert torch.equal(dst[0], buffers[0]) and dst[1].item() == 9

    wrong = [torch.zeros(4), torch.tensor(1, dtype=torch.int32)]  # an integer of another dtype
    assert run(avg, src, 0.5, dst, wrong) is False
    assert (
        torch.equal(avg[0], torch.full((3,), 0.75)) and torch.equal(dst[0], buffers[0]) and dst[1].item() == 9
    )

    before = [t.clone() for t in avg + dst]
    with pytest.raises(ValueError, match=r"lerp_: `src\[1\]` has shape \[5\]"):
        run(avg, [src[0], torch.ones(5)], 0.5, dst, [torch.ones(4), torch.tensor(2)])
    assert all(torch.equal(t, b) for t, b in zip(avg + dst, before))
