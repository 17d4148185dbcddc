"""Property-based tests of the op contract: random lists of shapes (0-d, empty, odd sizes), dtype
pairs, source layouts (transposed, strided, expanded, channels_last, lazily negated), weights (0, 1,
subnormal, any real, numpy scalars, 0-dim tensors), non-finite values, and overlapping or aliased
views, on every backend that runs CPU tensors here. Each call either matches the float64 oracle
below (written here, not reference.py) or raises a ValueError and leaves every tensor as it was,
and it raises exactly when the arguments break the contract."""

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import FLOATS, WRITTEN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import swa_fast
from swa_fast import ops

BACKENDS = ops.usable_backends("cpu", reference=True)
SHAPES = [(), (0,), (1,), (2,), (7,), (2, 3), (5, 1), (3, 0), (2, 3, 2), (1, 3, 2, 2), (2, 2, 1, 3)]
SOURCE_LAYOUTS = ["contiguous", "transposed", "strided", "expanded", "channels_last", "negated"]
DESTINATION_LAYOUTS = ["contiguous"] * 6 + ["transposed", "strided", "channels_last", "negated"]
# Values that break naive arithmetic: non-finite, signed zeros, subnormal in fp32 or fp16, large.
SPECIAL_VALUES = [float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-40, 3e-8, 300.0, -65000.0]
SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32}
PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as integers of the same width: equal bits, NaN payloads and -0 included."""
    return t.resolve_neg().contiguous().view(SAME_WIDTH_INT.get(t.dtype, torch.int16)).clone()


def make_tensor(values: torch.Tensor, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """A tensor of `dtype` holding `values` (float64) in the given memory layout. Where the shape
    does not allow the layout, a contiguous tensor; an expanded tensor repeats its first row."""
    shape = values.shape
    if layout == "transposed" and values.dim() >= 2:
        return values.transpose(0, 1).contiguous().to(dtype).transpose(0, 1)
    if layout == "strided" and values.dim() >= 1:
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
        wide[..., ::2] = values.to(dtype)
        return wide[..., ::2]
    if layout == "expanded" and values.dim() >= 1 and shape[0] >= 1:
        return values[:1].to(dtype).expand(shape)
    if layout == "channels_last" and values.dim() == 4:
        return values.to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "negated":
        return (-values).to(dtype)._neg_view()
    return values.to(dtype).clone()


@dataclass
class Case:
    """An op's lists, the weight, and whether the call breaks the contract."""

    lists: list[list[torch.Tensor]]
    weight: object
    weight_value: float
    breaks_contract: bool
    description: str


def weights_values():
    return st.one_of(
        st.sampled_from([0.0, 1.0, 0.5, 0.25, 1e-45, 5e-324, -0.5, 2.0, 1 - 2**-30, 1e-8]),
        st.floats(-2.0, 3.0, allow_nan=False),
    )


@st.composite
def weights(draw):
    """(weight as passed, its real value)."""
    value = draw(weights_values())
    kind = draw(st.sampled_from(["float", "numpy32", "numpy64", "fraction", "exact", "tensor"]))
    if kind == "numpy32":
        weight = np.float32(value)
    elif kind == "numpy64":
        weight = np.float64(value)
    elif kind == "fraction":
        weight = Fraction(value)
    elif kind == "exact" and value in (0.0, 1.0):
        weight = draw(st.sampled_from([int(value), bool(value)]))
    elif kind == "tensor":
        weight = torch.tensor(value, dtype=draw(st.sampled_from(FLOATS)))
    else:
        weight = value
    return weight, (weight.item() if isinstance(weight, torch.Tensor) else float(weight))


