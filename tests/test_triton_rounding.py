"""Stochastic rounding in the Triton kernels (lerp_, moments_, multi_lerp_ given `rounding`), bit for
bit against ops/rounding.py, the definition, on CPU tensors (TRITON_INTERPRET=1, set in conftest).

The fp32 value each element is rounded from is the kernel's own: the same call made on fp32 copies
of the bf16/fp16 averages, rounding to nearest (an fp32 destination stores it as computed). So the
oracle checks the rounding, and test_triton_launchers checks that value against the reference.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PER_LIST_WEIGHTS, WEIGHT, WRITTEN, make_case

from swa_fast import ops
from swa_fast.ops import rounding, triton_kernels
from swa_fast.ops.rounding import StochasticRounding, consecutive_firsts, rounding_tensor

pytestmark = pytest.mark.skipif(
    not triton_kernels.runs_on(torch.device("cpu")), reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)

ROUNDING_OPS = ("lerp_", "moments_", "multi_lerp_")
ROUNDED = (torch.bfloat16, torch.float16)
BLOCK = triton_kernels.BLOCK
# Sizes around the Philox group (8) and the block, and an empty tensor.
SHAPES = [(BLOCK + 3,), (2, 5), (0,), (17,), (2 * BLOCK,), (1,)]
SEED, STEP = 0x0123456789ABCDEF, 41


def padded_firsts(tensors) -> list[int]:
    """Each tensor's first element in a flat buffer that starts every tensor at a multiple of 8
    (FlatBuffer's layout): the aligned kernels' one Philox call per 8 elements."""
    firsts, at = [], 0
    for t in tensors:
        firsts.append(at)
        at += -(-t.numel() // 8) * 8
    return firsts


FIRSTS = {
    "padded": padded_firsts,
    "consecutive": consecutive_firsts,  # not multiples of 8: one Philox call per element
    # past 2^35 elements: the group index's high word is not zero
    "far": lambda tensors: [(1 << 35) + 8 * f for f in padded_firsts(tensors)],
}


def launch(op: str, lists, extra, key=None) -> None:
    ops.OP_TABLE[op].triton(*lists, *extra, *([] if key is None else [key]))


def written_lists(op: str, lists, extra) -> list[list[torch.Tensor]]:
    """The written lists as the kernels see them (multi_lerp_'s K lists of averages apart)."""
    spec = ops.OP_TABLE[op]
    return spec.kernel_lists(*lists, *extra)[: spec.kernel_written(*lists, *extra)]


def expected(op: str, lists, extra, key: torch.Tensor | None) -> list[list[torch.Tensor]]:
    """What the call writes, from the definition: the kernel's fp32 (fp64) values from the same call
    on fp32 copies of the bf16/fp16 averages, then rounding.py's rounding of each (nearest without
    a key)."""
    n_written = ops.OP_TABLE[op].written
    wide = [
        [t.float() if t.dtype in ROUNDED else t.clone() for t in lst] if k < n_written else lst
        for k, lst in enumerate(lists)
    ]
    launch(op, wide, extra)
    parsed = None if key is None else StochasticRounding.of(key)
    out = []
    for k, (dsts, values) in enumerate(zip(written_lists(op, lists, extra), written_lists(op, wide, extra))):
        out.append([])
        for i, (dst, value) in enumerate(zip(dsts, values)):
            want = torch.empty_like(dst)
            if parsed is None:
                want.copy_(value)
            else:
                parsed.store(want, value, i, k)
            out[-1].append(want)
    return out


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, where: str) -> None:
    """The same bits, but for NaN's payload (rounding.py leaves NaN to the dtype's conversion)."""
    assert got.dtype == want.dtype and got.shape == want.shape, where
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), where
    g, w = got[~nan], want[~nan]
    if g.dtype.itemsize == 2:
        g, w = g.view(torch.int16), w.view(torch.int16)
    differ = (g != w).nonzero()
    assert differ.numel() == 0, f"{where}: {differ.numel()} differ, first at {differ[:4].tolist()}"


def run_and_compare(op: str, lists, extra, key: torch.Tensor | None) -> None:
    want = expected(op, [[t.clone() for t in lst] for lst in lists], extra, key)
    launch(op, lists, extra, key)
    for k, (gots, wants) in enumerate(zip(written_lists(op, lists, extra), want)):
        for i, (got, w) in enumerate(zip(gots, wants)):
            assert_same_bits(got, w, f"{op} written list {k} tensor {i} ({got.dtype})")


