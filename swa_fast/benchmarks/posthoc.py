"""Post-hoc EMA: swa_fast.PostHocEMA's update against ema-pytorch's PostHocEMA update (both tracking
sigma_rel 0.05 and 0.10, fp32) on the same model in the same run, and what a snapshot costs the
training step: an update with a snapshot due (the host copy, then the write handed to the
background thread) against one without, and the background write itself, for fp16 and bf16
snapshots.

    python -m swa_fast.benchmarks.posthoc --min-run-time 0.2   # alone; `swa_fast bench` runs it too
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

import swa_fast
from swa_fast.benchmarks.shapes import SHAPE_SETS, numel
from swa_fast.benchmarks.timing import time_methods
from swa_fast.benchmarks.workloads import ShapeModel

SIGMA_RELS = (0.05, 0.10)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_posthoc_update(shapes, name, device, min_run_time):
    """One update of both tracked averages: ours (one multi_lerp_ per group) and ema-pytorch's
    (a KarrasEMA per sigma_rel, each a Python loop of lerp_ over the tensors)."""
    model = ShapeModel(shapes, torch.float32, device)
    ours = swa_fast.PostHocEMA(model, SIGMA_RELS)
    candidates = {}
    try:
        from ema_pytorch import PostHocEMA as TheirPostHocEMA
    except ImportError:
        print("ema-pytorch is not installed: its PostHocEMA row is left out")
    else:
        theirs = TheirPostHocEMA(
            model, sigma_rels=SIGMA_RELS, update_every=1, checkpoint_every_num_steps="manual"
        )
        candidates["ema_pytorch PostHocEMA.update"] = theirs.update
    candidates["swa_fast PostHocEMA.update"] = lambda: ours.update(model)
    for update in candidates.values():  # the first update of each only copies
        update()
    n = numel(shapes)
    labels = {
        "workload": f"{name} post-hoc EMA, K=2",
        "params": "float32",
        "tensors": len(shapes),
        "elements": n,
    }
    moved = n * (2 * len(SIGMA_RELS) * 4 + 4)  # read and write each average, read the model once
    return time_methods(candidates, labels, moved, device, min_run_time)


def bench_snapshot_cost(shapes, name, device, dtypes=(torch.float16, torch.bfloat16), repeats=5):
    """The training thread's time for an update with a snapshot due and for one without (each
    after the previous write finished), and the background write of one snapshot, per snapshot
    dtype."""
    model = ShapeModel(shapes, torch.float32, device)
    rows = []
    for dtype in dtypes:
        kind = str(dtype).replace("torch.", "")
        times = {
            "update, no snapshot due": [],
            f"update + {kind} snapshot due": [],
            f"{kind} snapshot write": [],
        }
        due, write = list(times)[1:]
        with tempfile.TemporaryDirectory(prefix="swa_fast_posthoc_bench_") as directory:
            ema = swa_fast.PostHocEMA(
                model, SIGMA_RELS, snapshot_every=2, snapshot_dir=directory, snapshot_dtype=dtype
            )
            ema.update(model)  # a copy: not timed
            for _ in range(repeats + 1):  # the first round warms the host buffer and the writer up
                for key in (due, "update, no snapshot due"):  # every second update is due a snapshot
                    ema.flush()
                    _synchronize(device)
                    start = time.perf_counter()
                    ema.update(model)
                    _synchronize(device)
                    times[key].append(time.perf_counter() - start)
                    if key == due:
                        ema.flush()  # the background write, timed from when the update returned
                        times[write].append(time.perf_counter() - start - times[key][-1])
                for path in swa_fast.posthoc.list_snapshots(directory).values():
                    path.unlink()
        n = numel(shapes)
        labels = {"workload": f"{name} post-hoc EMA snapshot", "params": "float32", "tensors": len(shapes)}
        medians = {key: statistics.median(samples[1:]) * 1e3 for key, samples in times.items()}
        base = medians["update, no snapshot due"]  # ratios against the first method, as time_methods
        rows += [
            {**labels, "elements": n, "method": key, "median_ms": ms, "x_vs_naive": base / ms}
            for key, ms in medians.items()
        ]
    return rows


def bench_posthoc(shapes, name, device, min_run_time):
    # Each timed snapshot waits for a write to disk: fewer of them for short timings (the tests').
    repeats = max(1, min(5, round(min_run_time * 25)))
    return bench_posthoc_update(shapes, name, device, min_run_time) + bench_snapshot_cost(
        shapes, name, device, repeats=repeats
    )


def main(argv=None):
    from swa_fast.benchmarks.report import print_table
    from swa_fast.benchmarks.standalone import standalone_args

    args, device = standalone_args(__doc__, argv)
    print(f"post-hoc EMA on {device} ({torch.get_num_threads()} threads)")
    print_table(bench_posthoc(SHAPE_SETS[args.set](), args.set, device, args.min_run_time))


if __name__ == "__main__":
    main()