def random_values(shape, seed: int, specials: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    picks = torch.rand(shape, generator=g) < specials
    chosen = torch.tensor(SPECIAL_VALUES, dtype=torch.float64)[
        torch.randint(len(SPECIAL_VALUES), shape, generator=g)
    ]
    return torch.where(picks, chosen, values)


@st.composite
def multi_lerp_weights(draw, count: int):
    """(multi_lerp_'s weights as passed: numbers or a 1-D tensor, their real values)."""
    if draw(st.booleans()):
        values = [draw(weights_values()) for _ in range(count)]
        vector = torch.tensor(values, dtype=draw(st.sampled_from(FLOATS)))
        return vector, vector.tolist()
    drawn = [draw(weights()) for _ in range(count)]
    # 0-dim tensors are not numbers: as numbers, a vector of weights is a sequence of real numbers
    drawn = [(w.item(), v) if isinstance(w, torch.Tensor) else (w, v) for w, v in drawn]
    return [w for w, _ in drawn], [v for _, v in drawn]


@st.composite
def op_weight(draw, spec, averages: int | None):
    """(the op's weight as passed, its real value): multi_lerp_'s one per average (weighted_sum_'s
    one per list of sources), bema_'s pair, one weight, or none."""
    if averages:
        return draw(multi_lerp_weights(averages))
    if spec.weight_name == "weights":
        return draw(multi_lerp_weights(2))
    return draw(weights()) if spec.weighted else (None, 0.0)


@st.composite
def cases(draw, op: str):
    spec = ops.OP_TABLE[op]
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    specials = draw(st.sampled_from([0.0, 0.1, 0.5]))
    shapes = [draw(st.sampled_from(SHAPES)) for _ in range(n)]
    # The lists as the kernels see them: multi_lerp_'s K lists of averages (more than the 4 of one
    # pass too), weighted_sum_'s K lists of sources (more than the 8 of one pass too), concatenated
    # into their argument at the end.
    averages = draw(st.integers(1, 2 * spec.weight.per_pass - 2)) if spec.lists_per_weight else None
    names = [name for p in spec.params for name in [p.name] * (averages if p.per_weight else 1)]
    n_written = sum(names.count(p.name) for p in spec.params if p.written)
    lists: list[list[torch.Tensor]] = [[] for _ in names]
    for i, shape in enumerate(shapes):
        dst_dtype = draw(st.sampled_from(FLOATS))
        for k, name in enumerate(names):
            written = k < n_written
            # moments_' sq, swap_'s b, bema_'s out and start: the first list's dtype
            same_dtype = not averages and spec.params[k].same_dtype
            dtype = dst_dtype if k == 0 or same_dtype else draw(st.sampled_from(FLOATS))
            layout = draw(st.sampled_from(DESTINATION_LAYOUTS if written else SOURCE_LAYOUTS))
            values = random_values(shape, seed + 7 * i + k, specials)
            if name == "sq":
                values = values * values  # a second moment
            lists[k].append(make_tensor(values, dtype, layout))
    breaks = any(
        not t.is_contiguous() or t.is_neg() for k in range(n_written) for t in lists[k]
    )  # written tensors must be contiguous and not negated views
    sharing = draw(st.sampled_from(["none", "none", "own destination", "twice", "partial"]))
    nonempty = [i for i in range(n) if lists[0][i].numel() >= 2]
    if sharing == "own destination" and n_written < len(names):
        # A source that is its destination (mean or sq for moments_, an average): allowed.
        i = draw(st.integers(0, n - 1))
        lists[-1][i] = lists[draw(st.integers(0, n_written - 1))][i]
    elif sharing == "twice":
        # One more index whose written tensor is the first list's tensor at index 0 again.
        for k in range(len(names)):
            fresh = random_values(shapes[0], seed - 1 - k, specials).to(lists[k][0].dtype)
            lists[k].append(lists[0][0] if k == 0 else fresh)
        breaks |= lists[0][0].numel() > 0
    elif sharing == "partial" and nonempty:
        # A tensor (any list, any index) made to start one element into a written one.
        i = draw(st.sampled_from(nonempty))
        k = draw(st.integers(0, len(names) - 1))
        j = draw(
            st.sampled_from([j for j in range(n) if lists[k][j].numel() > 0 and (k, j) != (0, i)] or [None])
        )
        if j is not None:
            dst, other = lists[0][i], lists[k][j]
            base = torch.zeros(max(dst.numel(), 1 + other.numel()), dtype=dst.dtype)
            base.copy_(random_values(base.shape, seed + 99, specials))
            lists[0][i] = base[: dst.numel()].view(dst.shape)
            lists[k][j] = base[1 : 1 + other.numel()].view(other.shape)
            breaks = True
    if averages:  # each list per weight concatenated, in its argument's place
        lists = [[t for k, name in enumerate(names) if name == p.name for t in lists[k]] for p in spec.params]
    weight, weight_value = draw(op_weight(spec, averages))
    return Case(lists, weight, weight_value, breaks, f"{sharing}, weight {weight!r}")


# --- the oracle -----------------------------------------------------------------------------------


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lerp64(start: torch.Tensor, end: torch.Tensor, w: float) -> torch.Tensor:
    """torch.lerp's formula in float64: exact at both ends, accurate on either side of |w| = 0.5."""
    if abs(w) < 0.5:
        return start + w * (end - start)
    return end - (end - start) * (1 - w)


def expected_lerp(start: torch.Tensor, end: torch.Tensor, end_in_acc: torch.Tensor, weight: float, dtype):
    """(expected float64 values, error allowed) of a destination of `dtype` moved towards `end`
    (float64 values of the arithmetic dtype) by `weight`. Weight 0 and 1, after rounding to the
    arithmetic dtype, are exact: the destination as it was, or end_in_acc rounded once."""
    acc = acc_dtype(dtype)
    w = torch.tensor(weight, dtype=acc).item()
    if w == 0:
        return start, None
    if w == 1:
        return end_in_acc.to(dtype).double(), None
    value = lerp64(start, end, w)
    eps = torch.finfo(acc).eps
    arithmetic = 4 * eps * (start.abs() + end.abs() + abs(w) * (start.abs() + end.abs()))
    arithmetic = torch.nan_to_num(arithmetic, nan=0.0, posinf=0.0) + torch.finfo(acc).smallest_normal * eps
    return value, arithmetic


def assert_matches(got: torch.Tensor, want: torch.Tensor, error, where: str) -> None:
    """got (in its dtype) against float64 values: bit for bit where error is None, else within the
    arithmetic error plus one rounding into got's dtype (an overflow to inf allowed at the edge)."""
    if error is None:  # NaN anywhere, else the same bits (-0 is not 0)
        want = want.to(got.dtype)
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan), f"{where}: {got} != {want}"
        assert torch.equal(bits(got)[~nan], bits(want)[~nan]), f"{where}: {got} != {want}"
        return
    got64 = got.double()
    nan = want.isnan()
    assert torch.equal(got64.isnan(), nan), f"{where}: NaN at other places: {got} vs {want}"
    info = torch.finfo(got.dtype)
    rounding = info.eps * torch.maximum(want.abs(), torch.tensor(info.smallest_normal))
    bound = error + rounding
    finite = ~nan & want.isfinite() & got64.isfinite()
    assert ((got64 - want).abs() <= bound)[finite].all(), f"{where}: {got} vs {want} (bound {bound})"
    infinite = ~nan & ~(want.isfinite() & got64.isfinite())
    overflow = (want.abs() + bound) >= info.max
    same_sign = torch.sign(got64) == torch.sign(want)
    assert (same_sign & (got64.eq(want) | overflow))[infinite].all(), f"{where}: {got} vs {want}"