def case_key(op: str, lists, firsts: str, seed=SEED, step=STEP, stream=3) -> torch.Tensor:
    return rounding_tensor(seed, step, FIRSTS[firsts](lists[-1]), stream)


@pytest.mark.parametrize("firsts", FIRSTS)
@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("dst", ROUNDED)
@pytest.mark.parametrize("op", ROUNDING_OPS)
def test_matches_the_definition(op, dst, src, firsts):
    lists, extra = make_case(op, SHAPES, dst, src)
    run_and_compare(op, lists, extra, case_key(op, lists, firsts))


@pytest.mark.parametrize("op", ROUNDING_OPS)
def test_misaligned_tensors_match_the_definition(op):
    """Tensors that start one element past a 16-byte boundary: the unaligned kernel, its masked
    accesses, with firsts that are multiples of 8 all the same."""
    lists, extra = make_case(op, SHAPES, torch.bfloat16, torch.float32)
    lists = [
        [torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape).copy_(t) for t in lst] for lst in lists
    ]
    run_and_compare(op, lists, extra, case_key(op, lists, "padded"))


@pytest.mark.parametrize("dst", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", ROUNDING_OPS)
def test_fp32_and_fp64_averages_round_to_nearest(op, dst):
    lists, extra = make_case(op, SHAPES, dst, torch.bfloat16)
    nearest = [[t.clone() for t in lst] for lst in lists]
    launch(op, nearest, extra)
    launch(op, lists, extra, case_key(op, lists, "padded"))
    for k in range(WRITTEN[op]):
        for got, want in zip(lists[k], nearest[k]):
            assert torch.equal(got, want)


@pytest.mark.parametrize("dst", ROUNDED)
@pytest.mark.parametrize("op", ROUNDING_OPS)
def test_without_rounding_as_before(op, dst):
    """rounding=None, or no rounding argument: to nearest, as the kernels always did (the same bits
    as PyTorch's conversion of the kernel's fp32 values)."""
    lists, extra = make_case(op, SHAPES, dst, torch.float32)
    omitted = [[t.clone() for t in lst] for lst in lists]
    launch(op, omitted, extra)
    ops.OP_TABLE[op].triton(*lists, *extra, None)
    for k in range(WRITTEN[op]):
        for got, want in zip(lists[k], omitted[k]):
            assert_same_bits(got, want, op)
    lists, extra = make_case(op, SHAPES, dst, torch.float32)
    run_and_compare(op, lists, extra, None)


@pytest.mark.parametrize("op", ["bema_", "weighted_sum_", "copy_", "swap_"])
def test_ops_that_do_not_round_refuse_rounding(op):
    lists, extra = make_case(op, SHAPES, torch.bfloat16, torch.float32)
    with pytest.raises(TypeError):
        launch(op, lists, extra, rounding_tensor(1, 2, [0] * len(lists[-1])))


def test_mixed_dtypes_in_one_list():
    """A list of bf16, fp32, fp16 and fp64 averages: a launch per dtype, each tensor with its own
    first, the fp32 and fp64 ones to nearest."""
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float64, torch.bfloat16]
    shapes = [(BLOCK + 5,), (9,), (3, 7), (12,), (40,)]
    g = torch.Generator().manual_seed(1)
    avg = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
    src = [
        torch.randn(s, generator=g).to(torch.float16 if i % 2 else torch.float32)
        for i, s in enumerate(shapes)
    ]
    for firsts in FIRSTS:
        lists = [[t.clone() for t in avg], src]
        run_and_compare("lerp_", lists, (0.3,), case_key("lerp_", lists, firsts))


def test_multi_lerp_averages_of_different_dtypes_take_their_own_streams():
    """K = 4 averages of bf16, fp32, fp16, bf16: average k drawn from stream + k, so the two bf16
    averages, equal before, differ after; weight 0 writes nothing."""
    g = torch.Generator().manual_seed(2)
    src = [torch.randn(s, generator=g) for s in SHAPES]
    avgs = []
    for d in (torch.bfloat16, torch.float32, torch.float16, torch.bfloat16):
        avgs += [torch.randn(s, generator=torch.Generator().manual_seed(3)).to(d) for s in SHAPES]
    for weights in ((0.3, 0.7, 0.2, 0.3), (0.3, 0.0, 1.0, 0.0)):
        lists = [[t.clone() for t in avgs], src]
        run_and_compare(
            "multi_lerp_", lists, (weights,), case_key("multi_lerp_", lists, "padded", stream=252)
        )
    lists = [[t.clone() for t in avgs], src]
    launch("multi_lerp_", lists, ((0.3, 0.7, 0.2, 0.3),), case_key("multi_lerp_", lists, "padded"))
    n = len(SHAPES)
    assert not torch.equal(lists[0][0], lists[0][3 * n])


