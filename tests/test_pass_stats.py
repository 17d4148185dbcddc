"""What the averaging pass sees (`stats`, ops/pass_stats.py): the definition on cases worked out by
hand, every backend against the reference, the argument's checks, and the managers' `stats=True`,
`last_stats()` and their one-time warning for a stalled average."""

import warnings

import pytest
import torch
from conftest import cpu_backends, cuda_backends, mlp, same_bits

import swa_fast
from swa_fast.ops import StochasticRounding
from swa_fast.ops.pass_stats import ListStats, read_stats, stats_tensor

ALL_BACKENDS = ["reference", *cpu_backends()]


def _clone(tensors):
    return [t.clone() for t in tensors]


# --- the definition, by hand ------------------------------------------------------------------------


def test_a_bf16_lerp_counts_what_it_wrote_what_stayed_and_what_is_not_finite():
    avg = [torch.tensor([1.0, 1.0, 0.0, 4.0], dtype=torch.bfloat16)]
    src = [torch.tensor([1.0 + 2**-10, 3.0, float("inf"), float("nan")])]
    stats = stats_tensor(1)
    swa_fast.lerp_(avg, src, 0.5, stats=stats, backend="reference")
    (row,) = read_stats(stats)
    # 1 + 2^-11 rounds back to 1 in bf16 (a step of 2^-7 there); 2.0 is new; lerp(0, inf, 0.5) is
    # inf - inf * 0.5, NaN (as torch.lerp), and 4 -> NaN
    assert avg[0].float().tolist()[:2] == [1.0, 2.0] and avg[0][2:].isnan().all()
    assert (row.written, row.unchanged, row.non_finite) == (4, 1, 2)
    assert row.max_update == 1.0  # the NaN differences are left out

    finite = [torch.tensor([1.0, 1.0], dtype=torch.bfloat16)]
    stats = stats_tensor(1)
    swa_fast.lerp_(finite, [torch.tensor([1.0 + 2**-10, 1.5])], 0.5, stats=stats, backend="reference")
    assert read_stats(stats) == [ListStats(2, 1, 0, 0.25)]


def test_weight_zero_adds_nothing_and_calls_add_up():
    avg = [torch.ones(10), torch.ones(3, dtype=torch.float16)]
    src = [torch.full((10,), 3.0), torch.full((3,), 3.0)]
    stats = stats_tensor(1)
    swa_fast.lerp_(avg, src, 0.0, stats=stats, backend="reference")
    assert stats.tolist() == [[0, 0, 0, 0]]
    swa_fast.lerp_(avg, src, 0.25, stats=stats, backend="reference")  # 1 -> 1.5
    swa_fast.lerp_(avg, src, 0.5, stats=stats, backend="reference")  # 1.5 -> 2.25
    assert read_stats(stats) == [ListStats(26, 0, 0, 0.75)]


def test_moments_and_multi_lerp_have_a_row_per_written_list():
    mean, sq, src = [torch.zeros(5)], [torch.zeros(5)], [torch.full((5,), 2.0)]
    stats = stats_tensor(2)
    swa_fast.moments_(mean, sq, src, 0.5, stats=stats, backend="reference")
    assert read_stats(stats) == [ListStats(5, 0, 0, 1.0), ListStats(5, 0, 0, 2.0)]
    avgs = [[torch.zeros(4)] for _ in range(6)]
    stats = stats_tensor(6)
    swa_fast.multi_lerp_(
        avgs, [torch.ones(4)], [0.5, 0.0, 1.0, 0.25, 0.0, 0.125], stats=stats, backend="reference"
    )
    assert [r.written for r in read_stats(stats)] == [4, 0, 4, 4, 0, 4]
    assert [r.max_update for r in read_stats(stats)] == [0.5, 0.0, 1.0, 0.25, 0.0, 0.125]


# --- every backend against the reference -------------------------------------------------------------


def _case(seed: int):
    """Averages of every floating dtype with sources of mixed dtypes, non-finite values, values
    the update leaves as they are in bf16, and a tensor long enough for several blocks."""
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.float32]
    shapes = [(37,), (8, 9), (300,), (17,), (5000,), (3, 1)]
    avg = [(1 + torch.randn(s, generator=g) * 0.1).to(d) for s, d in zip(shapes, dtypes)]
    src = [
        (a.float() + torch.randn(a.shape, generator=g) * 0.01).to(d)
        for a, d in zip(
            avg, [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32, torch.float32]
        )
    ]
    # (the NaN average is fp32: in bf16 torch's and the kernels' NaN bits differ, which the Triton
    # kernels count as a change: pass_stats.py)
    src[1].view(-1)[0], src[2][4], avg[2][5], src[4][7] = (
        float("inf"),
        float("nan"),
        float("nan"),
        float("-inf"),
    )
    return avg, src


