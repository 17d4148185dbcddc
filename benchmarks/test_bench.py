"""The benchmark suite's cases under pytest-benchmark: the same methods on the same tensors as
benchmarks/run.py (which also reports bandwidth and ratios).

    pytest benchmarks/ --benchmark-only                      every shape set, SWA and EMA updates
    pytest benchmarks/ --benchmark-only -k tiny              one set
    pytest benchmarks/ --benchmark-only --benchmark-group-by=param:workload
"""

from __future__ import annotations

import pytest
import torch

from swa_fast.benchmarks.shapes import SHAPE_SETS
from swa_fast.benchmarks.workloads import ShapeModel, methods

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WORKLOADS = [
    (name, dtype, kind) for name in SHAPE_SETS for dtype in ("float32", "bfloat16") for kind in ("swa", "ema")
]
_CANDIDATES: dict = {}


def candidates(workload):
    """name -> one update, built once per workload (the tensors are shared by its methods)."""
    if workload not in _CANDIDATES:
        _CANDIDATES.clear()  # one workload's tensors alive at a time
        name, dtype, kind = workload
        shapes = SHAPE_SETS[name]()
        model = ShapeModel(shapes, getattr(torch, dtype), DEVICE)
        avg = [torch.randn(s, device=DEVICE) for s in shapes]
        _CANDIDATES[workload] = methods(avg, [p.detach() for p in model.parameters()], model, DEVICE, kind)
    return _CANDIDATES[workload]


def method_names():
    # The methods methods() offers for any workload on this device (the fp32 and bf16 sets differ
    # only in foreach_lerp vs cast+foreach_lerp, resolved per case below).
    names = list(candidates(("tiny-1000", "float32", "swa")))
    _CANDIDATES.clear()
    return names


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: "-".join(w))
@pytest.mark.parametrize("method", method_names())
def test_update(benchmark, workload, method):
    fns = candidates(workload)
    if method == "foreach_lerp" and method not in fns:
        method = "cast+foreach_lerp"  # a bf16 model: what users do today is cast, then update
    benchmark.group = "-".join(workload)
    benchmark.extra_info["device"] = str(DEVICE)
    fn = fns[method]
    if DEVICE.type == "cuda":

        def fn(update=fns[method]):
            update()
            torch.cuda.synchronize()

    benchmark(fn)
