"""BEMA: one update of swa_fast.BEMA (one fused `bema_` pass over the model, the EMA and theta_0,
writing the EMA and the BEMA weights) against the update of TRL's `BEMACallback`
(`_update_bema_weights`: per parameter, a copy to its device, the EMA's `mul_` and `add_`, then the
BEMA weights through three temporaries and a `copy_` into its running model), on the same model in
the same run, fp32, everything on the model's device (TRL's default `device="cpu"` would time its
per-parameter copies to the host on a GPU).

    python -m swa_fast.benchmarks.bema --min-run-time 0.2     # alone; `swa_fast bench` runs it too
"""

from __future__ import annotations

from copy import deepcopy

import torch

import swa_fast
from swa_fast.benchmarks.shapes import SHAPE_SETS, numel
from swa_fast.benchmarks.targets import BEMA_BASELINE, BEMA_METHOD
from swa_fast.benchmarks.timing import time_methods
from swa_fast.benchmarks.workloads import ShapeModel

STEP = 1000  # the step whose weights every timed update uses (past any warm-up)
THEIRS, OURS = BEMA_BASELINE, BEMA_METHOD  # the targets' names of the two rows


def trl_update(model, device):
    """TRL's callback as its `on_train_begin` sets it up (theta_0 and the EMA cloned from the
    parameters onto `device`, a running model holding a copy of them), with the running model a
    deep copy (a ShapeModel has no config to build one from): its update at STEP."""
    from trl import BEMACallback

    callback = BEMACallback(update_freq=1, device=str(device))
    callback.running_model = deepcopy(model)
    for name, p in model.named_parameters():
        callback.param_names.append(name)
        callback.thetat_params.append(p)
        callback.theta0_params.append(p.detach().clone().to(device))
        callback.ema_params.append(callback.theta0_params[-1].clone())

    def update():
        with torch.no_grad():  # (TRL's on_step_end enters it for its update)
            callback._update_bema_weights(STEP)

    return update


def bench_bema(shapes, name, device, min_run_time):
    """One BEMA update, TRL's (when installed) then ours, timed in turns."""
    model = ShapeModel(shapes, torch.float32, device)
    candidates = {}
    try:
        candidates[THEIRS] = trl_update(model, device)
    except ImportError as e:
        print(f"trl is not installed ({e}): its BEMACallback row is left out")
    ours = swa_fast.BEMA(model)
    candidates[OURS] = lambda: ours.update(model, step=STEP)
    n = numel(shapes)
    labels = {"workload": f"{name} BEMA update", "params": "float32", "tensors": len(shapes), "elements": n}
    moved = n * 5 * 4  # read the model, the EMA and theta_0, write the EMA and the BEMA weights
    return time_methods(candidates, labels, moved, device, min_run_time)


def main(argv=None):
    from swa_fast.benchmarks.report import print_table
    from swa_fast.benchmarks.standalone import standalone_args

    args, device = standalone_args(__doc__, argv)
    print(f"BEMA update on {device} ({torch.get_num_threads()} threads)")
    rows = bench_bema(SHAPE_SETS[args.set](), args.set, device, args.min_run_time)
    print_table(rows)
    ours = next((r for r in rows if r["method"] == OURS), None)
    if ours is not None and any(r["method"] == THEIRS for r in rows):
        print(f"{OURS}: {ours['x_vs_naive']:.2f}x {THEIRS}")


if __name__ == "__main__":
    main()