def _same_stats(got, expected) -> None:
    for a, b in zip(read_stats(got), read_stats(expected)):
        assert (a.written, a.unchanged, a.non_finite) == (b.written, b.unchanged, b.non_finite)
        assert a.max_update == pytest.approx(b.max_update, rel=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("rounding", [None, StochasticRounding(seed=5, step=3)])
@pytest.mark.parametrize("weight", [1e-3, 0.5, 1.0, 0.0])
def test_lerp_counts_alike_on_every_backend_and_writes_what_it_writes_without_stats(
    backend, rounding, weight
):
    avg, src = _case(0)
    results = {}
    for name in ("reference", backend):
        got, stats = _clone(avg), stats_tensor(1)
        swa_fast.lerp_(got, src, weight, rounding=rounding, stats=stats, backend=name)
        results[name] = got, stats
    _same_stats(results[backend][1], results["reference"][1])
    without = _clone(avg)
    swa_fast.lerp_(without, src, weight, rounding=rounding, backend=backend)
    assert all(same_bits(a, b) for a, b in zip(results[backend][0], without))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("rounding", [None, StochasticRounding(seed=-1, step=2**33)])
def test_moments_and_multi_lerp_count_alike_on_every_backend(backend, rounding):
    mean, src = _case(1)
    sq = [(m.float() ** 2).to(m.dtype) for m in mean]
    weights = [0.1, 0.0, 1.0, 1e-4, 0.5, 0.3]  # two passes of the compiled op; a weight 0 among them
    results = {}
    for name in ("reference", backend):
        moments = stats_tensor(2)
        swa_fast.moments_(_clone(mean), _clone(sq), src, 0.25, rounding=rounding, stats=moments, backend=name)
        multi = stats_tensor(len(weights))
        avgs = [_clone(mean) for _ in weights]
        swa_fast.multi_lerp_(avgs, src, weights, rounding=rounding, stats=multi, backend=name)
        results[name] = moments, multi
    for got, expected in zip(results[backend], results["reference"]):
        _same_stats(got, expected)
    assert read_stats(results[backend][1])[1].written == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", cuda_backends() if torch.cuda.is_available() else [])
@pytest.mark.parametrize("rounding", [None, StochasticRounding(seed=5, step=3)])
def test_gpu_backends_count_as_the_reference(backend, rounding):
    avg, src = _case(4)
    mean = [a.clone() for a in avg]
    sq = [a.float().abs().to(a.dtype) for a in avg]
    results = {}
    for name, device in (("reference", "cpu"), (backend, "cuda")):
        a, m, q, s_ = ([t.to(device) for t in lst] for lst in (avg, mean, sq, src))
        stats = [stats_tensor(1, device), stats_tensor(2, device), stats_tensor(3, device)]
        swa_fast.lerp_(a, s_, 1e-3, rounding=rounding, stats=stats[0], backend=name)
        swa_fast.lerp_(
            a, s_, torch.tensor(0.0, device=device), rounding=rounding, stats=stats[0], backend=name
        )
        swa_fast.moments_(m, q, s_, 0.25, rounding=rounding, stats=stats[1], backend=name)
        avgs = [[t.clone() for t in a] for _ in range(3)]
        swa_fast.multi_lerp_(avgs, s_, [0.1, 0.0, 1.0], rounding=rounding, stats=stats[2], backend=name)
        results[name] = stats
    for got, expected in zip(results[backend], results["reference"]):
        _same_stats(got, expected)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_device_weight_of_zero_adds_nothing(backend):
    avg, src = _case(2)
    stats = stats_tensor(1)
    swa_fast.lerp_(avg, src, torch.tensor(0.0), stats=stats, backend=backend)
    assert stats.tolist() == [[0, 0, 0, 0]]
    swa_fast.lerp_(avg, src, torch.tensor(0.5), stats=stats, backend=backend)
    assert read_stats(stats)[0].written == sum(a.numel() for a in avg)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "stats, message",
    [
        (torch.zeros(1, 4, dtype=torch.int32), "`stats` must be an int64 tensor on cpu, got torch.int32"),
        (torch.zeros(2, 4, dtype=torch.int64), r"must be a contiguous tensor of shape \[1, 4\]"),
        (torch.zeros(4, 2, dtype=torch.int64).t()[:1], r"got shape \[1, 4\] \(not contiguous\)"),
        ([0, 0, 0, 0], "must be None or an int64 tensor of shape"),
    ],
)
def test_a_bad_stats_argument_is_refused_and_writes_nothing(backend, stats, message):
    avg, src = _case(3)
    before = _clone(avg)
    kept = stats.clone() if isinstance(stats, torch.Tensor) else None
    with pytest.raises(ValueError, match=message):
        swa_fast.lerp_(avg, src, 0.5, stats=stats, backend=backend)
    assert all(same_bits(a, b) for a, b in zip(avg, before))
    if kept is not None:
        assert torch.equal(stats, kept)


# --- managers -------------------------------------------------------------------------------------