def check_against_oracle(op: str, before: list[list[torch.Tensor]], after, weight, where: str):
    """before: float64 copies of the arguments' values; after: the tensors after the call."""
    if op == "multi_lerp_":  # each average k as lerp_ with weight[k]
        n = len(after[-1])
        for j, dst in enumerate(after[0]):
            k, i = divmod(j, n)
            src = before[-1][i].to(acc_dtype(dst.dtype)).double()
            value, error = expected_lerp(before[0][j], src, src, weight[k], dst.dtype)
            assert_matches(dst, value, error, f"{where}, avgs[{k}][{i}]")
        return
    if op == "bema_":
        check_bema(before, after, weight, where)
        return
    if op == "weighted_sum_":
        check_weighted_sum(before, after, weight, where)
        return
    for i, dst in enumerate(after[0]):
        if op == "copy_":
            assert_matches(dst, before[1][i].to(dst.dtype).double(), None, where)
        elif op == "swap_":
            assert_matches(dst, before[1][i], None, where)
            assert_matches(after[1][i], before[0][i], None, where)
        else:
            acc = acc_dtype(dst.dtype)
            src = before[-1][i].to(acc).double()  # the source is read in the arithmetic dtype
            value, error = expected_lerp(before[0][i], src, src, weight, dst.dtype)
            assert_matches(dst, value, error, f"{where}, {op} list 0 [{i}]")
            if op == "moments_":
                square_in_acc = (src.to(acc) * src.to(acc)).double()
                value, error = expected_lerp(before[1][i], src * src, square_in_acc, weight, dst.dtype)
                assert_matches(after[1][i], value, error, f"{where}, moments_ sq [{i}]")


