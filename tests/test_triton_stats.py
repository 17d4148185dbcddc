"""`stats` in the Triton kernels (lerp_, moments_, multi_lerp_ given a stats tensor, pass_stats.py),
on CPU tensors (TRITON_INTERPRET=1, set in conftest), against two oracles:

- the reference backend on the same inputs, on values whose arithmetic is exact (multiples of 1/16,
  weights of a few bits): both compute the same value, so every count must be the same;
- pass_stats.record, the definition, applied to the kernel's own values (the same call on fp32
  copies of the bf16/fp16 averages, as tests/test_triton_rounding.py takes them), on any values:
  weight 0.3, random values, inf and NaN, where the reference's torch.lerp may round its value
  differently (an fma) from the kernel's.

Counts (columns 0-2) must be equal, the largest update (column 3) equal as fp32 within 1e-6; the
averages written with stats are those written without, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from swa_fast import ops
from swa_fast.ops import pass_stats, triton_kernels
from swa_fast.ops.rounding import StochasticRounding

pytestmark = pytest.mark.skipif(
    not triton_kernels.runs_on(torch.device("cpu")), reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)

BLOCK = triton_kernels.BLOCK
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
ROUNDED = (torch.bfloat16, torch.float16)
# Several blocks, a partial block, an empty tensor, odd small sizes.
SHAPES = [(2 * BLOCK + 5,), (2, 5), (0,), (17,), (1,)]
# Each index's source dtype in turn: a call of several dtype groups, which add into the same rows.
SOURCES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ROUNDINGS = {
    "nearest": lambda src: None,
    # firsts laid end to end (not multiples of 8: a Philox call per element)
    "stochastic": lambda src: StochasticRounding(0x0123456789ABCDEF, 41, 3).tensor(src),
    # firsts multiples of 8 (the aligned kernels' one call per 8 elements)
    "stochastic-padded": lambda src: StochasticRounding(
        7, 2, 1, tuple(8 * BLOCK * i for i, _ in enumerate(src))
    ).tensor(src),
}

# Each average dtype rounded to nearest, bf16 and fp16 stochastically too (fp32 and fp64 always round
# to nearest).
ROUNDED_AS = [(d, "nearest") for d in FLOATS] + [(d, r) for d in ROUNDED for r in ROUNDINGS if r != "nearest"]


def values(shape, dtype, g: torch.Generator, exact: bool, nan: bool = True):
    """Random values of `dtype`: multiples of 1/16 below 4 in magnitude (exact: the ops' arithmetic on
    them is exact at weights of a few bits), or normal ones; in a tensor of more than 40 elements,
    zeros, inf, -inf and (with `nan`) NaN."""
    if exact:
        t = torch.randint(-64, 65, shape, generator=g).to(torch.float64) / 16
    else:
        t = torch.randn(shape, generator=g, dtype=torch.float64)
    t = t.to(dtype)
    flat = t.view(-1)
    if flat.numel() > 40:
        # at places of the first 40 drawn for each tensor: an average's and its source's may meet
        at = torch.randperm(40, generator=g)[:8].tolist()
        for i, value in zip(at, ["inf", "-inf", "nan", "nan"][: 4 if nan else 2]):
            flat[i] = float(value)
        flat[at[4:]] = 0.0
    return t


def make_call(op: str, dst, weights, exact: bool, seed: int = 0, shapes=SHAPES):
    """(lists, weight argument) of a call: averages of `dst` (a dtype, or one per average of
    multi_lerp_), sources of the SOURCES dtypes in turn. `weights`: lerp_ and moments_'s one weight,
    multi_lerp_'s K. With `exact`, no NaN in the averages: a NaN result's stored bits (its payload)
    are each backend's own (the kernels store the dtype's usual NaN, PyTorch's bf16 conversion may
    not), so whether an average's NaN stayed the same NaN is too; the other tests have them."""
    g = torch.Generator().manual_seed(seed)
    src = [values(s, SOURCES[i % len(SOURCES)], g, exact) for i, s in enumerate(shapes)]
    if op == "multi_lerp_":
        dtypes = dst if isinstance(dst, tuple) else (dst,) * len(weights)
        avgs = [values(s, d, g, exact, nan=not exact) for d in dtypes for s in shapes]
        return [avgs, src], weights
    n = ops.OP_TABLE[op].written
    return [*([values(s, dst, g, exact, nan=not exact) for s in shapes] for _ in range(n)), src], weights


def copies(lists):
    return [[t.clone() for t in lst] for lst in lists]


def written_lists(op: str, lists, weight) -> list[list[torch.Tensor]]:
    """The written lists as the kernels see them (multi_lerp_'s K lists of averages apart)."""
    spec = ops.OP_TABLE[op]
    return spec.kernel_lists(*lists, weight)[: spec.kernel_written(*lists, weight)]


def n_written(op: str, lists, weight) -> int:
    return ops.OP_TABLE[op].kernel_written(*lists, weight)


