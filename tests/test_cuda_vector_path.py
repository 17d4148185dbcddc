"""CUDA: the multi-tensor kernel's 128-bit vector path against its scalar path, a whole manager
update as one launch, and an update captured in a CUDA graph replaying bit for bit. Skipped
without a GPU (scripts/gpu_check.sh runs them on one)."""

from __future__ import annotations

import pytest
import torch

import swa_fast
from swa_fast import ops
from swa_fast.flat import ALIGN_ELEMENTS, FlatBuffer
from swa_fast.ops import reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in ops.usable_backends("cuda"),
    reason="needs a GPU and the extension's CUDA kernels",
)

CHUNK = 16 * 1024  # plan::kChunkElems
SIZES = [1, 3, 7, 8, 9, 4095, CHUNK - 1, CHUNK, CHUNK + 1, CHUNK + 7, 3 * CHUNK + 5, 1_000_003]


def _at_offset(values: torch.Tensor, offset: int) -> torch.Tensor:
    """`values` copied into a tensor that starts `offset` elements past a 512-byte boundary."""
    out = torch.empty(values.numel() + offset, dtype=values.dtype, device=values.device)[offset:]
    return out.copy_(values)


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("weight", [0.3, 0.7, 1.0, 0.0])
def test_vector_and_scalar_paths_agree_bit_for_bit(src_dtype, weight):
    g = torch.Generator(device="cuda").manual_seed(0)
    avg = [torch.randn(n, device="cuda", generator=g) for n in SIZES]
    src = [torch.randn(n, device="cuda", generator=g).to(src_dtype) for n in SIZES]
    avg[0][0], src[1][1] = float("nan"), float("inf")  # weight 0 keeps, weight 1 copies, whatever is there
    expected = [a.clone() for a in avg]
    reference.lerp_(expected, src, weight)
    results = []
    for offset in (0, 1, 2, 3):  # offset 0: the vector path; the others: misaligned, the scalar one
        a = [_at_offset(t, offset) for t in avg]
        s = [_at_offset(t, offset) for t in src]
        swa_fast.lerp_(a, s, weight, backend="cuda")
        results.append(a)
    for a_vec, *others in zip(*results):
        for a in others:
            assert torch.equal(a_vec.view(torch.int32), a.view(torch.int32))  # NaN bits included
    for got, want in zip(results[0], expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_flat_buffer_views_are_aligned():
    tensors = [torch.randn(n, device="cuda") for n in (3, 1, 17, 8, 0, 5)]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        flat = FlatBuffer(tensors, dtype=dtype)
        assert all(v.data_ptr() % 16 == 0 for v in flat.views)
        assert all(v.storage_offset() % ALIGN_ELEMENTS == 0 for v in flat.views)


def test_manager_update_is_one_launch():
    model = torch.nn.Sequential(
        torch.nn.Linear(33, 17), torch.nn.LayerNorm(17), torch.nn.Linear(17, 3)
    ).cuda()
    swa = swa_fast.SWA(model)
    swa.update(model)
    swa.update(model)  # warmed up: tables cached
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        swa.update(model)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_is_bit_identical(src_dtype):
    """An EMA step captured once and replayed equals the same steps run eagerly, bit for bit."""
    g = torch.Generator(device="cuda").manual_seed(1)
    model = [
        torch.randn(n, device="cuda", generator=g).to(src_dtype) for n in (CHUNK + 3, 1000, 7, 4 * CHUNK)
    ]
    eager = FlatBuffer(model, dtype=torch.float32)
    captured = FlatBuffer(model, dtype=torch.float32)
    weight = torch.full((), 0.25, device="cuda")
    swa_fast.lerp_(captured.views, model, weight)  # warm-up outside the graph
    captured.groups[0].buffer.copy_(eager.groups[0].buffer)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        swa_fast.lerp_(captured.views, model, weight)
    for step in range(5):
        for t in model:
            t.add_(torch.randn(t.shape, device="cuda", generator=g).to(src_dtype))
        weight.fill_(1 / (step + 2))
        graph.replay()
        swa_fast.lerp_(eager.views, model, weight)
    torch.cuda.synchronize()
    assert torch.equal(captured.groups[0].buffer, eager.groups[0].buffer)
