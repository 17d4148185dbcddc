"""Stochastic rounding in the compiled CPU kernels (csrc/): lerp_, moments_ and multi_lerp_ given a
`rounding` tensor, through torch.ops.swa_fast and the extension's eager entry points, bit for bit
against swa_fast/ops/rounding.py (the definition) applied to the reference's exact fp32 result; the checks
of a bad `rounding` (rounding.py's messages, nothing written); and the nearest path (no `rounding`,
or None) as it was."""

from __future__ import annotations

import pytest
import torch

from swa_fast.ops import backends, reference, rounding
from swa_fast.ops.rounding import StochasticRounding, rounding_tensor

_C = backends._C
pytestmark = pytest.mark.skipif(_C is None, reason=f"no compiled extension ({backends.EXTENSION_ERROR})")

ENTRY_POINTS = ["torch.ops", "eager"]
FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
SEED = -0x123456789ABCDEF  # negative: its two's complement bits, high word included
STEP = (1 << 33) + 5  # both words of the step


def _op(entry: str, name: str):
    return getattr(torch.ops.swa_fast, name) if entry == "torch.ops" else getattr(_C, name)


def _values(n: int, dtype: torch.dtype, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Values with dropped bits in every format, of several magnitudes, in `dtype`."""
    x = torch.randn(n, generator=generator, dtype=torch.float64) * scale
    x *= torch.exp2(torch.randint(-6, 6, (n,), generator=generator).double())
    return x.to(dtype)


def _assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The same bits, NaN for NaN (its payload is the conversion's, not the rounding's)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = actual.isnan()
    assert torch.equal(nan, expected.isnan())
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    a, e = actual.reshape(-1).view(bits), expected.reshape(-1).view(bits)
    keep = ~nan.reshape(-1)
    differ = (a != e) & keep
    assert not differ.any(), (
        f"{int(differ.sum())} of {a.numel()} differ, first at {differ.nonzero()[:5].tolist()}"
    )


def _store(dst: torch.Tensor, value: torch.Tensor, i: int, written_list: int, key: StochasticRounding | None):
    if key is None:
        dst.copy_(value)
    else:
        key.store(dst, value, i, written_list)


# Averages of other dtypes (fp32, fp64) are stored as without `rounding`: what the compiled op gives
# without it (which tests/test_ops.py compares with the reference), one tensor at a time.
def _nearest(dtype: torch.dtype) -> bool:
    return dtype not in rounding.STOCHASTIC_DTYPES


def _expect_lerp(avg, src, weight, key):
    out = [a.clone() for a in avg]
    for i, (a, s) in enumerate(zip(out, src)):
        acc = reference.acc_dtype(a.dtype)
        w = reference.weight_as(weight, a)
        if float(w) == 0:
            continue  # weight 0 writes nothing
        if _nearest(a.dtype):
            torch.ops.swa_fast.lerp_([a], [s], w)
            continue
        _store(a, reference.lerp_value(a.to(acc), reference._read(s, acc), w, exact=True), i, 0, key)
    return out


def _expect_moments(mean, sq, src, weight, key, sq_offset: int = 0):
    """sq_offset: -1 or 1 for sq's expectation from its fp32 value one ulp down or up (see
    test_moments_bits)."""
    out_mean, out_sq = [m.clone() for m in mean], [q.clone() for q in sq]
    for i, (m, q, s) in enumerate(zip(out_mean, out_sq, src)):
        acc = reference.acc_dtype(m.dtype)
        w = reference.weight_as(weight, m)
        if float(w) == 0:
            continue
        if _nearest(m.dtype):
            torch.ops.swa_fast.moments_([m], [q], [s], w)
            continue
        x = reference._read(s, acc)
        new_mean, new_sq = (
            reference.lerp_value(m.to(acc), x, w, True),
            reference.lerp_value(q.to(acc), x * x, w, True),
        )
        if sq_offset:
            new_sq = new_sq.nextafter(torch.full_like(new_sq, sq_offset * float("inf")))
        _store(m, new_mean, i, 0, key)
        _store(q, new_sq, i, 1, key)
    return out_mean, out_sq


def _expect_multi_lerp(avgs, src, weights, key):
    n = len(src)
    out = [a.clone() for a in avgs]
    for i, s in enumerate(src):
        new = []
        for k, w in enumerate(weights):
            a = out[k * n + i]
            acc = reference.acc_dtype(a.dtype)
            w = reference.weight_as(w, a)
            if float(w) == 0:
                new.append(None)
            elif _nearest(a.dtype):
                value = a.clone()
                torch.ops.swa_fast.lerp_([value], [s], w)
                new.append(value)
            else:
                new.append(reference.lerp_value(a.to(acc), reference._read(s, acc), w, exact=True))
        for k, value in enumerate(new):
            if value is None:
                continue
            if _nearest(out[k * n + i].dtype):
                out[k * n + i].copy_(value)
            else:
                _store(out[k * n + i], value, i, k, key)
    return out


def _firsts(sizes: list[int], generator: torch.Generator, aligned: bool) -> list[int]:
    """Each tensor's first element in a flat average: consecutive from a start (8-aligned or not),
    or anywhere."""
    at = 0 if aligned else 3
    out = []
    for n in sizes:
        out.append(at)
        at += n + (0 if aligned else int(torch.randint(0, 20, (), generator=generator)))
        if aligned:
            at = (at + 7) // 8 * 8
    return out


# --- lerp_ -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("src_dtype", [None, torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("weight", [0.3, 0.7, 1.0, 0.0])
def test_lerp_bits(entry, dtype, src_dtype, weight):
    g = torch.Generator().manual_seed(1)
    sizes = [1, 7, 8, 13, 100, 1000, 4099]
    avg = [_values(n, dtype, g) for n in sizes]
    src = [_values(n, src_dtype or dtype, g) for n in sizes]
    firsts = _firsts(sizes, g, aligned=dtype == torch.bfloat16)
    r = rounding_tensor(SEED, STEP, firsts, stream=3)
    weight = torch.tensor(weight)  # (fp32: an fp64 average takes its fp32 value, as the expectation must)
    expected = _expect_lerp(avg, src, weight, StochasticRounding.of(r))
    _op(entry, "lerp_")(avg, src, weight, r)
    for a, e in zip(avg, expected):
        _assert_same(a, e)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_lerp_mixed_dtypes_in_one_call_and_steps(entry):
    """Every dtype of average and of source at once, strided sources, several updates of the same
    lists (one launch plan, a new step at each): each update as rounding.py says."""
    g = torch.Generator().manual_seed(2)
    sizes = [5, 64, 17, 300, 8, 1, 999, 24]
    dtypes = [FLOATS[j % 4] for j in range(len(sizes))]
    src_dtypes = [FLOATS[(j * 3 + 1) % 4] for j in range(len(sizes))]
    avg = [_values(n, d, g) for n, d in zip(sizes, dtypes)]
    src = [_values(2 * n, d, g)[::2] for n, d in zip(sizes, src_dtypes)]
    firsts = _firsts(sizes, g, aligned=False)
    for step in range(3):
        r = rounding_tensor(7, step, firsts)
        expected = _expect_lerp(avg, src, 0.25, StochasticRounding.of(r))
        _op(entry, "lerp_")(avg, src, 0.25 if entry == "eager" else torch.tensor(0.25), r)
        for a, e in zip(avg, expected):
            _assert_same(a, e)


def test_lerp_own_source():
    """A source that is its own average (the one sharing allowed)."""
    g = torch.Generator().manual_seed(3)
    avg = [_values(n, torch.bfloat16, g) for n in (33, 80)]
    r = rounding_tensor(1, 2, [0, 40])
    expected = _expect_lerp(avg, avg, 0.5, StochasticRounding.of(r))
    torch.ops.swa_fast.lerp_(avg, avg, torch.tensor(0.5), r)
    for a, e in zip(avg, expected):
        _assert_same(a, e)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("aligned", [True, False], ids=["firsts_aligned", "firsts_unaligned"])
def test_lerp_work_items_and_threads(dtype, aligned):
    """Tensors larger than a work item (65,536 elements), more than 2^19 in all (the threaded path):
    the bits of every element are rounding.py's, with one thread or two."""
    g = torch.Generator().manual_seed(4)
    sizes = [300_001, 70_000, 5, 200_003]
    avg0 = [_values(n, dtype, g) for n in sizes]
    src = [_values(n, torch.float32, g) for n in sizes]
    r = rounding_tensor(SEED, 9, _firsts(sizes, g, aligned), stream=250)
    expected = _expect_lerp(avg0, src, 0.1, StochasticRounding.of(r))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            avg = [a.clone() for a in avg0]
            _C.lerp_(avg, src, 0.1, r)
            results.append(avg)
    finally:
        torch.set_num_threads(threads)
    for one, two, e in zip(*results, expected):
        _assert_same(one, e)
        _assert_same(two, e)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lerp_non_finite_and_edges(dtype):
    """inf, -inf and NaN (to nearest, as without rounding), fp16's subnormals and its top of range,
    bf16's largest values, zeros of both signs, exact values (never changed)."""
    edges = [
        float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1.0, -2.0, 65504.0, 65519.0, 65520.0, 70000.0,
        -65530.0, 3e38, -3.3e38, 1e-5, -3e-6, 6.1e-5, 6.103515625e-05, 5.96e-8, 2.9e-8, 1e-9, -1e-8, 1e-40,
        -1e-45, 1.5e-7, 3.0517578125e-05,
    ]  # fmt: skip
    g = torch.Generator().manual_seed(5)
    x = torch.tensor(edges * 8, dtype=torch.float32)
    x = torch.cat([x, torch.randn(500, generator=g) * 1e-6, torch.randn(500, generator=g) * 6e4])
    avg = [torch.zeros_like(x, dtype=dtype), torch.full_like(x, float("nan"), dtype=dtype)]
    src = [x, x.flip(0)]
    r = rounding_tensor(11, 12, [5, 100_000])
    for weight in (1.0, 0.5):
        expected = _expect_lerp(avg, src, weight, StochasticRounding.of(r))
        _C.lerp_(avg, src, weight, r)
        for a, e in zip(avg, expected):
            _assert_same(a, e)


