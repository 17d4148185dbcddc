"""`stats` in the compiled CPU kernels (csrc/): lerp_, moments_ and multi_lerp_ given a `stats`
tensor count what they write (swa_fast/ops/pass_stats.py, the definition) in the same pass, against
the reference backend on the same inputs: the counts exactly, the largest |update| as fp32 to 1e-6;
averages of every float dtype from sources of mixed dtypes, with inf and NaN, rounded to nearest and
stochastically; work items cut in parallel (the same counts on 1 thread and on 2); counts added and
maxima kept over calls; a bad `stats` refused with check_stats's message, nothing written; and the
averages written with `stats` the very values of those written without (bit for bit, a NaN's sign
and payload aside)."""

from __future__ import annotations

import math

import pytest
import torch

import swa_fast
from swa_fast.ops import StochasticRounding, backends, pass_stats

pytestmark = pytest.mark.skipif(
    backends._C is None, reason=f"no compiled extension ({backends.EXTENSION_ERROR})"
)

FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
SOURCES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ROUNDINGS = {"nearest": None, "stochastic": StochasticRounding(seed=-12345, step=(1 << 33) + 7)}
SIZES = [3, 8, 100, 4_099, 70_001]  # one call below kSerialBelow: each tensor a work item of its own
LARGE = [600_000, 70_001, 5]  # above it: 2^16-element work items shared out by the threads
# Weights whose products are exact: the reference's moments_ (torch ops) and the kernel's explicit
# fused multiply-add (functors.h) may round an fp32 value an ulp apart now and then
# (tests/test_rounding_compiled.py: test_moments_bits); with these both compute the same values.
MOMENTS_WEIGHTS = [0.25, 0.5, 1.0, 0.0]


def _values(n: int, dtype: torch.dtype, g: torch.Generator, non_finite: bool = True) -> torch.Tensor:
    """Values of several magnitudes with a few infinities and NaN, each one that bf16 holds: the
    square of such a source is exact in fp32, so that moments_' sq (whose src * src the compiler may
    fuse into the lerp) computes the reference's fp32 value. Zeros among them (unchanged averages)."""
    x = torch.randn(n, generator=g, dtype=torch.float64)
    x *= torch.exp2(torch.randint(-8, 8, (n,), generator=g).double())
    x[torch.rand(n, generator=g) < 0.05] = 0.0
    if non_finite:
        pick = torch.rand(n, generator=g)
        x[pick < 0.003] = math.inf
        x[(pick >= 0.003) & (pick < 0.006)] = -math.inf
        x[(pick >= 0.006) & (pick < 0.009)] = math.nan
    return x.to(torch.bfloat16).to(dtype)


def _lists(sizes, avg_dtype, g, count=1, src_dtypes=SOURCES, non_finite=True):
    """`count` lists of averages of avg_dtype (a list of dtypes: one per index, cycled) and a list of
    sources whose dtypes cycle through src_dtypes: several dtype groups in one call."""
    avg_dtypes = avg_dtype if isinstance(avg_dtype, list) else [avg_dtype]
    src = [_values(n, src_dtypes[i % len(src_dtypes)], g, non_finite) for i, n in enumerate(sizes)]
    avgs = [
        [_values(n, avg_dtypes[i % len(avg_dtypes)], g, non_finite) for i, n in enumerate(sizes)]
        for _ in range(count)
    ]
    # a run of near-equal average and source: updates below the average's resolution (stalled)
    for a in avgs:
        a[0].copy_(src[0].to(a[0].dtype))
    return avgs, src