def assert_same_stats(got: torch.Tensor, want: torch.Tensor) -> None:
    for k, (g, w) in enumerate(zip(pass_stats.read_stats(got), pass_stats.read_stats(want))):
        assert (g.written, g.unchanged, g.non_finite) == (w.written, w.unchanged, w.non_finite), (k, g, w)
        assert g.max_update == pytest.approx(w.max_update, rel=1e-6), (k, g, w)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def assert_same_lists(got, want, where: str, nan_payloads: bool = False) -> None:
    """The same bits; with `nan_payloads`, but for NaN's (the kernels store the dtype's canonical
    NaN where PyTorch's conversion may keep the payload and sign)."""
    for k, (gots, wants) in enumerate(zip(got, want)):
        for i, (g, w) in enumerate(zip(gots, wants)):
            at = f"{where}: written list {k} tensor {i} ({g.dtype})"
            if nan_payloads:
                nan = w.isnan()
                assert torch.equal(g.isnan(), nan), at
                g, w = g[~nan], w[~nan]
            assert same_bits(g, w), at


def run_both(op: str, lists, weight, rounding, stats=None):
    """The Triton launcher and the reference on copies of `lists`, each with its stats (a copy of
    `stats`, else zeros); returns ((lists, stats) of Triton, of the reference)."""
    spec = ops.OP_TABLE[op]
    out = []
    for run in (spec.triton, spec.reference):
        mine = copies(lists)
        st = pass_stats.stats_tensor(n_written(op, lists, weight)) if stats is None else stats.clone()
        run(*mine, weight, rounding, st)
        out.append((mine, st))
    return out


def check_against_reference(op: str, lists, weight, rounding) -> None:
    (got, got_stats), (want, want_stats) = run_both(op, lists, weight, rounding)
    assert_same_stats(got_stats, want_stats)
    assert_same_lists(written_lists(op, got, weight), written_lists(op, want, weight), op, nan_payloads=True)


@pytest.mark.parametrize(("dst", "rounding"), ROUNDED_AS)
@pytest.mark.parametrize("op", ["lerp_", "moments_"])
def test_lerp_and_moments_match_the_reference(op, dst, rounding):
    lists, weight = make_call(op, dst, 0.25, exact=True)
    check_against_reference(op, lists, weight, ROUNDINGS[rounding](lists[-1]))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize(
    "weights", [(0.25,), (0.0,), (0.5, 0.0), (0.75, 0.0, 1.0), (0.0, 0.125, 0.25, 0.0)], ids=lambda w: str(w)
)
def test_multi_lerp_matches_the_reference(weights, rounding):
    """K = 1..4 averages of different dtypes, with weights 0 among them (nothing written, nothing
    added to their rows) and 1."""
    dtypes = (torch.bfloat16, torch.float32, torch.float16, torch.float64)[: len(weights)]
    lists, weights = make_call("multi_lerp_", dtypes, weights, exact=True, shapes=[(BLOCK + 5,), *SHAPES[1:]])
    check_against_reference("multi_lerp_", lists, weights, ROUNDINGS[rounding](lists[-1]))


def test_averages_of_mixed_dtypes_in_one_list():
    """One list of bf16, fp32, fp16 and fp64 averages: a launch per dtype group, all adding into
    row 0."""
    g = torch.Generator().manual_seed(5)
    dtypes = (torch.bfloat16, torch.float32, torch.float16, torch.float64, torch.bfloat16)
    shapes = [(BLOCK + 5,), (9,), (3, 7), (40,), (50,)]
    avg = [values(s, d, g, exact=True, nan=False) for s, d in zip(shapes, dtypes)]
    src = [values(s, SOURCES[i % 4], g, exact=True) for i, s in enumerate(shapes)]
    for rounding in ROUNDINGS.values():
        check_against_reference("lerp_", [avg, src], 0.75, rounding(src))


@pytest.mark.parametrize("op", ["lerp_", "moments_", "multi_lerp_"])
def test_misaligned_tensors_match_the_reference(op):
    """Tensors one element past a 16-byte boundary: the kernels' variant that is not ALIGNED."""
    weight = (0.25, 0.0) if op == "multi_lerp_" else 0.25
    lists, weight = make_call(op, torch.bfloat16, weight, exact=True, seed=3)
    lists = [
        [torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape).copy_(t) for t in lst] for lst in lists
    ]
    for rounding in ("nearest", "stochastic"):
        check_against_reference(op, lists, weight, ROUNDINGS[rounding](lists[-1]))


def kernel_values(op: str, lists, weight) -> list[list[torch.Tensor]]:
    """The values the kernel rounds into each written tensor: the same call on fp32 copies of the
    bf16/fp16 averages (fp32 and fp64 averages store them as computed)."""
    written = ops.OP_TABLE[op].written
    wide = [
        [t.float() if t.dtype in ROUNDED else t.clone() for t in lst] if k < written else lst
        for k, lst in enumerate(lists)
    ]
    ops.OP_TABLE[op].triton(*wide, weight)
    return written_lists(op, wide, weight)