def check_bema(before: list[list[torch.Tensor]], after, weights, where: str) -> None:
    """The EMA as lerp_ with weights[0]; out = the moved EMA, unrounded, + weights[1] (src - start),
    within the arithmetic error of both steps plus one rounding."""
    for i, ema in enumerate(after[0]):
        acc = acc_dtype(ema.dtype)
        src = before[3][i].to(acc).double()
        value, error = expected_lerp(before[0][i], src, src, weights[0], ema.dtype)
        assert_matches(ema, value, error, f"{where}, bema_ ema [{i}]")
        w, c = (torch.tensor(x, dtype=acc).item() for x in weights)
        start = before[2][i]
        moved = before[0][i] if w == 0 else src if w == 1 else lerp64(before[0][i], src, w)
        eps = torch.finfo(acc).eps
        bound = 4 * eps * (moved.abs() + abs(c) * (src.abs() + start.abs())) + (0 if error is None else error)
        bound = torch.nan_to_num(bound, nan=0.0, posinf=0.0) + torch.finfo(acc).smallest_normal * eps
        assert_matches(after[1][i], moved + c * (src - start), bound, f"{where}, bema_ out [{i}]")


def check_weighted_sum(before: list[list[torch.Tensor]], after, weights, where: str) -> None:
    """dst = the sum of each source times its weight (each rounded to the arithmetic dtype: fp64
    where dst or any source at that index is), within the arithmetic error of each product and each
    addition, plus one rounding; dst's values before do not matter."""
    n = len(after[0])
    for i, dst in enumerate(after[0]):
        sources = [before[1][k * n + i] for k in range(len(weights))]
        dtypes = [dst.dtype] + [after[1][k * n + i].dtype for k in range(len(weights))]  # (sources unchanged)
        acc = torch.float64 if torch.float64 in dtypes else torch.float32
        terms = [torch.tensor(w, dtype=acc).item() * s for w, s in zip(weights, sources)]
        value = sum(terms[1:], terms[0])
        eps = torch.finfo(acc).eps
        bound = (len(terms) + 1) * eps * sum(t.abs() for t in terms)
        bound = (
            torch.nan_to_num(bound, nan=0.0, posinf=0.0) + len(terms) * torch.finfo(acc).smallest_normal * eps
        )
        assert_matches(dst, value, bound, f"{where}, weighted_sum_ dst [{i}]")


def run_case(op: str, case: Case) -> None:
    extra = (case.weight,) if ops.OP_TABLE[op].weighted else ()
    for backend in BACKENDS:
        lists = rebuild_sharing(case.lists)
        values = [[t.to(torch.float64, copy=True) for t in lst] for lst in lists]
        before = [[bits(t) for t in lst] for lst in lists]
        where = f"{op} on {backend}: {case.description}"
        try:
            getattr(swa_fast, op)(*lists, *extra, backend=backend)
        except ValueError:
            assert case.breaks_contract, f"{where}: raised for a valid call"
            for k, lst in enumerate(lists):
                for i, t in enumerate(lst):
                    assert torch.equal(bits(t), before[k][i]), (
                        f"{where}: list {k} [{i}] written before raising"
                    )
            continue
        assert not case.breaks_contract, f"{where}: no ValueError"
        check_against_oracle(op, values, lists, case.weight_value, where)
        written = {t.untyped_storage().data_ptr() for lst in lists[: WRITTEN[op]] for t in lst if t.numel()}
        for k in range(WRITTEN[op], len(lists)):
            for i, t in enumerate(lists[k]):
                if t.untyped_storage().data_ptr() not in written:  # else it is its own destination
                    assert torch.equal(bits(t), before[k][i]), f"{where}: source {k} [{i}] changed"


def rebuild_sharing(lists: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """A fresh copy of the lists for one backend, with the same sharing of memory: tensors that
    were one storage are views of one new storage, at the same offsets and strides."""
    storages: dict[int, torch.Tensor] = {}
    out = []
    for lst in lists:
        copies = []
        for t in lst:
            key = t.untyped_storage().data_ptr()
            if key not in storages:
                storages[key] = t.untyped_storage().clone() if t.untyped_storage().nbytes() else None
            storage = storages[key]
            copy = torch.empty(0, dtype=t.dtype)
            if storage is not None:
                copy.set_(storage, t.storage_offset(), t.shape, t.stride())
            else:
                copy = torch.empty(t.shape, dtype=t.dtype)
            copies.append(copy._neg_view() if t.is_neg() else copy)
        out.append(copies)
    return out


@pytest.mark.parametrize("op", ops.OP_TABLE)
def test_op_matches_the_oracle_or_raises_before_writing(op):
    @PROPERTY_SETTINGS
    @given(case=cases(op))
    def check(case):
        run_case(op, case)

    check()
