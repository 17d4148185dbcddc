"""multi_lerp_ with K=2 (two EMAs of one model, as PostHocEMA keeps them) against two lerp_ passes,
on every backend that runs here, fp32 averages from an fp32 and from a bf16 source. One pass reads
the source once: per element it moves 2 averages read and written plus one source read (20 bytes
from an fp32 source, 18 from bf16) instead of 24 (or 20): 1.2x (1.11x) less traffic.

    python -m swa_fast.benchmarks.multi_lerp --min-run-time 0.2   # alone; `swa_fast bench` runs it too
"""

from __future__ import annotations

import torch

import swa_fast
from swa_fast.benchmarks.shapes import SHAPE_SETS, numel
from swa_fast.benchmarks.timing import add_ratios, time_methods

WEIGHTS = (0.1, 0.01)
TWO_PASSES = "lerp_ x2"


def workload_name(name: str) -> str:
    return f"{name} multi_lerp_ K={len(WEIGHTS)}"


def _candidates(avgs, src, weights, backends):
    """For each backend b: 'lerp_ x2 swa_fast:b' (one lerp_ per average), 'swa_fast:b' (one
    multi_lerp_)."""
    out = {}
    for b in backends:

        def two_passes(b=b):
            for k, avg in enumerate(avgs):
                swa_fast.lerp_(avg, src, weights[k], backend=b)

        out[f"{TWO_PASSES} swa_fast:{b}"] = two_passes
        out[f"swa_fast:{b}"] = lambda b=b: swa_fast.multi_lerp_(avgs, src, weights, backend=b)
    return out


def bench_multi_lerp(shapes, name, device, min_run_time, src_dtypes=(torch.float32, torch.bfloat16)):
    """Rows per source dtype, from _candidates (the first backend's two passes first: the baseline
    of x_vs_naive); each multi_lerp_ row has x_vs_two_lerps, its speed-up over its backend's two
    lerp_ passes."""
    backends = swa_fast.ops.usable_backends(device, interpreted=False)
    weights = torch.tensor(WEIGHTS, device=device)
    n = numel(shapes)
    rows = []
    for src_dtype in src_dtypes:
        src = [torch.randn(s, device=device).to(src_dtype) for s in shapes]
        avgs = [[torch.randn(s, device=device) for s in shapes] for _ in WEIGHTS]
        moved = n * (2 * 4 * len(WEIGHTS) + src[0].element_size())  # the one-pass traffic
        labels = {
            "workload": workload_name(name),
            "params": str(src_dtype).replace("torch.", ""),
            "tensors": len(shapes),
            "elements": n,
        }
        candidates = _candidates(avgs, src, weights, backends)
        rows += time_methods(candidates, labels, moved, device, min_run_time)
    add_ratios(rows, "x_vs_two_lerps", TWO_PASSES)
    return rows


def main(argv=None):
    from swa_fast.benchmarks.report import print_table
    from swa_fast.benchmarks.standalone import standalone_args

    args, device = standalone_args(__doc__, argv)
    rows = bench_multi_lerp(SHAPE_SETS[args.set](), args.set, device, args.min_run_time)
    print_table(rows)
    for r in rows:
        if "x_vs_two_lerps" in r:
            print(f"{r['params']:>9} {r['method']:<16} {r['x_vs_two_lerps']:.2f}x two lerp_ passes")


if __name__ == "__main__":
    main()