def _perturbed(model, step: int, scale: float = 0.01) -> None:
    g = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device), alpha=scale)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_every_manager_reports_its_last_update_per_average(backend):
    model = mlp(6, 40, 3, seed=0)
    total = sum(p.numel() for p in model.parameters())
    managers = {
        "SWA": swa_fast.SWA(model, stats=True, backend=backend),
        "EMA": swa_fast.EMA(
            model, 0.9, dtype=torch.bfloat16, rounding="stochastic", stats=True, backend=backend
        ),
        "SWAG": swa_fast.SWAG(model, 3, stats=True, backend=backend),
        "PostHocEMA": swa_fast.PostHocEMA(model, (0.05, 0.1), stats=True, backend=backend),
    }
    for step in range(3):
        _perturbed(model, step)
        for manager in managers.values():
            manager.update(model)
    rows = {name: m.last_stats() for name, m in managers.items()}
    assert list(rows["SWA"]) == ["average"] and list(rows["SWAG"]) == ["mean", "sq"]
    assert list(rows["PostHocEMA"]) == ["sigma_rel=0.05", "sigma_rel=0.1"]
    for name, per_list in rows.items():
        for row in per_list.values():
            assert row.written == total and row.non_finite == 0, name
            assert 0 < row.max_update < 1 and row.unchanged < total, name
    # the counts are the last update's alone: an update that changes nothing writes every element
    # again and leaves each as it was
    managers["SWA"].update(model)
    managers["SWA"].update(model)
    swa = managers["SWA"].last_stats()["average"]
    assert swa.written == total and swa.max_update < rows["SWA"]["average"].max_update


def test_stats_are_off_by_default_and_refused_where_they_cannot_be_kept():
    model = mlp(4, 8, 2, seed=0)
    with pytest.raises(ValueError, match="last_stats\\(\\) needs stats=True"):
        swa_fast.EMA(model).last_stats()
    with pytest.raises(ValueError, match="stats=True keeps host state between updates"):
        swa_fast.EMA(model, stats=True, capturable=True)
    with pytest.raises(ValueError, match="stats must be True or False"):
        swa_fast.SWA(model, stats="yes")


def test_an_update_the_device_skipped_counts_nothing():
    model = mlp(4, 8, 2, seed=0)
    ema = swa_fast.EMA(model, 0.9, check_finite=True, stats=True)
    ema.update(model)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    ema.update(model)
    assert ema.last_stats()["average"] == ListStats(0, 0, 0, 0.0)


def _stalling_run(rounding: str, updates: int = 5):
    """A bf16 EMA of decay 0.9999 of weights near 1 moving by a little each step: every update is
    far below half a bf16 step there."""
    model = torch.nn.Linear(32, 32)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    ema = swa_fast.EMA(model, 0.9999, dtype=torch.bfloat16, rounding=rounding, stats=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(updates):
            _perturbed(model, step, scale=1e-3)
            ema.update(model)
    return ema, [w for w in caught if "stalled" in str(w.message)]


def test_a_stalled_bf16_average_is_said_once_and_a_stochastic_one_is_not():
    ema, said = _stalling_run("nearest")
    assert len(said) == 1 and "rounding='stochastic'" in str(said[0].message)
    assert said[0].filename == __file__  # the line of the user's update
    row = ema.last_stats()["average"]
    assert row.written == row.unchanged > 0 and row.max_update > 0
    # Stochastic rounding also leaves most elements where they were at each update, but moves the
    # average by the update in expectation: no warning.
    ema, said = _stalling_run("stochastic")
    assert said == []
    assert ema.last_stats()["average"].max_update > 0


def test_a_first_update_that_copies_is_no_stall():
    """EMA's first update copies the model (weight 1): a value bf16 does not hold rounds back to the
    stored one, and moved by nothing else, which is no stall; the next, tiny, update is one."""
    signal = torch.nn.Parameter(torch.full((64,), 0.9))
    model = torch.nn.ParameterList([signal])
    ema = swa_fast.EMA(model, 0.9999, dtype=torch.bfloat16, stats=True)
    said = []
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ema.update(model)
        said.append([w for w in caught if "stalled" in str(w.message)])
        row = ema.last_stats()["average"]
        assert row.unchanged == row.written == 64 and row.max_update > 0
        signal.data += 0.01
    assert [len(s) for s in said] == [0, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_stalled_gpu_average_is_said_from_counts_copied_behind_the_update():
    model = torch.nn.Linear(32, 32).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    ema = swa_fast.EMA(model, 0.9999, dtype=torch.bfloat16, stats=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            _perturbed(model, step, scale=1e-3)
            ema.update(model)
            torch.cuda.synchronize()  # the copy behind this update has arrived by the next one
    assert len([w for w in caught if "stalled" in str(w.message)]) == 1
    row = ema.last_stats()["average"]
    assert row.written == row.unchanged == sum(p.numel() for p in model.parameters())