@pytest.mark.parametrize("dst", ROUNDED)
@pytest.mark.parametrize("op", ROUNDING_OPS)
def test_weight_0_and_1(op, dst):
    """Weight 0 leaves every average as it was (its values are the dtype's: nothing to round);
    weight 1 gives the source rounded stochastically."""
    for weight in (0.0, 1.0):
        lists, extra = make_case(op, SHAPES, dst, torch.float32)
        extra = ((weight, weight),) if op == "multi_lerp_" else (weight,)
        before = [[t.clone() for t in lst] for lst in lists]
        run_and_compare(op, lists, extra, case_key(op, lists, "padded"))
        if weight == 0:
            for k in range(WRITTEN[op]):
                for got, was in zip(lists[k], before[k]):
                    assert torch.equal(got, was)


@pytest.mark.parametrize("dst", ROUNDED)
def test_non_finite_and_extreme_values(dst):
    """inf, -inf and NaN (to nearest), the largest finite values (which may round up to inf),
    values the dtype holds exactly (never changed), zeros of both signs."""
    info = torch.finfo(dst)
    special = [float("inf"), float("-inf"), float("nan"), info.max, -info.max, 0.0, -0.0, 1.0, -2.5]
    special += [info.max * 1.0001, -info.max * 1.0001, 65519.0, 65520.0, 3.0e38]
    src = torch.tensor(special * 30, dtype=torch.float32)
    for first in (0, 3):
        avg = [torch.zeros_like(src, dtype=dst)]
        run_and_compare("lerp_", [avg, [src]], (1.0,), rounding_tensor(SEED, STEP, [first]))
        held = src.to(dst).float() == src  # finite values the dtype holds exactly: never changed
        assert held.sum() >= 5 * 30 and torch.equal(avg[0][held].float(), src[held])


def test_fp16_subnormals():
    """fp16's subnormal range (below 2^-14, steps of 2^-24), both signs, values below one step,
    the boundary, and through an fp32 average's lerp."""
    g = torch.Generator().manual_seed(4)
    scale = torch.tensor([2.0**-14, 2.0**-20, 2.0**-24, 2.0**-26, 2.0**-40]).repeat_interleave(1000)
    src = (torch.rand(scale.shape, generator=g) * 2 - 1) * scale
    src = torch.cat([src, torch.tensor([2.0**-14, -(2.0**-14), 2.0**-24, 2.0**-25, 6.1e-5, -6.1e-5])])
    for first in (0, 1, 8 * 1000 + 5):
        lists = [[torch.zeros_like(src, dtype=torch.float16)], [src]]
        run_and_compare("lerp_", lists, (1.0,), rounding_tensor(SEED, STEP, [first]))
    lists = [[(src * 0.5).half()], [src]]
    run_and_compare("lerp_", lists, (0.375,), rounding_tensor(-7, 3, [0]))


def test_seed_step_and_stream_words():
    """A negative seed (its two's complement bits), a step past 2^32 (both words), the last stream
    a call may take: each word reaches the kernel."""
    lists, extra = make_case("moments_", SHAPES, torch.bfloat16, torch.float32)
    keys = ((-1, (1 << 32) + 5, 254), (1 << 62, (1 << 63) - 1, 0), (0, 0, 1), (-(1 << 63), 1, 7))
    for seed, step, stream in keys:
        key = case_key("moments_", lists, "padded", seed=seed, step=step, stream=stream)
        run_and_compare("moments_", [[t.clone() for t in lst] for lst in lists], extra, key)


def test_a_different_key_gives_different_bits():
    lists, extra = make_case("lerp_", [(1000,)], torch.bfloat16, torch.float32)
    results = []
    for seed, step, stream in ((1, 2, 0), (2, 2, 0), (1, 3, 0), (1, 2, 1)):
        avg = [lists[0][0].clone()]
        launch("lerp_", [avg, lists[1]], extra, rounding_tensor(seed, step, [0], stream))
        results.append(avg[0])
    for a in range(len(results)):
        for b in range(a):
            assert not torch.equal(results[a], results[b])


