"""A bf16 model averaged in bf16 with stochastic rounding against the fp32 average of the same model,
on every backend that runs here, over one set of shapes (GPT-2 small's by default). Per element
the bf16 average moves 6 bytes (the model and the average read, the average written) against 10
for an fp32 average: 1.67x less traffic, if drawing the random bits in registers costs nothing.
The bf16 average rounded to nearest (which stalls: docs/low-precision.md) is timed beside them, and
each of the three again with `stats` (what the pass sees, zeroed first as a manager's `stats=True`
does): `stats_cost`, the time with them over the time without.

    python -m swa_fast.benchmarks.low_precision --min-run-time 0.2   # alone; `swa_fast bench` runs it too
"""

from __future__ import annotations

import torch

import swa_fast
from swa_fast.benchmarks.shapes import SHAPE_SETS, numel
from swa_fast.benchmarks.timing import add_ratios, time_methods
from swa_fast.ops import StochasticRounding
from swa_fast.ops.pass_stats import stats_tensor

WEIGHT = 1e-4  # an EMA of decay 0.9999
FP32_AVERAGE = "fp32 average"
NEAREST = "bf16 average, nearest"
WITH_STATS = "stats=True"


def workload_name(name: str) -> str:
    return f"{name} bf16 stochastic rounding"


def _candidates(model, avg32, avg16, backends):
    """For each backend b, timed in turn: 'fp32 average swa_fast:b', 'bf16 average, nearest
    swa_fast:b' and 'swa_fast:b' (the bf16 average rounded stochastically, a new step per call),
    then each again with `stats` ('stats=True ...')."""
    out = {}
    for b in backends:
        out[f"{FP32_AVERAGE} swa_fast:{b}"] = lambda b=b: swa_fast.lerp_(avg32, model, WEIGHT, backend=b)
        out[f"{NEAREST} swa_fast:{b}"] = lambda b=b: swa_fast.lerp_(avg16, model, WEIGHT, backend=b)
        steps = iter(range(1 << 62))
        rounding = StochasticRounding(seed=1).tensor(model)  # laid out as a manager's: one tensor

        def stochastic(b=b, steps=steps, rounding=rounding):
            rounding[1] = next(steps)
            swa_fast.lerp_(avg16, model, WEIGHT, rounding=rounding, backend=b)

        out[f"swa_fast:{b}"] = stochastic
        stats = stats_tensor(1, avg16[0].device)

        def fp32_with_stats(b=b, stats=stats):
            stats.zero_()
            swa_fast.lerp_(avg32, model, WEIGHT, stats=stats, backend=b)

        def nearest_with_stats(b=b, stats=stats):  # (what a manager's stalled-average warning reads)
            stats.zero_()
            swa_fast.lerp_(avg16, model, WEIGHT, stats=stats, backend=b)

        def stochastic_with_stats(b=b, steps=steps, rounding=rounding, stats=stats):
            stats.zero_()
            rounding[1] = next(steps)
            swa_fast.lerp_(avg16, model, WEIGHT, rounding=rounding, stats=stats, backend=b)

        out[f"{WITH_STATS} {FP32_AVERAGE} swa_fast:{b}"] = fp32_with_stats
        out[f"{WITH_STATS} {NEAREST} swa_fast:{b}"] = nearest_with_stats
        out[f"{WITH_STATS} swa_fast:{b}"] = stochastic_with_stats
    return out


def bench_low_precision(shapes, name, device, min_run_time):
    """Rows from _candidates (the first backend's fp32 average first: the baseline of x_vs_naive);
    each stochastic row has x_vs_fp32_average, its speed-up over its backend's fp32 average, and
    of_copy_bw, against a copy of its own 6 bytes an element."""
    # (the foreach backend draws its bits with PyTorch integer ops, a fallback too slow to time here)
    backends = [b for b in swa_fast.ops.usable_backends(device, interpreted=False) if b != "foreach"]
    model = [torch.randn(s, device=device).bfloat16() for s in shapes]
    avg32 = [m.float() for m in model]
    avg16 = [m.clone() for m in model]
    n = numel(shapes)
    labels = {"workload": workload_name(name), "params": "bfloat16", "tensors": len(shapes), "elements": n}
    rows = time_methods(_candidates(model, avg32, avg16, backends), labels, 6 * n, device, min_run_time)
    add_ratios(rows, "x_vs_fp32_average", FP32_AVERAGE)
    add_ratios(rows, "stats_cost", WITH_STATS)  # the time with stats over the time without
    return rows


def main(argv=None):
    from swa_fast.benchmarks.report import print_table
    from swa_fast.benchmarks.standalone import standalone_args

    args, device = standalone_args(__doc__, argv)
    rows = bench_low_precision(SHAPE_SETS[args.set](), args.set, device, args.min_run_time)
    print_table(rows)
    for r in rows:
        if "x_vs_fp32_average" in r:
            ratio, share = r["x_vs_fp32_average"], r["of_copy_bw"]
            print(f"{r['method']:<16} {ratio:.2f}x the fp32 average, {share:.2f} of copy bandwidth")
        if "stats_cost" in r:
            print(f"{r['method']:<40} stats=True takes {r['stats_cost']:.2f}x the time")


if __name__ == "__main__":
    main()