def defined_stats(op: str, before, after, weight) -> torch.Tensor:
    """pass_stats.record over every written tensor, from the kernel's values."""
    stats = pass_stats.stats_tensor(n_written(op, before, weight))
    weights = weight if op == "multi_lerp_" else [weight] * len(stats)
    olds, values_, stored = (
        written_lists(op, before, weight),
        kernel_values(op, before, weight),
        written_lists(op, after, weight),
    )
    for k in range(len(stats)):
        if float(weights[k]) != 0:
            for old, value, new in zip(olds[k], values_[k], stored[k]):
                pass_stats.record(stats[k], old, value, new)
    return stats


@pytest.mark.parametrize(("dst", "rounding"), ROUNDED_AS)
@pytest.mark.parametrize("op", ["lerp_", "moments_", "multi_lerp_"])
def test_matches_the_definition_on_any_values(op, dst, rounding):
    """Random values, inf and NaN, weight 0.3 (multi_lerp_: 0.3, 0, 0.7): the counts of the kernel's
    own values and stored bits; the averages are those written without stats, bit for bit."""
    weight = (0.3, 0.0, 0.7) if op == "multi_lerp_" else 0.3
    lists, weight = make_call(op, dst, weight, exact=False, seed=1)
    key = ROUNDINGS[rounding](lists[-1])
    without = copies(lists)
    ops.OP_TABLE[op].triton(*without, weight, key)
    stats = pass_stats.stats_tensor(n_written(op, lists, weight))
    after = copies(lists)
    ops.OP_TABLE[op].triton(*after, weight, key, stats)
    assert_same_lists(written_lists(op, after, weight), written_lists(op, without, weight), op)
    assert_same_stats(stats, defined_stats(op, lists, after, weight))
    # the rows of the averages written saw inf and NaN
    written = weight if op == "multi_lerp_" else [weight] * len(stats)
    assert all(
        r.non_finite > 0 and r.max_update > 0 for r, w in zip(pass_stats.read_stats(stats), written) if w
    )


@pytest.mark.parametrize("w", [0.0, 0.3])
@pytest.mark.parametrize("op", ["lerp_", "moments_", "multi_lerp_"])
def test_device_weight(op, w):
    """A weight given as a tensor on the lists' device (CPU here), which the kernel reads: 0 adds
    nothing and writes nothing, 0.3 counts as the host weight 0.3 does."""
    host = (w, 0.5) if op == "multi_lerp_" else w
    device = torch.tensor(host, dtype=torch.float32)
    lists, _ = make_call(op, torch.bfloat16, host, exact=False, seed=2)
    spec = ops.OP_TABLE[op]
    results = []
    for weight in (host, device):
        mine = copies(lists)
        stats = torch.full((n_written(op, lists, host), 4), 5, dtype=torch.int64)
        spec.triton(*mine, weight, None, stats)
        results.append((mine, stats))
    (host_lists, host_stats), (device_lists, device_stats) = results
    assert torch.equal(device_stats, host_stats)
    assert_same_lists(written_lists(op, device_lists, host), written_lists(op, host_lists, host), op)
    if w == 0:
        assert (device_stats[0] == 5).all()  # weight 0 (the first average's): nothing added
        assert_same_lists(written_lists(op, device_lists, host)[:1], written_lists(op, lists, host)[:1], op)
    else:
        assert (device_stats[0, :3] > 5).all()
    want = defined_stats(op, lists, device_lists, host)
    want[:, :3] += 5
    want[:, 3] = want[:, 3].clamp(min=5)
    assert_same_stats(device_stats, want)


@pytest.mark.parametrize("op", ["lerp_", "moments_", "multi_lerp_"])
def test_stats_accumulate_over_calls(op):
    """Two calls into one stats tensor: counts added, the largest update kept (a caller zeroes the
    tensor, the kernels never do)."""
    weight = (0.25, 0.5) if op == "multi_lerp_" else 0.25
    lists, weight = make_call(op, torch.float16, weight, exact=True, seed=4, shapes=[(BLOCK + 7,), (6,)])
    spec = ops.OP_TABLE[op]
    got = pass_stats.stats_tensor(n_written(op, lists, weight))
    want = pass_stats.stats_tensor(n_written(op, lists, weight))
    mine, theirs = copies(lists), copies(lists)
    for scale in (1.0, 0.5):
        w = tuple(scale * x for x in weight) if op == "multi_lerp_" else scale * weight
        spec.triton(*mine, w, None, got)
        spec.reference(*theirs, w, None, want)
    assert_same_stats(got, want)
    assert (got[:, 0] == 2 * (BLOCK + 13)).all()


def test_public_api_routes_stats_to_triton():
    """swa_fast.lerp_(..., stats=, backend="triton") on CPU tensors runs the kernel (interpreted)."""
    g = torch.Generator().manual_seed(6)
    avg = [values((100,), torch.bfloat16, g, exact=True, nan=False)]
    src = [values((100,), torch.float32, g, exact=True)]
    got, want = pass_stats.stats_tensor(1), pass_stats.stats_tensor(1)
    mine, theirs = copies([avg])[0], copies([avg])[0]
    ops.lerp_(mine, src, 0.25, stats=got, backend="triton")
    ops.lerp_(theirs, src, 0.25, stats=want, backend="reference")
    assert_same_stats(got, want)
    assert got[0, 0] == 100
    assert_same_lists([mine], [theirs], "lerp_", nan_payloads=True)
