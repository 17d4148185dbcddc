"""CUDA: every op on every CUDA backend against the reference, one launch per list, no host sync,
CUDA-graph capture. Skipped without a GPU (scripts/gpu_check.sh runs them on one)."""

import pytest
import torch
from conftest import (
    FLOATS,
    OPS,
    cnn_with_bn,
    cuda_backends,
    integer_copy_case,
    make_case,
    random_batch,
    run_and_check,
    same_bits,
    state_copy,
    train_step,
)

import swa_fast
from swa_fast.ops.checks import INTEGER_DTYPES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")


@pytest.fixture(params=cuda_backends() if torch.cuda.is_available() else ["cuda"])
def cuda_backend(request):
    return request.param


@pytest.mark.parametrize(
    "cls, options",
    [
        (swa_fast.SWA, {"use_buffers": True, "check_finite": True}),
        (swa_fast.EMA, {"decay": 0.9, "warmup_gamma": 2.0, "update_after_step": 1, "update_every": 2}),
        (swa_fast.EMA, {"half_life_fraction": 0.3, "update_after_step": 1, "update_every": 2}),
    ],
)
def test_capturable_manager_update_replays_in_a_cuda_graph(cls, options):
    """capturable=True: one update recorded in a CUDA graph, replayed step after step, gives what a
    host-scheduled manager's updates give (the counts, the schedule and the weight on the GPU)."""
    model = cnn_with_bn(8).cuda()
    twin = cnn_with_bn(8).cuda()
    captured, host = cls(model, capturable=True, **options), cls(twin, **options)
    captured.update(model)  # warm-up outside the graph (the first update: a copy)
    host.update(twin)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.update(model)
    for step in range(6):
        g = torch.Generator(device="cuda").manual_seed(step)
        with torch.no_grad():
            for m in (model, twin):
                g.manual_seed(step)
                for t in [*m.parameters(), m[1].running_mean, m[1].running_var]:
                    t.add_(torch.randn(t.shape, device="cuda", generator=g))
                m[1].num_batches_tracked.add_(1)
        graph.replay()
        host.update(twin)
        torch.cuda.synchronize()
        got, want = captured.state_dict(), host.state_dict()
        for name, value in want["average"].items():
            assert torch.equal(got["average"][name], value), (step, name)
        assert (int(got["n_averaged"]), got["calls"]) == (int(want["n_averaged"]), want["calls"])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dst_dtype", FLOATS)
@pytest.mark.parametrize("src_dtype", FLOATS)
def test_dtype_pairs_cuda(op, cuda_backend, dst_dtype, src_dtype):
    run_and_check(op, cuda_backend, [(3, 5), (17,), (0,), (16385,)], dst_dtype, src_dtype, device="cuda")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("size", [1, 7, 16383, 16384, 16385, 4_000_037])
def test_sizes_cuda(op, cuda_backend, size):
    run_and_check(op, cuda_backend, [(size,)], torch.float32, torch.bfloat16, device="cuda")


@pytest.mark.parametrize("op", OPS)
def test_many_tensors_cuda(op, cuda_backend):
    shapes = [((i * 37) % 3000,) for i in range(2000)]
    run_and_check(op, cuda_backend, shapes, torch.float32, torch.float32, device="cuda")


