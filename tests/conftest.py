"""Shared test set-up. TRITON_INTERPRET must be set before anything imports Triton, so that the
Triton kernels run on CPU tensors through the interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import swa_fast  # noqa: E402
from swa_fast import reference  # noqa: E402

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
# Which lists each op writes, and whether it takes a weight.
WRITTEN = {"lerp_": 1, "moments_": 2, "copy_": 1, "swap_": 2}
WEIGHTED = {"lerp_": True, "moments_": True, "copy_": False, "swap_": False}
OPS = tuple(WRITTEN)


def cnn_with_bn(image_side: int) -> torch.nn.Module:
    """A small CNN with BatchNorm (and so an integer buffer) for 1-channel square images."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * (image_side - 2) ** 2, 3),
    )


def cpu_backends() -> list[str]:
    """Every backend that can run CPU tensors here, bar the reference (the oracle)."""
    status = swa_fast.backend_status("cpu")
    return [b for b in ("cpu", "triton", "foreach") if status[b] is None]


def cuda_backends() -> list[str]:
    status = swa_fast.backend_status("cuda")
    return [b for b in ("cuda", "triton", "foreach") if status[b] is None]


def make_case(op: str, shapes, dst_dtype, src_dtype, seed: int = 0, device="cpu"):
    """The op's tensor lists (random values, reproducible) and its extra arguments."""
    g = torch.Generator().manual_seed(seed)

    def rand(dtype):
        return [
            torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes
        ]

    if op == "lerp_":
        return [rand(dst_dtype), rand(src_dtype)], (0.3,)
    if op == "moments_":
        sq = [t * t for t in rand(dst_dtype)]
        return [rand(dst_dtype), sq, rand(src_dtype)], (0.3,)
    if op == "copy_":
        return [rand(dst_dtype), rand(src_dtype)], ()
    return [rand(dst_dtype), rand(dst_dtype)], ()  # swap_


def clone_lists(lists, dtype=None):
    return [[t.clone() if dtype is None else t.to(dtype) for t in lst] for lst in lists]


def assert_matches_reference(op: str, lists_before, lists_after, extra) -> None:
    """Compare an op's result with reference.py run on the same inputs.

    fp32/fp64 destinations: within 1e-6 relative (1e-12 for fp64). bf16/fp16: the error against an
    fp64 computation is at most twice the error of the reference (PyTorch's own ops), with a floor
    of half an ulp of the largest value (a correctly rounded result may differ from another one).
    copy_ and swap_ are exact.
    """
    expected = clone_lists(lists_before)
    getattr(reference, op)(*expected, *extra)
    exact64 = clone_lists(lists_before, torch.float64)
    getattr(reference, op)(*exact64, *extra)
    for k in range(WRITTEN[op]):
        for i, (got, want, want64) in enumerate(zip(lists_after[k], expected[k], exact64[k])):
            where = f"{op} list {k} tensor {i} ({got.dtype}, shape {tuple(got.shape)})"
            assert got.dtype == want.dtype and got.shape == want.shape, where
            if op in ("copy_", "swap_"):
                assert torch.equal(got, want), where
            elif got.dtype in LOW_PRECISION:
                if got.numel() == 0:
                    continue
                ours = (got.double() - want64).abs().max().item()
                torch_err = (want.double() - want64).abs().max().item()
                half_ulp = torch.finfo(got.dtype).eps / 2 * want64.abs().max().item()
                assert ours <= 2 * max(torch_err, half_ulp), f"{where}: error {ours} vs torch {torch_err}"
            else:
                tol = 1e-12 if got.dtype == torch.float64 else 1e-6
                torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m, w=where: f"{w}: {m}")


def run_and_check(op: str, backend: str, shapes, dst_dtype, src_dtype, seed: int = 0, device="cpu") -> None:
    lists, extra = make_case(op, shapes, dst_dtype, src_dtype, seed, device)
    before = clone_lists(lists)
    getattr(swa_fast, op)(*lists, *extra, backend=backend)
    assert_matches_reference(op, before, lists, extra)


@pytest.fixture(params=cpu_backends())
def backend(request):
    return request.param
