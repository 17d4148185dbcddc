"""Benchmark suite: one averaging update done several ways, in one process, on the same tensors.

    python -m swa_fast bench              quick profile (what `make bench` runs)
    python -m swa_fast bench --full       every shape set, op and size

Methods, for the SWA update avg += w (param - avg) over a real model's parameter shapes:
  naive          swa_fast.ops.reference: one Python iteration and a few torch ops per parameter
  AveragedModel  torch.optim.swa_utils.AveragedModel.update_parameters (what users run today)
  foreach_lerp   torch._foreach_lerp_ over the same lists
  swa_fast AveragedModel  swa_fast.swa_utils.AveragedModel.update_parameters (the drop-in)
  swa_fast:<b>   swa_fast.lerp_ forced to backend <b>, for every backend that runs here

Figures: median time (torch.utils.benchmark.Timer on the CPU, CUDA events on a GPU; the methods
take turns over several rounds so that a drift of the machine hits them all alike), GB/s of the
bytes the update must move, that as a fraction of the copy bandwidth measured in the same run (the
faster of an out-of-place and an in-place copy of 256 MiB: the physical limit), and speed-ups
against naive and AveragedModel. Writes a table to the terminal, JSON with the machine's metadata
and two PNG plots (bandwidth per method, and against size).
"""

# The pieces, one purpose each: timing.py (how a method is timed and its figures computed),
# workloads.py (what is timed), targets.py (the speed targets a run is checked against) and
# report.py (table, JSON, plots). This file only wires them to the command line
# (`python -m swa_fast bench` calls `main`).

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from swa_fast.benchmarks.integrations import bench_integrations
from swa_fast.benchmarks.multi_lerp import bench_multi_lerp
from swa_fast.benchmarks.posthoc import bench_posthoc
from swa_fast.benchmarks.report import metadata, plot, plot_sweep, print_table, write_json
from swa_fast.benchmarks.shapes import SHAPE_SETS
from swa_fast.benchmarks.targets import check_targets, print_targets
from swa_fast.benchmarks.timing import copy_bandwidth
from swa_fast.benchmarks.workloads import (
    bench_moments_and_snapshots,
    bench_set,
    bench_sweep,
    bench_tiny_model,
    print_one_update,
)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="every shape set and dtype, longer timing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sets", nargs="*", choices=list(SHAPE_SETS), help="shape sets to run")
    p.add_argument("--out", default="bench_results", help="folder for results.json and the plots")
    p.add_argument("--min-run-time", type=float, help="seconds of timing per method and workload")
    return p.parse_args(argv)


def sweep_sizes(full, device):
    top = 9 if device.type == "cuda" else 8
    return [10**k for k in range(4, top + 1)] if full else [10**k for k in range(4, 8)]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    min_run_time = args.min_run_time or (2.0 if args.full else 0.5)
    sets = args.sets or (list(SHAPE_SETS) if args.full else ["gpt2-small", "tiny-1000"])
    bandwidth = copy_bandwidth(device, min_run_time)
    print(
        f"swa_fast benchmark on {device} ({torch.get_num_threads()} threads); "
        f"copy bandwidth {bandwidth / 1e9:.2f} GB/s\n"
    )
    rows = []
    for name in sets:
        for dtype in (torch.float32, torch.bfloat16):
            rows += bench_set(name, SHAPE_SETS[name](), dtype, device, min_run_time, bandwidth)
    print_table(rows)
    sweep = bench_sweep(sweep_sizes(args.full, device), device, min_run_time, bandwidth)
    extras = bench_moments_and_snapshots(SHAPE_SETS[sets[0]](), sets[0], device, min_run_time, bandwidth)
    extras += bench_tiny_model(device, min_run_time, bandwidth)
    extras += bench_integrations(sets, device, min_run_time, bandwidth)  # each library's EMA against ours
    extras += bench_multi_lerp(SHAPE_SETS[sets[0]](), sets[0], device, min_run_time, bandwidth)
    extras += bench_posthoc(SHAPE_SETS[sets[0]](), sets[0], device, min_run_time, bandwidth)
    print()
    print_table(sweep + extras)
    print_one_update(extras)
    targets = check_targets(rows + sweep + extras, device)
    print_targets(targets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", metadata(device, bandwidth), rows + sweep + extras, targets)
    plot(rows, out / "lerp_bandwidth.png")
    plot_sweep(sweep, bandwidth, out / "lerp_sweep.png")


if __name__ == "__main__":
    main()
