"""Benchmark suite: one averaging update done several ways, in one process, on the same tensors.

    python -m swa_fast bench              quick profile (what `make bench` runs)
    python -m swa_fast bench --full       every shape set, op and size

Methods, for the SWA update avg += w (param - avg) over a real model's parameter shapes:
  naive          swa_fast.ops.reference: one Python iteration and a few torch ops per parameter
  AveragedModel  torch.optim.swa_utils.AveragedModel.update_parameters (what users run today)
  foreach_lerp   torch._foreach_lerp_ over the same lists
  swa_fast AveragedModel  swa_fast.swa_utils.AveragedModel.update_parameters (the drop-in)
  swa_fast:<b>   swa_fast.lerp_ forced to backend <b>, for every backend that runs here

Figures: median time (blocks of calls on the CPU, CUDA events on a GPU), GB/s of the bytes the
update must move, that as a fraction of a plain copy of the same bytes (`copy (same bytes)`: the
faster of an in-place and an out-of-place copy, timed in the same rounds as the methods, so that a
drift of the machine hits them alike: the most a streaming update can reach), and speed-ups against
naive and AveragedModel. Progress goes to stderr, one line per step. Writes a table to the terminal,
the targets (each met or MISSED), a summary, JSON with the machine's metadata and two PNG plots
(bandwidth per method, and against size). Exits with status 1 when a target is missed, unless
--allow-missed; refuses (status 2) to time the fallbacks when the compiled extension did not load,
unless --allow-fallback.
"""

# The pieces, one purpose each: timing.py (how a method is timed and its figures computed),
# workloads.py (what is timed), targets.py (the speed targets a run is checked against) and
# report.py (table, JSON, plots). This file only wires them to the command line
# (`python -m swa_fast bench` calls `main`).

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

from swa_fast import ops
from swa_fast.benchmarks.bema import bench_bema
from swa_fast.benchmarks.deepspeed import bench_deepspeed
from swa_fast.benchmarks.integrations import LIBRARIES, bench_integrations
from swa_fast.benchmarks.low_precision import bench_low_precision
from swa_fast.benchmarks.merge import bench_merge_suite, print_merge
from swa_fast.benchmarks.multi_lerp import bench_multi_lerp
from swa_fast.benchmarks.posthoc import bench_posthoc
from swa_fast.benchmarks.report import (
    Progress,
    duration,
    metadata,
    plot,
    plot_sweep,
    print_summary,
    print_table,
    write_json,
)
from swa_fast.benchmarks.shapes import SHAPE_SETS
from swa_fast.benchmarks.targets import check_targets, print_targets
from swa_fast.benchmarks.timing import copy_bandwidth
from swa_fast.benchmarks.transformers_trainer import bench_trainer_step, print_trainer_overhead
from swa_fast.benchmarks.workloads import (
    bench_moments_and_snapshots,
    bench_set,
    bench_sweep,
    bench_tiny_model,
    print_one_update,
)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m swa_fast bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--full", action="store_true", help="every shape set and dtype, longer timing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to time")
    p.add_argument("--sets", nargs="*", choices=list(SHAPE_SETS), help="shape sets to run")
    p.add_argument("--out", default="bench_results", help="folder for results.json and the plots")
    p.add_argument("--min-run-time", type=float, help="seconds of timing per method and workload")
    p.add_argument(
        "--allow-missed", action="store_true", help="exit with status 0 even when a target is missed"
    )
    p.add_argument("--mergekit-python", help="an interpreter with mergekit installed: its merge timed too")
    p.add_argument(
        "--allow-fallback",
        action="store_true",
        help="time the Triton / torch._foreach_* fallbacks when the compiled extension did not load",
    )
    return p.parse_args(argv)


def sweep_sizes(full, device):
    top = 9 if device.type == "cuda" else 8
    return [10**k for k in range(4, top + 1)] if full else [10**k for k in range(4, 8)]