def kernel_launches(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(
        1
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and "kernel" in e.name.lower()
    )


@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_copy_moves_integers_and_bools_bit_for_bit_cuda(cuda_backend, dtype):
    dst, src = integer_copy_case(dtype, "cuda")
    floats = [torch.zeros(5, dtype=torch.bfloat16, device="cuda")], [torch.randn(5, device="cuda")]
    swa_fast.copy_(dst + floats[0], src + floats[1], backend=cuda_backend)
    assert all(same_bits(d.cpu(), s.cpu()) for d, s in zip(dst, src))
    assert torch.equal(floats[0][0], floats[1][0].bfloat16())


@pytest.mark.parametrize("op", OPS)
def test_one_launch_per_list(op):
    lists, extra = make_case(
        op, [(i % 500 + 1,) for i in range(1000)], torch.float32, torch.bfloat16, device="cuda"
    )
    weight = tuple(torch.tensor(w, device="cuda") for w in extra)
    run = lambda: getattr(swa_fast, op)(*lists, *weight, backend="cuda")  # noqa: E731
    run()  # warm-up: builds and caches the device table
    assert kernel_launches(run) == 1


def test_no_host_sync_after_warmup():
    avg = [torch.zeros(1000, device="cuda") for _ in range(100)]
    src = [torch.randn(1000, device="cuda") for _ in range(100)]
    n = torch.zeros((), device="cuda")
    swa_fast.lerp_(avg, src, 1.0 / (n + 1))
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            swa_fast.lerp_(avg, src, 1.0 / (n + 1))
            n += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture_and_replay():
    avg = [torch.zeros(3000, device="cuda"), torch.zeros(7, device="cuda")]
    src = [torch.randn(3000, device="cuda"), torch.randn(7, device="cuda")]
    weight = torch.ones((), device="cuda")
    swa_fast.lerp_(avg, src, weight)  # warm-up outside the graph
    for a in avg:
        a.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        swa_fast.lerp_(avg, src, weight)
    weight.fill_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    for a, s in zip(avg, src):
        torch.testing.assert_close(a, 0.5 * s)


@pytest.mark.parametrize("op", OPS)
def test_opcheck_cuda(op):
    lists, extra = make_case(op, [(3, 4), (7,)], torch.float32, torch.float32, device="cuda")
    torch.library.opcheck(
        getattr(torch.ops.swa_fast, op), (*lists, *(torch.tensor(w, device="cuda") for w in extra))
    )


def train_steps(model, managers, steps, sync_check_from=None):
    """SGD steps on random data, each followed by every manager's update; from step
    `sync_check_from` on, any host synchronisation inside the updates raises."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator(device="cuda").manual_seed(1)
    for s in range(steps):
        train_step(model, opt, *random_batch(16, (3, 8, 8), classes=4, generator=g, device="cuda"))
        if sync_check_from is not None and s >= sync_check_from:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for manager in managers:
                manager.update(model)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_side_stream_update_equals_the_main_stream_one_without_a_sync():
    model = cnn_with_bn(8, in_channels=3, filters=8, classes=4).cuda()
    on_main = swa_fast.SWA(model, use_buffers=True)
    on_side = swa_fast.SWA(model, use_buffers=True, side_stream=True)
    ema_side = swa_fast.EMA(model, decay=0.9, side_stream=True)
    ema_main = swa_fast.EMA(model, decay=0.9)
    train_steps(model, [on_main, on_side, ema_main, ema_side], steps=12, sync_check_from=3)
    for a, b in [(on_main, on_side), (ema_main, ema_side)]:
        expected, got = a.state_dict(), b.state_dict()  # state_dict waits for the side stream
        for name in expected["average"]:
            assert torch.equal(got["average"][name], expected["average"][name]), name


def test_average_in_pinned_cpu_memory_equals_the_gpu_one():
    model = cnn_with_bn(8, in_channels=3, filters=8, classes=4).cuda()
    on_gpu = swa_fast.SWA(model, use_buffers=True)
    on_cpu = swa_fast.SWA(model, use_buffers=True, device="cpu")
    assert on_cpu.average.groups[0].buffer.is_pinned() and on_cpu.n_averaged.device.type == "cpu"
    train_steps(model, [on_gpu, on_cpu], steps=8)
    expected, got = on_gpu.state_dict(), on_cpu.state_dict()
    for name, value in expected["average"].items():
        torch.testing.assert_close(got["average"][name], value.cpu(), rtol=1e-6, atol=1e-7)
    live = state_copy(model)
    x = torch.randn(5, 3, 8, 8, device="cuda")
    with on_cpu.average_applied(model):
        inside = model.eval()(x)
    with on_gpu.average_applied(model):
        torch.testing.assert_close(inside, model(x), rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k


def test_fge_snapshots_in_pinned_cpu_memory():
    model = cnn_with_bn(8, in_channels=3, filters=8, classes=4).cuda()
    on_cpu = swa_fast.FGE(model, device="cpu", pin_memory=True)
    on_gpu = swa_fast.FGE(model)
    for _ in range(3):
        train_steps(model, [], steps=2)
        on_cpu.snapshot(model)
        on_gpu.snapshot(model)
    assert on_cpu.snapshots[0].flat.groups[0].buffer.is_pinned()
    x = torch.randn(6, 3, 8, 8, device="cuda")
    # The same fp32 weights from either store: equal up to the convolution's own run-to-run error.
    torch.testing.assert_close(on_cpu.predict(model, x), on_gpu.predict(model, x), rtol=1e-6, atol=1e-7)
    state = on_cpu.state_dict()
    assert all(v.device.type == "cpu" for snapshot in state["snapshots"] for v in snapshot.values())


def test_swag_samples_on_the_gpu():
    model = cnn_with_bn(8, in_channels=3, filters=8, classes=4).cuda()
    swag = swa_fast.SWAG(model, max_rank=3)
    train_steps(model, [swag], steps=5)
    swag.sample(model, generator=torch.Generator(device="cuda").manual_seed(0))
    assert all(p.is_cuda and p.isfinite().all() for p in model.parameters())