def test_rounds_both_ways():
    """The rounding is stochastic: a value a quarter of the way from 1 to the next bf16 number
    (1 + 2^-7) goes both ways, and the mean is about the value (a sanity check beside the oracle)."""
    x = torch.full((100_000,), 1.0 + 2.0**-9, dtype=torch.float32)
    avg = [torch.zeros(x.numel(), dtype=torch.bfloat16)]
    _C.lerp_(avg, [x], 1.0, rounding_tensor(0, 0, [0]))
    up = (avg[0].float() > 1.0).double().mean().item()
    assert 0 < up < 1
    assert abs(avg[0].double().mean().item() - (1.0 + 2.0**-9)) < 1e-4


# --- moments_ and multi_lerp_ ----------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("weight", [0.4, 0.6, 1.0, 0.0])
def test_moments_bits(entry, dtype, weight):
    g = torch.Generator().manual_seed(6)
    sizes = [3, 8, 100, 70_001, 450_000]
    mean = [_values(n, dtype, g) for n in sizes]
    sq = [_values(n, dtype, g).abs() for n in sizes]
    src = [_values(n, torch.float32, g) for n in sizes]
    r = rounding_tensor(SEED, STEP, _firsts(sizes, g, aligned=False), stream=254)
    weight = torch.tensor(weight)
    key = StochasticRounding.of(r)
    expected_mean, expected_sq = _expect_moments(mean, sq, src, weight, key)
    # sq's fp32 value: the compiler may fuse src * src into the lerp's subtraction (FMA contraction, as
    # in the nearest path), which moves it by an ulp now and then: there, sq is rounding.py's rounding of
    # its neighbour, with the element's own bits.
    neighbours = [_expect_moments(mean, sq, src, weight, key, offset)[1] for offset in (-1, 1)]
    _op(entry, "moments_")(mean, sq, src, weight, r)
    for a, e in zip(mean, expected_mean):
        _assert_same(a, e)
    for a, e, down, up in zip(sq, expected_sq, *neighbours):
        a_bits, e_bits = a.view(torch.int16), e.view(torch.int16)
        other = a_bits != e_bits
        assert int(other.sum()) <= max(2, a.numel() // 10_000)
        assert ((a_bits == down.view(torch.int16)) | (a_bits == up.view(torch.int16)))[other].all()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_multi_lerp_bits(entry, k, dtype):
    """K averages of one source, one of weight 0 (left out of the pass: not written) and one of
    weight 1 where K allows; each average k in stream `stream` + k."""
    g = torch.Generator().manual_seed(7 + k)
    sizes = [9, 16, 1000, 66_000, 300_000]
    src = [_values(n, torch.float32, g) for n in sizes]
    avgs = [_values(n, dtype, g) for _ in range(k) for n in sizes]
    weights = torch.tensor([0.3, 0.0, 1.0, 0.8][:k], dtype=torch.float64)
    r = rounding_tensor(SEED, STEP, _firsts(sizes, g, aligned=True), stream=256 - k)
    expected = _expect_multi_lerp(avgs, src, weights, StochasticRounding.of(r))
    _op(entry, "multi_lerp_")(avgs, src, weights, r)
    for a, e in zip(avgs, expected):
        _assert_same(a, e)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_multi_lerp_mixed_dtypes_and_own_source(entry):
    """Averages of different dtypes at one index (one pass per average) and a source that is one
    of the averages (its pass last): each average still in its own stream."""
    g = torch.Generator().manual_seed(8)
    sizes = [11, 200, 5000]
    first = [_values(n, torch.bfloat16, g) for n in sizes]
    second = [_values(n, torch.float16, g) for n in sizes]
    third = [_values(n, torch.float32, g) for n in sizes]
    src = [_values(sizes[0], torch.bfloat16, g), second[1], _values(sizes[2], torch.float64, g)]
    avgs = first + second + third
    r = rounding_tensor(3, 4, _firsts(sizes, g, aligned=False), stream=10)
    weights = torch.tensor([0.2, 0.9, 0.5], dtype=torch.float64)
    expected = _expect_multi_lerp(avgs, src, weights, StochasticRounding.of(r))
    _op(entry, "multi_lerp_")(avgs, src, weights, r)
    for a, e in zip(avgs, expected):
        _assert_same(a, e)


# --- the nearest path ------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_none_is_nearest(entry):
    """No `rounding`, or None: to nearest, as the reference (and as before the argument existed)."""
    g = torch.Generator().manual_seed(9)
    sizes = [7, 100, 70_000, 500_000]
    for dtype in (torch.bfloat16, torch.float16):
        src = [_values(n, torch.float32, g) for n in sizes]
        start = [_values(n, dtype, g) for n in sizes]
        expected = _expect_lerp(start, src, 0.3, None)
        for args in ((), (None,)):
            avg = [a.clone() for a in start]
            _op(entry, "lerp_")(avg, src, torch.tensor(0.3), *args)
            for a, e in zip(avg, expected):
                _assert_same(a, e)
        mean, sq = [a.clone() for a in start], [a.clone() for a in start]
        expected_mean, expected_sq = _expect_moments(mean, sq, src, 0.3, None)
        _op(entry, "moments_")(mean, sq, src, torch.tensor(0.3), None)
        for a, e in zip(mean + sq, expected_mean + expected_sq):
            _assert_same(a, e)
        avgs = [a.clone() for a in start] * 1 + [a.clone() for a in start]
        expected = _expect_multi_lerp(avgs, src, [0.3, 0.6], None)
        _op(entry, "multi_lerp_")(avgs, src, torch.tensor([0.3, 0.6]), None)
        for a, e in zip(avgs, expected):
            _assert_same(a, e)


# --- checks ------------------------------------------------------------------------------------------


def _bad_roundings(count: int, written: int) -> list:
    good = rounding_tensor(1, 2, list(range(count)))
    return [
        good.to(torch.int32),
        good.double(),
        good.to("meta"),
        good[:-1],
        torch.cat([good, good[:1]]),
        good.view(1, -1),
        torch.tensor(5),
        rounding_tensor(1, -1, list(range(count))),
        rounding_tensor(1, 2, list(range(count)), stream=-1),
        rounding_tensor(1, 2, list(range(count)), stream=257 - written),
        rounding_tensor(1, 2, list(range(count - 1)) + [-8]),
    ]


def _calls(op: str, count: int):
    """(written lists, a call with its tensors) of op over `count` indices."""
    g = torch.Generator().manual_seed(10)
    src = [_values(10, torch.float32, g) for _ in range(count)]
    if op == "lerp_":
        avg = [_values(10, torch.bfloat16, g) for _ in range(count)]
        return 1, avg, lambda f, r: f(avg, src, torch.tensor(0.5), r)
    if op == "moments_":
        mean = [_values(10, torch.float16, g) for _ in range(count)]
        sq = [_values(10, torch.float16, g) for _ in range(count)]
        return 2, mean + sq, lambda f, r: f(mean, sq, src, torch.tensor(0.5), r)
    avgs = [_values(10, torch.bfloat16, g) for _ in range(3 * count)]
    return 3, avgs, lambda f, r: f(avgs, src, torch.tensor([0.5, 0.25, 1.0]), r)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("op", ["lerp_", "moments_", "multi_lerp_"])
def test_bad_rounding_raises_rounding_py_message_and_writes_nothing(entry, op):
    count = 3
    written, tensors, call = _calls(op, count)
    before = [t.clone() for t in tensors]
    for bad in _bad_roundings(count, written):
        with pytest.raises(ValueError) as expected:
            rounding.check_rounding(op, bad, count, written)
        with pytest.raises(ValueError) as raised:
            call(_op(entry, op), bad)
        assert str(raised.value) == str(expected.value)
        for t, b in zip(tensors, before):
            _assert_same(t, b)


@pytest.mark.parametrize("op", ["lerp_", "moments_", "multi_lerp_"])
def test_eager_non_tensor_rounding(op):
    written, tensors, call = _calls(op, 2)
    before = [t.clone() for t in tensors]
    for bad in ([1, 2, 3, 0, 0], 5, "seed"):
        with pytest.raises(ValueError) as expected:
            rounding.check_rounding(op, bad, 2, written)
        with pytest.raises(ValueError) as raised:
            call(_op("eager", op), bad)
        assert str(raised.value) == str(expected.value)
    for t, b in zip(tensors, before):
        _assert_same(t, b)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_rounding_checked_after_lists_and_weight(entry):
    """A call with bad lists or a bad weight says so first, as checks.check_call does; an empty call
    still checks its `rounding` (3 elements)."""
    avg = [torch.zeros(4, dtype=torch.bfloat16)]
    bad = torch.tensor([1.0])
    with pytest.raises(ValueError, match="`src` has 0 tensors but `avg` has 1"):
        _op(entry, "lerp_")(avg, [], torch.tensor(0.5), bad)
    with pytest.raises(ValueError, match="`weight` must be a 0-dim tensor"):
        _op(entry, "lerp_")(avg, [torch.zeros(4)], torch.ones(2), bad)
    with pytest.raises(ValueError, match="must be a 1-D tensor of 3 elements"):
        _op(entry, "lerp_")([], [], torch.tensor(0.5), rounding_tensor(1, 2, [0]))
    _op(entry, "lerp_")([], [], torch.tensor(0.5), rounding_tensor(1, 2, []))


def test_too_many_arguments():
    # (weight, then the optional rounding and stats: a sixth is one too many)
    with pytest.raises(TypeError, match=r"swa_fast.lerp_ takes 3 positional arguments \(6 given\)"):
        _C.lerp_([], [], 0.5, None, None, None)


# --- the CUDA kernels' random bits, on the host -----------------------------------------------------

# A host program over csrc/functors.h's RoundingKey, the code the CUDA kernels run: its vector path's
# `eight` (8 elements from any n0: one Philox call, or two shifted by n0's remainder) against its
# scalar path's `bits`, and `bits` printed for rounding.py to check (no GPU needed).
_HOST_PROGRAM = r"""
#include <cinttypes>
#include <cstdio>
#include "functors.h"

int main() {
  swa_fast::RoundingKey<2> key;
  key.seed_lo = 0x89abcdefu, key.seed_hi = 0x01234567u, key.step_lo = 5, key.step_hi = 2;
  key.stream_hi[0] = 3u << 24, key.stream_hi[1] = 4u << 24;
  const uint64_t starts[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 1000, 1003,
                             (1ull << 32) - 5, (1ull << 35) + 6};
  int bad = 0;
  for (int s = 0; s < 2; ++s) {
    for (const uint64_t n0 : starts) {
      uint32_t out[4];
      key.eight(s, n0, out);
      for (int i = 0; i < 8; ++i) {
        const uint32_t got = (out[i >> 1] >> ((i & 1) * 16)) & 0xffffu;
        bad += got != key.bits(s, n0 + i);
        std::printf("%d %" PRIu64 " %u\n", s, n0 + i, key.bits(s, n0 + i));
      }
    }
  }
  std::printf("bad %d\n", bad);
  return 0;
}
"""


def test_cuda_vector_bits_on_the_host(tmp_path):
    import shutil
    import subprocess
    from pathlib import Path

    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    root = Path(__file__).resolve().parent.parent
    source, exe = tmp_path / "bits.cpp", tmp_path / "bits"
    source.write_text(_HOST_PROGRAM)
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{root / 'csrc'}"]
    subprocess.run([cxx, "-std=c++20", "-O1", *includes, str(source), "-o", str(exe)], check=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    assert lines[-1] == "bad 0"
    rows = torch.tensor([[int(v) for v in line.split()] for line in lines[:-1]], dtype=torch.int64)
    seed = 0x0123456789ABCDEF
    step = (2 << 32) + 5
    for s in (0, 1):
        mine = rows[rows[:, 0] == s]
        want = rounding.random_bits(mine[:, 1], seed, step, 3 + s)
        assert torch.equal(mine[:, 2], want)