def _copy(tensors):
    return [t.clone() for t in tensors]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _assert_same_bits(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype
        assert torch.equal(_bits(a), _bits(e)), f"{int((_bits(a) != _bits(e)).sum())} of {a.numel()} differ"


def _assert_same_values(actual, expected):
    """The same bits, but where both are NaN: which operand's NaN an instruction passes on (its sign
    and payload) follows the operand order the compiler chose for that loop."""
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype
        differ = _bits(a) != _bits(e)
        assert (a.isnan() & e.isnan())[differ].all(), f"{int(differ.sum())} of {a.numel()} differ"


def _assert_stats(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.int64 and actual.shape == expected.shape
    assert torch.equal(actual[:, :3], expected[:, :3]), (actual.tolist(), expected.tolist())
    got, want = pass_stats.read_stats(actual), pass_stats.read_stats(expected)
    for a, e in zip(got, want, strict=True):
        assert a.max_update == pytest.approx(e.max_update, rel=1e-6, abs=0), (
            actual.tolist(),
            expected.tolist(),
        )


def _run_both(op: str, lists, weight, written_lists: int, rounding, stats=None):
    """The op on copies of `lists` by the compiled CPU kernels and by the reference, each from a copy
    of `stats` (zeros by default): both results' lists and stats."""
    out = {}
    for backend in ("cpu", "reference"):
        copies = [
            [_copy(x) for x in lst] if lst and isinstance(lst[0], list) else _copy(lst) for lst in lists
        ]
        st = pass_stats.stats_tensor(written_lists) if stats is None else stats.clone()
        getattr(swa_fast, op)(*copies, weight, rounding=rounding, stats=st, backend=backend)
        out[backend] = (copies, st)
    return out["cpu"], out["reference"]


def _flat(lists):
    return [
        t for lst in lists for t in (lst if isinstance(lst[0], torch.Tensor) else [u for x in lst for u in x])
    ]


def _written(op: str, lists):
    """The call's written lists, one per row of `stats`."""
    return lists[0] if op == "multi_lerp_" else lists[: {"lerp_": 1, "moments_": 2}[op]]


def _check(op: str, lists, weight, written_lists: int, rounding, stats=None):
    """The compiled op's averages and stats against the reference's. The one difference allowed in
    the averages is a NaN's bits: the compiled kernels store the NaN of c10's conversions (bf16
    0x7fc0, fp16 0x7e00 with its sign), torch's vectorised copy into bf16 another (0xffff); a NaN
    kept NaN counts as unchanged whatever its bits (pass_stats.py), so every count must be the
    reference's exactly."""
    (got_lists, got), (want_lists, want) = _run_both(op, lists, weight, written_lists, rounding, stats)
    for gots, wants in zip(_written(op, got_lists), _written(op, want_lists), strict=True):
        _assert_same_values(gots, wants)
    _assert_stats(got, want)
    return got


@pytest.mark.parametrize("rounding", list(ROUNDINGS), ids=list(ROUNDINGS))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("weight", [0.3, 0.7, 1.0, 0.0, "tensor"])
def test_lerp(dtype, rounding, weight):
    g = torch.Generator().manual_seed(1)
    (avg,), src = _lists(SIZES, dtype, g)
    w = torch.tensor(0.25, dtype=torch.float32) if weight == "tensor" else weight
    st = _check("lerp_", [avg, src], w, 1, ROUNDINGS[rounding])
    if weight == 0.0:  # a host weight 0 writes nothing and counts nothing
        assert st.tolist() == [[0, 0, 0, 0]]
    else:
        assert st[0, 0] == sum(SIZES) and 0 < st[0, 1] < st[0, 0] and st[0, 2] > 0 and st[0, 3] > 0


@pytest.mark.parametrize("rounding", list(ROUNDINGS), ids=list(ROUNDINGS))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("weight", MOMENTS_WEIGHTS)
def test_moments(dtype, rounding, weight):
    g = torch.Generator().manual_seed(2)
    (mean, sq), src = _lists(SIZES, dtype, g, count=2)
    sq = [q.abs() for q in sq]
    st = _check(
        "moments_", [mean, sq, src], torch.tensor(weight, dtype=torch.float64), 2, ROUNDINGS[rounding]
    )
    if weight != 0.0:
        assert st[:, 0].tolist() == [sum(SIZES)] * 2


@pytest.mark.parametrize("rounding", list(ROUNDINGS), ids=list(ROUNDINGS))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_multi_lerp(k, dtype, rounding):
    """K averages, one of weight 0 where K allows (left out of the pass: its row stays 0), one of
    weight 1; the weights as a CPU tensor and as numbers."""
    g = torch.Generator().manual_seed(3 + k)
    avgs, src = _lists(SIZES, dtype, g, count=k)
    weights = [0.3, 0.0, 1.0, 0.8][:k]
    for w in (weights, torch.tensor(weights, dtype=torch.float64)):
        st = _check("multi_lerp_", [avgs, src], w, k, ROUNDINGS[rounding])
        for j, row in enumerate(st.tolist()):
            assert row[0] == (0 if weights[j] == 0 else sum(SIZES))


@pytest.mark.parametrize("rounding", list(ROUNDINGS), ids=list(ROUNDINGS))
@pytest.mark.parametrize("k", [2, 3])
def test_multi_lerp_averages_of_several_dtypes(k, rounding):
    """Averages of different dtypes at one index: a pass per average, each adding to its own row."""
    g = torch.Generator().manual_seed(11 + k)
    avgs, src = _lists(SIZES, torch.float32, g, count=k)
    for j in range(k):  # average j of index i: FLOATS[(i + j) % 4]
        avgs[j] = [a.to(FLOATS[(i + j) % 4]) for i, a in enumerate(avgs[j])]
    _check("multi_lerp_", [avgs, src], [0.6, 0.2, 0.0][:k], k, ROUNDINGS[rounding])


@pytest.mark.parametrize("rounding", list(ROUNDINGS), ids=list(ROUNDINGS))
def test_several_average_dtypes_in_one_call(rounding):
    g = torch.Generator().manual_seed(5)
    (avg,), src = _lists(SIZES + SIZES, FLOATS, g)
    _check("lerp_", [avg, src], 0.45, 1, ROUNDINGS[rounding])
    (mean, sq), src = _lists(SIZES + SIZES, FLOATS, g, count=2)
    _check("moments_", [mean, [q.abs() for q in sq], src], MOMENTS_WEIGHTS[0], 2, ROUNDINGS[rounding])


@pytest.mark.parametrize("rounding", list(ROUNDINGS), ids=list(ROUNDINGS))
@pytest.mark.parametrize("op", ["lerp_", "moments_", "multi_lerp_"])
def test_work_items_in_parallel(op, rounding):
    """Tensors cut into work items (more than 2^19 elements in all): the reference's counts, and the
    same counts and averages on one thread as on two."""
    g = torch.Generator().manual_seed(6)
    count = {"lerp_": 1, "moments_": 2, "multi_lerp_": 3}[op]
    avgs, src = _lists(LARGE, torch.bfloat16, g, count=count)
    if op == "lerp_":
        lists = [avgs[0], src]
    elif op == "moments_":
        lists = [avgs[0], [q.abs() for q in avgs[1]], src]
    else:
        lists = [avgs, src]
    weight = {"lerp_": 0.3, "moments_": MOMENTS_WEIGHTS[0], "multi_lerp_": [0.3, 0.9, 0.05]}[op]
    _check(op, lists, weight, count, ROUNDINGS[rounding])
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_run_both(op, lists, weight, count, ROUNDINGS[rounding])[0])
    finally:
        torch.set_num_threads(threads)
    (one_lists, one), (two_lists, two) = results
    assert torch.equal(one, two)
    _assert_same_bits(_flat(one_lists), _flat(two_lists))


@pytest.mark.parametrize("rounding", list(ROUNDINGS), ids=list(ROUNDINGS))
def test_counts_add_up_over_calls(rounding):
    """Columns 0-2 added to what the tensor holds, column 3 the maximum of it and the pass's."""
    g = torch.Generator().manual_seed(7)
    (avg,), src = _lists(SIZES, torch.bfloat16, g, non_finite=False)  # finite updates: a finite maximum
    held = torch.tensor([[5, 3, 1, 0x7F000000]])  # a max |update| (2^127) above the pass's
    st = _check("lerp_", [avg, src], 0.3, 1, ROUNDINGS[rounding], stats=held)
    assert st[0, 3] == 0x7F000000 and st[0, 0] == sum(SIZES) + 5
    small = torch.tensor([[5, 3, 1, 1]])  # below it: the pass's own maximum
    st = _check("lerp_", [avg, src], 0.3, 1, ROUNDINGS[rounding], stats=small)
    assert st[0, 3] > 1
    # two calls on the same tensors: the second's counts added to the first's
    avg2, st2 = _copy(avg), pass_stats.stats_tensor(1)
    swa_fast.lerp_(avg2, src, 0.3, rounding=ROUNDINGS[rounding], stats=st2, backend="cpu")
    first = st2.clone()
    swa_fast.lerp_(avg2, src, 0.3, rounding=ROUNDINGS[rounding], stats=st2, backend="cpu")
    assert st2[0, 0] == 2 * first[0, 0] and st2[0, 3] >= first[0, 3]


@pytest.mark.parametrize("rounding", list(ROUNDINGS), ids=list(ROUNDINGS))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_averages_are_those_without_stats(dtype, rounding):
    g = torch.Generator().manual_seed(8)
    avgs, src = _lists(LARGE + SIZES, dtype, g, count=3)
    for op, lists, weight, w in [
        ("lerp_", [avgs[0], src], 0.3, 1),
        ("moments_", [avgs[0], [q.abs() for q in avgs[1]], src], 0.7, 2),
        ("multi_lerp_", [avgs, src], [0.3, 0.0, 1.0], 3),
    ]:
        plain = [[_copy(x) for x in lst] if isinstance(lst[0], list) else _copy(lst) for lst in lists]
        counted = [[_copy(x) for x in lst] if isinstance(lst[0], list) else _copy(lst) for lst in lists]
        getattr(swa_fast, op)(*plain, weight, rounding=ROUNDINGS[rounding], backend="cpu")
        stats = pass_stats.stats_tensor(w)
        getattr(swa_fast, op)(*counted, weight, rounding=ROUNDINGS[rounding], stats=stats, backend="cpu")
        _assert_same_values(_flat(counted), _flat(plain))
        assert stats[:, 0].sum() > 0


def _message(op: str, stats, written_lists: int) -> str:
    with pytest.raises(ValueError) as expected:
        pass_stats.check_stats(op, stats, written_lists, torch.device("cpu"))
    return str(expected.value)


BAD = {
    "dtype": lambda w: torch.zeros(w, 4, dtype=torch.int32),
    "float": lambda w: torch.zeros(w, 4),
    "shape": lambda w: torch.zeros(w + 1, 4, dtype=torch.int64),
    "flat": lambda w: torch.zeros(4 * w, dtype=torch.int64),
    "columns": lambda w: torch.zeros(w, 3, dtype=torch.int64),
    "strided": lambda w: torch.zeros(w, 8, dtype=torch.int64)[:, ::2],
    "list": lambda w: [[0, 0, 0, 0]] * w,
    "number": lambda w: 0,
}


@pytest.mark.parametrize("entry", ["eager", "torch.ops"])
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("op", ["lerp_", "moments_", "multi_lerp_"])
def test_bad_stats_is_refused_and_writes_nothing(op, bad, entry):
    g = torch.Generator().manual_seed(9)
    written_lists = {"lerp_": 1, "moments_": 2, "multi_lerp_": 2}[op]
    avgs, src = _lists(SIZES, torch.bfloat16, g, count=written_lists)
    stats = BAD[bad](written_lists)
    if entry == "torch.ops" and not isinstance(stats, torch.Tensor):
        pytest.skip("the dispatcher's schema refuses a non-tensor itself")
    if op == "lerp_":
        args = (avgs[0], src, 0.5)
    elif op == "moments_":
        args = (avgs[0], avgs[1], src, 0.5)
    else:
        args = ([a for lst in avgs for a in lst], src, torch.tensor([0.5, 0.25], dtype=torch.float64))
    before = [t.clone() for t in _flat(avgs)]
    held = stats.clone() if isinstance(stats, torch.Tensor) else None
    call = getattr(backends._C, op) if entry == "eager" else getattr(torch.ops.swa_fast, op)
    if entry == "torch.ops" and op != "multi_lerp_":
        args = (*args[:-1], torch.tensor(args[-1]))
    with pytest.raises(ValueError) as raised:
        call(*args, None, stats)
    assert str(raised.value) == _message(op, stats, written_lists)
    _assert_same_bits(_flat(avgs), before)
    if held is not None:
        assert torch.equal(stats, held)


def test_bad_stats_checked_after_rounding():
    """A call with a bad `rounding` and a bad `stats` says rounding's message (check_call's order)."""
    g = torch.Generator().manual_seed(10)
    (avg,), src = _lists(SIZES, torch.bfloat16, g)
    with pytest.raises(ValueError, match="`rounding`"):
        backends._C.lerp_(avg, src, 0.5, torch.zeros(2, dtype=torch.int64), torch.zeros(1, 4))


def test_stats_of_an_empty_call_is_checked():
    with pytest.raises(ValueError) as raised:
        backends._C.lerp_([], [], 0.5, None, torch.zeros(1, 4))
    with pytest.raises(ValueError) as expected:
        pass_stats.check_stats("lerp_", torch.zeros(1, 4), 1, None)
    assert str(raised.value) == str(expected.value)
    backends._C.lerp_([], [], 0.5, None, torch.zeros(1, 4, dtype=torch.int64))  # a good one: nothing to do
