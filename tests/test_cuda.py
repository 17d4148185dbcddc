"""CUDA: every op on every CUDA backend against the reference, one launch per list, no host sync,
CUDA-graph capture. Skipped without a GPU (scripts/gpu_check.sh runs them on one)."""

import pytest
import torch
from conftest import FLOATS, OPS, cuda_backends, make_case, run_and_check

import swa_fast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")


@pytest.fixture(params=cuda_backends() if torch.cuda.is_available() else ["cuda"])
def cuda_backend(request):
    return request.param


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