def test_rounding_is_unbiased():
    """The mean over many steps of a value between two bf16 numbers is the value (within a few
    standard errors): each is rounded up with probability its distance from the lower one."""
    x = torch.full((4096,), 1.0 + 2.0**-9, dtype=torch.float32)  # 1/4 of the way to the next bf16
    up = 0
    for step in range(8):
        avg = [torch.zeros(4096, dtype=torch.bfloat16)]
        launch("lerp_", [avg, [x]], (1.0,), rounding_tensor(SEED, step, [0]))
        up += (avg[0].float() > 1.0).sum().item()
    fraction = up / (8 * 4096)
    assert abs(fraction - 0.25) < 5 * (0.25 * 0.75 / (8 * 4096)) ** 0.5, fraction


def test_the_registered_op_takes_rounding():
    """torch.ops.swa_fast.<op>_triton, with its schema's optional `rounding`."""
    lists, extra = make_case("lerp_", SHAPES, torch.float16, torch.bfloat16)
    key = case_key("lerp_", lists, "consecutive")
    want = expected("lerp_", [[t.clone() for t in lst] for lst in lists], (torch.tensor(WEIGHT),), key)
    torch.ops.swa_fast.lerp_triton(*lists, torch.tensor(WEIGHT), key)
    for got, w in zip(lists[0], want[0]):
        assert_same_bits(got, w, "lerp_triton")
    lists, extra = make_case("multi_lerp_", SHAPES, torch.bfloat16, torch.float32)
    key = case_key("multi_lerp_", lists, "padded")
    weights = torch.tensor(PER_LIST_WEIGHTS)
    want = expected("multi_lerp_", [[t.clone() for t in lst] for lst in lists], (weights,), key)
    torch.ops.swa_fast.multi_lerp_triton(*lists, weights, key)
    for k, gots in enumerate(written_lists("multi_lerp_", lists, (weights,))):
        for got, w in zip(gots, want[k]):
            assert_same_bits(got, w, "multi_lerp_triton")


def test_launch_tables_with_firsts():
    """A table per list and firsts: the same list with other firsts (or none) gets its own, the same
    firsts reuse it; a first not a multiple of 8 makes the launch unaligned."""
    avg = [torch.zeros(10, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16)]
    src = [torch.ones(10), torch.ones(3)]
    triton_kernels._LAUNCH_TABLES.clear()
    for firsts in ([0, 16], [0, 16], [0, 10], None):
        launch("lerp_", [avg, src], (0.5,), None if firsts is None else rounding_tensor(1, 2, firsts))
    tables = list(triton_kernels._LAUNCH_TABLES.values())
    assert len(tables) == 3
    assert [t.firsts is None for t in tables] == [False, False, True]
    assert [t.aligned for t in tables] == [True, False, True]
    assert tables[0].firsts.tolist() == [0, 16]


def test_definition_words_match_triton_philox():
    """rounding.py's Philox4x32-10 and Triton's (which the kernels call) give the same words."""
    import triton
    import triton.language as tl

    @triton.jit
    def words(c_ptr, out_ptr, k0, k1, N: tl.constexpr):
        i = tl.arange(0, N)
        c0 = tl.load(c_ptr + i).to(tl.uint32)
        c1 = tl.load(c_ptr + N + i).to(tl.uint32)
        c2 = tl.load(c_ptr + 2 * N + i).to(tl.uint32)
        c3 = tl.load(c_ptr + 3 * N + i).to(tl.uint32)
        w0, w1, w2, w3 = tl.philox_impl(c0, c1, c2, c3, k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32))
        tl.store(out_ptr + i, w0.to(tl.int64))
        tl.store(out_ptr + N + i, w1.to(tl.int64))
        tl.store(out_ptr + 2 * N + i, w2.to(tl.int64))
        tl.store(out_ptr + 3 * N + i, w3.to(tl.int64))

    g = torch.Generator().manual_seed(5)
    counter = torch.randint(0, 1 << 32, (4, 64), dtype=torch.int64, generator=g)
    out = torch.empty_like(counter)
    k0, k1 = 0x9E3779B9 - (1 << 32), 0x12345678
    words[(1,)](counter, out, k0, k1, N=64)
    want = rounding.philox4x32_10(list(counter), (k0 & 0xFFFFFFFF, k1))
    assert torch.equal(out & 0xFFFFFFFF, torch.stack(want))