def steps(sets, full, device, min_run_time, mergekit_python=None):
    """The suite, as (what it times, which table its rows join, a function giving them) in the order
    they run: one step each long enough to show progress and short enough to show it often."""
    t, first, shapes = min_run_time, sets[0], SHAPE_SETS[sets[0]]()
    merging = partial(bench_merge_suite, shapes, first, device, t, full, mergekit_python)
    out = [
        (
            f"{name}, {str(dtype).replace('torch.', '')} model",
            "updates",
            partial(bench_set, name, SHAPE_SETS[name](), dtype, device, t),
        )
        for name in sets
        for dtype in (torch.float32, torch.bfloat16)
    ]
    out += [
        (f"one tensor of {n:.0e} elements", "sweep", partial(bench_sweep, [n], device, t))
        for n in sweep_sizes(full, device)
    ]
    out += [
        (
            "SWAG moments, FGE snapshots",
            "extras",
            partial(bench_moments_and_snapshots, shapes, first, device, t),
        ),
        ("one update through each API", "extras", partial(bench_tiny_model, device, t)),
    ]
    out += [  # each library's EMA against ours
        (f"integration: {lib}", "extras", partial(bench_integrations, sets, device, t, libraries=[lib]))
        for lib in LIBRARIES
    ]
    out += [
        ("multi_lerp_ K=2", "extras", partial(bench_multi_lerp, shapes, first, device, t)),
        (
            "bf16 average, stochastic rounding",
            "extras",
            partial(bench_low_precision, shapes, first, device, t),
        ),
        ("post-hoc EMA", "extras", partial(bench_posthoc, shapes, first, device, t)),
        ("transformers.Trainer step with EMACallback", "extras", partial(bench_trainer_step, device, t)),
        ("BEMA update", "extras", partial(bench_bema, shapes, first, device, t)),
        # two CPU ranks of its own, whatever the device; left out, said why, without deepspeed
        ("DeepSpeed ZeRO-3 EMA update", "extras", partial(bench_deepspeed, shapes, first, device, t)),
        # checkpoints written to the temporary folder and merged from the page cache, on the CPU
        ("merging checkpoints", "extras", merging),
    ]
    return out


def run_steps(suite) -> dict[str, list]:
    """Runs every step, saying on stderr which one and how far along; rows by table."""
    progress = Progress(len(suite))
    rows = {"updates": [], "sweep": [], "extras": []}
    for label, table, bench in suite:
        progress.step(label)
        rows[table] += bench()
    progress.done()
    return rows


def main(argv=None) -> int:
    """The suite from the command line; the exit status (0, 1: a target missed, 2: no extension)."""
    args = parse_args(argv)
    if ops._C is None and not args.allow_fallback:
        print(
            f"swa_fast bench: {ops.EXTENSION_ERROR} (--allow-fallback times the fallbacks)", file=sys.stderr
        )
        return 2
    started = time.perf_counter()
    device = torch.device(args.device)
    min_run_time = args.min_run_time or (2.0 if args.full else 0.5)
    sets = args.sets or (list(SHAPE_SETS) if args.full else ["gpt2-small", "tiny-1000"])
    bandwidth = copy_bandwidth(device, min_run_time)
    print(
        f"swa_fast benchmark on {device} ({torch.get_num_threads()} threads); streaming copy bandwidth "
        f"{bandwidth / 1e9:.2f} GB/s\n"
    )
    rows = run_steps(steps(sets, args.full, device, min_run_time, args.mergekit_python))
    updates, sweep, extras = rows["updates"], rows["sweep"], rows["extras"]
    print_table(updates)
    print()
    print_table(sweep + extras)
    print_one_update(extras)
    print_trainer_overhead(extras)
    print_merge(extras)
    targets = check_targets(updates + sweep + extras, device)
    print_targets(targets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", metadata(device, bandwidth), updates + sweep + extras, targets)
    plot(updates, out / "lerp_bandwidth.png")
    plot_sweep(sweep, out / "lerp_sweep.png")
    missed = print_summary(targets, out, duration(time.perf_counter() - started), args.allow_missed)
    return 1 if missed and not args.allow_missed else 0


if __name__ == "__main__":
    sys.exit(main())
