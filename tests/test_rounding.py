"""Stochastic rounding into bf16 and fp16 averages (ops/rounding.py defines the bits): the
generator against its published answers, the rounding's properties and bias, the same bits on every
backend and however the tensors are cut, the managers' and the drop-in's `rounding="stochastic"`,
their state, and the stalled bf16 EMA it cures."""

import ctypes
import ctypes.util
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import cpu_backends, cuda_backends, mlp, same_bits

import swa_fast
from swa_fast.ops import StochasticRounding, reference
from swa_fast.ops.rounding import philox4x32_10, random_bits, round_stochastically, rounding_tensor
from swa_fast.swa_utils import AveragedModel, get_ema_multi_avg_fn

LOW = (torch.bfloat16, torch.float16)
ALL_BACKENDS = ["reference", *cpu_backends()]


# --- the generator and the rounding ----------------------------------------------------------------


@pytest.mark.parametrize(
    "counter, key, expected",
    [  # Random123's known-answer vectors for philox4x32_10 (kat_vectors)
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_gives_the_published_answers(counter, key, expected):
    words = philox4x32_10([torch.tensor([c]) for c in counter], key)
    assert tuple(int(w) for w in words) == expected


def test_random_bits_are_uniform_and_differ_by_seed_step_and_stream():
    index = torch.arange(1 << 16)
    r = random_bits(index, 7, 3, 0)
    assert r.min() >= 0 and r.max() < 65536
    counts = torch.bincount(r >> 12, minlength=16).double()  # 16 bins of 4,096 values each
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum().item()
    assert chi2 < 50  # 15 degrees of freedom: p < 1e-5 above 50
    for other in (random_bits(index, 8, 3, 0), random_bits(index, 7, 4, 0), random_bits(index, 7, 3, 1)):
        assert (other == r).double().mean() < 0.01


@pytest.mark.parametrize("dtype", LOW)
def test_values_the_format_holds_are_never_changed(dtype):
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    held = every[torch.isfinite(every)].float()
    r = random_bits(torch.arange(held.numel()), 1, 0, 0)
    assert same_bits(round_stochastically(held, dtype, r), held.to(dtype))
    r_max = torch.full_like(r, 65535)
    assert same_bits(round_stochastically(held, dtype, r_max), held.to(dtype))


def _neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x rounded with the smallest and the largest random bits: towards zero, and away from it
    where x is not held exactly."""
    return (
        round_stochastically(x, dtype, torch.zeros(x.shape, dtype=torch.int64)),
        round_stochastically(x, dtype, torch.full(x.shape, 65535)),
    )


def _magnitude_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16).to(torch.int64) & 0x7FFF


@pytest.mark.parametrize("dtype", LOW)
def test_a_value_rounds_to_one_of_its_two_neighbours(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 14, generator=g).clamp(-1, 1) * torch.logspace(
        -9, 4.8, 1 << 14
    )  # (from 2^16 on, fp16 has inf only)
    low, high = _neighbours(x, dtype)
    assert torch.all(low.double().abs() <= x.double().abs())
    assert torch.all(x.double().abs() <= high.double().abs())
    step = _magnitude_bits(high) - _magnitude_bits(low)  # the next value of the format, or x itself
    assert torch.all((step == 1) | ((step == 0) & (low.float() == x)))
    rounded = round_stochastically(x, dtype, random_bits(torch.arange(x.numel()), 2, 0, 0))
    assert torch.all(same_bits_each(rounded, low) | same_bits_each(rounded, high))
    assert 0.2 < same_bits_each(rounded, high).double().mean() < 0.8  # (both are drawn)


def same_bits_each(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.view(torch.int16) == b.view(torch.int16)


def test_non_finite_values_stay_what_they_are():
    bits = torch.tensor([0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001], dtype=torch.int64)
    x = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
    for r in (0, 65535):
        r = torch.full(x.shape, r)
        bf16 = round_stochastically(x, torch.bfloat16, r).view(torch.int16).tolist()
        assert [b & 0xFFFF for b in bf16] == [0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7FC0]
        fp16 = round_stochastically(x, torch.float16, r).view(torch.int16).tolist()
        assert [b & 0xFFFF for b in fp16] == [0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7E00]
    big = torch.tensor([7e4, -3e38])  # past fp16's range: infinity, whatever the draw
    assert torch.isinf(round_stochastically(big, torch.float16, torch.zeros(2, dtype=torch.int64))).all()


@pytest.mark.parametrize(
    "dtype, value",
    [
        (torch.bfloat16, 1 + 2**-10),
        (torch.bfloat16, -3.14159e-20),
        (torch.float16, 0.1),
        (torch.float16, -1234.567),
        (torch.float16, 3.3e-6),  # fp16's subnormal range
    ],
)
def test_rounding_is_unbiased(dtype, value):
    n = 1 << 18
    x = torch.full((n,), value)
    low, high = (t.double().item() for t in _neighbours(x[:1], dtype))
    step = abs(high - low)
    p = (abs(value) - abs(low)) / step  # the probability of rounding away from zero
    rounded = round_stochastically(x, dtype, random_bits(torch.arange(n), 5, 0, 0)).double()
    bound = 5 * step * math.sqrt(p * (1 - p) / n) + step * 2**-16  # 5 sigma, and the undrawn bits
    assert abs(rounded.mean().item() - float(x[0])) <= bound


# --- the ops: the same bits on every backend, however the tensors are cut --------------------------


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(37,), (5, 3), (0,), (64,), (1, 9)]
    dtypes = [torch.bfloat16, torch.float16, torch.bfloat16, torch.float32, torch.float16]
    avg = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
    src = [
        torch.randn(s, generator=g).to(d)
        for s, d in zip(shapes, [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float32])
    ]
    src[1][0, 0], src[4][0, 3], avg[0][5] = math.inf, math.nan, math.nan  # non-finite values
    src[0][:4] = torch.tensor([3e-6, -6e-8, 65519.0, 1e-30])
    return avg, src


def _clone(tensors):
    return [t.clone() for t in tensors]


def _same_rounding(got, expected) -> bool:
    """The bf16/fp16 tensors (rounded stochastically) bit for bit; the fp32 ones, rounded to nearest,
    to within the last bits a fused multiply-add may move (a backend's own, as torch.lerp's)."""
    for a, b in zip(got, expected):
        if a.dtype in LOW:
            if not same_bits(a, b):
                return False
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)
    return True


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0, 1e-4])
def test_lerp_rounds_the_same_bits_on_every_backend(backend, weight):
    avg, src = _case(0)
    expected, got = _clone(avg), _clone(avg)
    key = StochasticRounding(seed=-3, step=12, firsts=(5, 100, 120, 2**33 + 3, 200))
    swa_fast.lerp_(expected, src, weight, rounding=key, backend="reference")
    swa_fast.lerp_(got, src, weight, rounding=key, backend=backend)
    assert _same_rounding(got, expected)
    if weight == 0:
        assert all(same_bits(a, b) for a, b in zip(got, avg))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_moments_and_multi_lerp_round_the_same_bits_on_every_backend(backend):
    mean, src = _case(1)
    sq = [m.abs() for m in mean]
    key = StochasticRounding(seed=9, step=2**40, stream=3)
    results = {}
    for name in ("reference", backend):
        m, q = _clone(mean), _clone(sq)
        swa_fast.moments_(m, q, src, 0.25, rounding=key, backend=name)
        avgs = [_clone(mean) for _ in range(6)]  # more than one pass of 4
        swa_fast.multi_lerp_(avgs, src, [0.1, 0.2, 0.0, 1.0, 0.5, 0.7], rounding=key, backend=name)
        results[name] = m + q + [t for lst in avgs for t in lst]
    assert _same_rounding(results[backend], results["reference"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", cuda_backends() if torch.cuda.is_available() else [])
def test_gpu_backends_round_the_same_bits_as_the_reference(backend):
    """The CUDA kernels (and Triton compiled, and foreach on the GPU) against the reference on the
    CPU: firsts off the 8-element grid (the kernels' shifted draws) and past 2^32 included."""
    avg, src = _case(0)
    mean = [a.clone() for a in avg]
    sq = [a.float().abs().to(a.dtype) for a in avg]
    key = StochasticRounding(seed=-3, step=12, firsts=(5, 100, 120, 2**33 + 3, 200))
    results = {}
    for name, device in (("reference", "cpu"), (backend, "cuda")):
        on = [[t.to(device) for t in lst] for lst in (avg, mean, sq, src)]
        a, m, q, s_ = on
        swa_fast.lerp_(a, s_, 1e-3, rounding=key, backend=name)
        swa_fast.moments_(m, q, s_, 0.25, rounding=key, backend=name)
        avgs = [[t.clone() for t in on[0]] for _ in range(3)]
        swa_fast.multi_lerp_(avgs, s_, [0.1, 0.0, 1.0], rounding=key, backend=name)
        results[name] = [t.cpu() for t in a + m + q + [t for lst in avgs for t in lst]]
    assert _same_rounding(results[backend], results["reference"])


def test_the_reference_fma_rounds_once_as_the_c_library_does():
    """reference.fma (fp64, rounded to odd) against the C library's fmaf, on random triples of every
    sign and scale and on one where rounding the exact fp64 sum to nearest first would land on an
    fp32 midpoint: (2^-24 + 2^-47)(1 - 2^-23) + (1 + 2^-23) is 1 + 2^-23 + 2^-24 - 2^-70."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.fmaf.restype, libm.fmaf.argtypes = ctypes.c_float, [ctypes.c_float] * 3
    g = torch.Generator().manual_seed(0)
    a, b, c = (
        torch.randn(3000, generator=g) * torch.exp2(torch.randint(-30, 30, (3000,), generator=g))
        for _ in "abc"
    )
    c[:1000] = -(a[:1000].double() * b[:1000].double()).float()  # sums that cancel almost wholly
    hard = torch.tensor([[2.0**-24 + 2.0**-47, 1 - 2.0**-23, 1 + 2.0**-23]])
    a, b, c = (torch.cat([t, hard[:, k]]) for k, t in enumerate((a, b, c)))
    expected = torch.tensor([libm.fmaf(*v) for v in zip(a.tolist(), b.tolist(), c.tolist())])
    assert same_bits(reference.fma(a, b, c), expected)
    double_rounded = (a.double() * b.double() + c.double()).float()
    assert double_rounded[-1] != expected[-1]  # (the case the rounding to odd is there for)


def _unfused_lerp(start: torch.Tensor, end: torch.Tensor, weight: float) -> torch.Tensor:
    """torch.lerp's formula with every operation rounded (no fused multiply-add), in fp32."""
    w = torch.tensor(weight, dtype=torch.float32)
    if abs(weight) < 0.5:
        return start + w * (end - start)
    return end - (end - start) * (1 - w)


# Every backend on the CPU, and on the GPU where there is one (against the reference on the CPU).
PLACES = [(b, "cpu") for b in ALL_BACKENDS] + [
    (b, "cuda") for b in (cuda_backends() if torch.cuda.is_available() else [])
]


@pytest.mark.parametrize("backend, device", PLACES)
@pytest.mark.parametrize("weight", [0.3, 0.7])
def test_every_backend_computes_the_values_it_rounds_as_one_fused_multiply_add(backend, device, weight):
    """Given `rounding`, an fp32 average (stored to nearest) holds the value that a bf16 one would
    round: the same bits on every backend, whichever way torch's or the interpreter's lerp computes
    it, and not what an unfused lerp gives."""
    g = torch.Generator().manual_seed(7)
    avg, src = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    key = StochasticRounding(seed=2, step=3)
    results = {}
    for name, on in (("reference", "cpu"), (backend, device)):
        a, m, q, s_ = (t.to(on, copy=True) for t in (avg, avg, avg.abs(), src))
        avgs = [avg.to(on, copy=True), avg.to(on, copy=True)]
        swa_fast.lerp_([a], [s_], weight, rounding=key, backend=name)
        swa_fast.moments_([m], [q], [s_], weight, rounding=key, backend=name)
        swa_fast.multi_lerp_(avgs, [s_], [weight, 0.1], rounding=key, backend=name)
        results[name] = [t.cpu() for t in (a, m, q, *avgs)]
    assert all(same_bits(x, y) for x, y in zip(results[backend], results["reference"]))
    assert not same_bits(results["reference"][0], _unfused_lerp(avg, src, weight))


@pytest.mark.parametrize("backend, device", PLACES)
@pytest.mark.parametrize("weight", [0.3, 0.7])
def test_every_backend_rounds_alike_where_a_fused_and_an_unfused_lerp_round_apart(backend, device, weight):
    """Elements picked so that the fused and the unfused fp32 lerp differ in the last bit right
    where that element's random bits decide the rounding: every backend stores the fused one's."""
    n, key = 64, StochasticRounding(seed=11, step=5, firsts=(0,))
    r = random_bits(torch.arange(n), key.seed, key.step, key.stream)
    g = torch.Generator().manual_seed(1)
    pool_start = torch.randn(1 << 20, generator=g).bfloat16().float()
    pool_end = torch.randn(1 << 20, generator=g)
    w = torch.tensor(weight, dtype=torch.float32)
    fused = reference.lerp_value(pool_start, pool_end, w, exact=True)
    unfused = _unfused_lerp(pool_start, pool_end, weight)
    differ = fused != unfused
    pool_start, pool_end, fused, unfused = (t[differ] for t in (pool_start, pool_end, fused, unfused))
    start, end = pool_start[:n].clone(), pool_end[:n].clone()
    critical = 0
    for i in range(n):  # a candidate whose two values round apart with element i's bits
        apart = round_stochastically(fused, torch.bfloat16, r[i]) != round_stochastically(
            unfused, torch.bfloat16, r[i]
        )
        found = apart.nonzero()
        if len(found):
            start[i], end[i] = pool_start[found[0, 0]], pool_end[found[0, 0]]
            critical += 1
    assert critical >= n // 2
    expected = round_stochastically(reference.lerp_value(start, end, w, exact=True), torch.bfloat16, r)
    assert not same_bits(expected, round_stochastically(_unfused_lerp(start, end, weight), torch.bfloat16, r))
    got = start.bfloat16().to(device)
    swa_fast.lerp_([got], [end.to(device)], weight, rounding=key, backend=backend)
    assert same_bits(got.cpu(), expected)


def test_torch_s_default_cpu_kernels_change_no_value():
    """At ATEN_CPU_CAPABILITY=default torch's lerp is not fused (in its AVX2 and AVX-512 code it is):
    the two tests above pass there too, in a subprocess (torch reads the variable once)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    tests = "one_fused_multiply_add or unfused_lerp_round_apart"
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", tests]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout[-3000:]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bits_do_not_depend_on_how_the_tensors_are_cut(backend):
    """An element draws by its place in the whole flat average: a tensor updated whole, or as two
    pieces (two shards, two chunks) each given its own first element, rounds alike."""
    g = torch.Generator().manual_seed(3)
    whole = torch.randn(1000, generator=g).bfloat16()
    src = torch.randn(1000, generator=g)
    pieces = [whole[:333].clone(), whole[333:].clone()]
    one = whole.clone()
    swa_fast.lerp_([one], [src], 0.01, rounding=StochasticRounding(1, 5, firsts=(77,)), backend=backend)
    key = StochasticRounding(1, 5, firsts=(77, 77 + 333))
    swa_fast.lerp_(pieces, [src[:333], src[333:]], 0.01, rounding=key, backend=backend)
    assert same_bits(torch.cat(pieces), one)
    assert not same_bits(one, whole.float().lerp(src, 0.01).bfloat16())  # (rounded otherwise than to nearest)


# The CPU kernels' draws at each SIMD width that philox_blocks.h has: lerp_ into bf16 and fp16
# averages of sizes around its 8-, 32- and 512-element steps, off the 8-element grid, and across the
# 2^32nd Philox call (element 2^35); moments_ and multi_lerp_ (several streams).
_WIDTH_SCRIPT = """
import sys, torch, swa_fast
from swa_fast.ops import StochasticRounding, reference
avg, sq, src = torch.load(sys.argv[1])
firsts = [0, 3, 2**35 - 1000, 2**35 - 4, 77, 2**35 + 5, 1, 512, 9, 2**40 + 3]
key = StochasticRounding(seed=5, step=3, firsts=firsts)
mean, avgs = [a.clone() for a in avg], [[a.clone() for a in avg] for _ in range(3)]
swa_fast.lerp_(avg, src, 0.3, rounding=key, backend="cpu")
swa_fast.moments_(mean, sq, src, 0.1, rounding=StochasticRounding(seed=1, step=2, stream=7), backend="cpu")
swa_fast.multi_lerp_(avgs, src, [0.1, 0.2, 0.7], rounding=key, backend="cpu")
torch.save([t.view(torch.int16) for t in avg + mean + sq + [t for lst in avgs for t in lst]], sys.argv[2])
"""


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the compiled CPU kernels are not built")
def test_cpu_kernels_draw_the_same_bits_at_every_simd_width(tmp_path):
    """ATEN_CPU_CAPABILITY caps the width of the CPU kernels' Philox calls as it caps torch's own
    kernels: scalar, AVX2 and AVX-512 (where the CPU has them) must store the same bits; the ops'
    bits against the reference are the other tests' (at this CPU's widest). The inputs are made
    here: torch's own random numbers differ between its kernels' widths."""
    g = torch.Generator().manual_seed(0)
    sizes = [1, 7, 8, 31, 255, 256, 257, 511, 513, 2049]
    low = [torch.bfloat16 if i % 2 else torch.float16 for i in range(len(sizes))]
    avg = [torch.randn(n, generator=g).to(d) for n, d in zip(sizes, low)]
    inputs = tmp_path / "inputs.pt"
    torch.save((avg, [a.abs() for a in avg], [torch.randn(n, generator=g) for n in sizes]), inputs)
    results = {}
    for capability in ("default", "avx2", "avx512"):
        path = tmp_path / f"{capability}.pt"
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        subprocess.run([sys.executable, "-c", _WIDTH_SCRIPT, str(inputs), str(path)], env=env, check=True)
        results[capability] = torch.load(path)
    for capability in ("avx2", "avx512"):
        assert all(torch.equal(a, b) for a, b in zip(results[capability], results["default"])), capability


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "rounding, message",
    [
        (torch.tensor([1, 2, 0, 0, 0, 0, 0, 0], dtype=torch.int32), "must be an int64 tensor on the CPU"),
        (rounding_tensor(1, 2, [0, 0, 0, 0]), "must be a 1-D tensor of 8 elements"),
        (rounding_tensor(1, -2, [0] * 5), "holds step -2"),
        (rounding_tensor(1, 2, [0] * 5, stream=256), "holds stream 256"),
        (rounding_tensor(1, 2, [0, 0, -1, 0, 0]), "holds -1 as the first element index of tensor 2"),
        ("stochastic", "must be None or a 1-D int64 tensor on the CPU"),
    ],
)
def test_a_bad_rounding_argument_is_refused_and_writes_nothing(backend, rounding, message):
    avg, src = _case(2)
    before = _clone(avg)
    with pytest.raises(ValueError, match=message):
        swa_fast.lerp_(avg, src, 0.5, rounding=rounding, backend=backend)
    assert all(same_bits(a, b) for a, b in zip(avg, before))


# --- managers and the drop-in ---------------------------------------------------------------------


def _perturbed(model, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.01)


def _ema_run(backend: str, steps: int, state=None, **options):
    """An EMA of `steps` updates, each after a perturbation of the model; from `state`, the updates
    it holds are not made again (the model is perturbed alike)."""
    model = mlp(6, 40, 3, seed=0)
    ema = swa_fast.EMA(model, 0.9, dtype=torch.bfloat16, rounding="stochastic", backend=backend, **options)
    if state is not None:
        ema.load_state_dict(state)
    for step in range(steps):
        _perturbed(model, step)
        if step >= (0 if state is None else state["updates"]):
            ema.update(model)
    return ema


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ema_averages_round_alike_on_every_backend_and_resume_bit_for_bit(backend):
    expected = _ema_run("reference", 6, seed=42).state_dict()
    got = _ema_run(backend, 6, seed=42).state_dict()
    assert got["seed"] == 42 and got["rounding"] == "stochastic"
    assert all(same_bits(got["average"][n], expected["average"][n]) for n in expected["average"])
    halfway = _ema_run(backend, 3, seed=42).state_dict()
    resumed = _ema_run(backend, 6, state=halfway, seed=0).state_dict()  # the seed comes from the state
    assert all(same_bits(resumed["average"][n], expected["average"][n]) for n in expected["average"])
    other_seed = _ema_run(backend, 6, seed=43).state_dict()["average"]
    assert not all(same_bits(other_seed[n], expected["average"][n]) for n in expected["average"])


def test_a_manager_refuses_a_state_of_another_rounding_and_keeps_its_average():
    nearest = swa_fast.EMA(mlp(6, 40, 3, seed=0), 0.9, dtype=torch.bfloat16)
    ema = _ema_run("foreach", 2, seed=1)
    before = {n: t.clone() for n, t in ema.state_dict()["average"].items()}
    with pytest.raises(ValueError, match="rounding='stochastic', got one with rounding='nearest'"):
        ema.load_state_dict(nearest.state_dict())
    assert all(same_bits(t, before[n]) for n, t in ema.state_dict()["average"].items())


def test_stochastic_rounding_needs_low_precision_averages_and_a_host_count():
    model = mlp(6, 40, 3, seed=0)
    with pytest.raises(ValueError, match="pass dtype=torch.bfloat16"):
        swa_fast.EMA(model, rounding="stochastic")
    with pytest.raises(ValueError, match="cannot be captured"):
        swa_fast.EMA(model, dtype=torch.bfloat16, rounding="stochastic", capturable=True)
    with pytest.raises(ValueError, match="rounding must be 'nearest' or 'stochastic'"):
        swa_fast.SWA(model, dtype=torch.bfloat16, rounding="up")
    with pytest.raises(ValueError, match="seed must be an int"):
        swa_fast.SWA(model, dtype=torch.bfloat16, rounding="stochastic", seed=1.5)
    with pytest.raises(ValueError, match="pass dtype=torch.bfloat16"):
        AveragedModel(model, rounding="stochastic")


def test_every_manager_rounds_its_low_precision_averages_stochastically():
    model = mlp(6, 40, 3, seed=0)
    managers = [
        swa_fast.SWA(model, dtype=torch.bfloat16, rounding="stochastic", seed=1),
        swa_fast.SWAG(model, 2, dtype=torch.float16, rounding="stochastic", seed=1),
        swa_fast.PostHocEMA(model, (0.05, 0.1), dtype=torch.bfloat16, rounding="stochastic", seed=1),
    ]
    twins = [  # the same on the reference backend
        swa_fast.SWA(model, dtype=torch.bfloat16, rounding="stochastic", seed=1, backend="reference"),
        swa_fast.SWAG(model, 2, dtype=torch.float16, rounding="stochastic", seed=1, backend="reference"),
        swa_fast.PostHocEMA(
            model, (0.05, 0.1), dtype=torch.bfloat16, rounding="stochastic", seed=1, backend="reference"
        ),
    ]
    for step in range(4):
        _perturbed(model, step)
        for manager in managers + twins:
            manager.update(model)
    for manager, twin in zip(managers, twins):
        ours, theirs = manager.state_dict(), twin.state_dict()
        assert all(same_bits(ours["average"][n], theirs["average"][n]) for n in ours["average"])
    swag, twin = managers[1], twins[1]
    assert all(same_bits(a, b) for a, b in zip(swag.sq.views, twin.sq.views))


def test_the_drop_in_rounds_as_the_ema_manager_does():
    """AveragedModel(dtype=bf16, rounding="stochastic") numbers the elements and counts the updates
    as the manager does: the same model, decay and seed give the same bits."""
    model = mlp(6, 40, 3, seed=0)
    dropin = AveragedModel(
        model, dtype=torch.bfloat16, rounding="stochastic", seed=8, multi_avg_fn=get_ema_multi_avg_fn(0.9)
    )
    ema = swa_fast.EMA(model, 0.9, dtype=torch.bfloat16, rounding="stochastic", seed=8)
    for step in range(5):
        _perturbed(model, step)
        dropin.update_parameters(model)
        ema.update(model)
    assert int(dropin.state_dict()["rounding_seed"]) == 8
    averages = ema.state_dict()["average"]
    for name, p in dropin.module.named_parameters():
        assert same_bits(p.detach(), averages[name]), name


# --- the stalled bf16 EMA --------------------------------------------------------------------------


def test_a_bf16_ema_of_decay_0_9999_stalls_when_rounded_to_nearest_and_tracks_fp32_stochastically():
    """10,000 updates of an EMA (decay 0.9999) of a stationary noisy signal (mean 1, noise 0.01)
    from 0.9: the fp32 EMA moves to about 0.963. In bf16 rounded to nearest each update's step
    (about 1e-5) is under half a unit in the last place (2^-9 near 1) and the average never moves.
    Rounded stochastically, the mean over the elements stays within half a bf16 ulp of the fp32
    EMA's at every checkpoint; each element wanders around it by a random walk of about
    sqrt(|signal - average| / (2 ulp)) ulps (docs/low-precision.md)."""
    n, decay, steps = 1024, 0.9999, 10_000
    signal = torch.nn.Parameter(torch.full((n,), 0.9))
    model = torch.nn.ParameterList([signal])
    ema32 = swa_fast.EMA(model, decay, dtype=torch.float32)
    nearest = swa_fast.EMA(model, decay, dtype=torch.bfloat16)
    stochastic = swa_fast.EMA(model, decay, dtype=torch.bfloat16, rounding="stochastic", seed=2)
    g = torch.Generator().manual_seed(0)
    errors = []
    for step in range(steps):
        if step:  # the first update copies the start, 0.9
            signal.data = 1.0 + 0.01 * torch.randn(n, generator=g)
        for manager in (ema32, nearest, stochastic):
            manager.update(model)
        if step % 500 == 499:
            reference = ema32.average.views[0].double()
            ulp = 2.0 ** (torch.floor(torch.log2(reference.abs())) - 7)
            errors.append(((stochastic.average.views[0].double() - reference) / ulp).mean().abs().item())
    final = ema32.average.views[0]
    assert final.mean().item() == pytest.approx(1 - 0.1 * decay**steps, abs=2e-3)  # it moved
    assert torch.all(nearest.average.views[0] == torch.tensor(0.9).bfloat16())  # it stalled
    assert max(errors) <= 0.5
