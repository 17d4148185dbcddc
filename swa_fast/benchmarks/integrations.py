"""The integrations: each original library's EMA update against swa_fast.integrations' drop-in, on
the same model in the same run (the original first, so `x_vs_naive` is the speed-up over it).

    python -m swa_fast.benchmarks.integrations --min-run-time 0.2   # alone; `swa_fast bench` runs it too

Each library has a function here, listed in LIBRARIES, taking (model, device) and giving
name -> one update: the original's, then ours, with the library's default settings where they
decide the update (timm: foreach; diffusers: foreach=False, its default, and foreach=True;
ema-pytorch: its loop and use_foreach=True; Lightning: the SWA callback's update_parameters and
the update of the AveragedModel that EMAWeightAveraging builds).
A library that is not installed is left out, with a note.
"""

from __future__ import annotations

import argparse
from copy import deepcopy
from functools import partial

import torch

from swa_fast.benchmarks.shapes import SHAPE_SETS, numel
from swa_fast.benchmarks.timing import COPY, time_methods
from swa_fast.benchmarks.workloads import ShapeModel

DECAY = 0.9998
STEP = 1000  # past every warmup: the decay a long run spends its time at


def timm_updates(model, device):
    from timm.utils import ModelEmaV3 as TimmModelEmaV3

    from swa_fast.integrations.timm import ModelEmaV3

    theirs, ours = TimmModelEmaV3(model, decay=DECAY), ModelEmaV3(model, decay=DECAY)
    return {
        "timm ModelEmaV3": lambda: theirs.update(model, step=STEP),
        "swa_fast ModelEmaV3": lambda: ours.update(model, step=STEP),
    }


def diffusers_updates(model, device):
    from diffusers.training_utils import EMAModel as DiffusersEMAModel

    from swa_fast.integrations.diffusers import EMAModel

    theirs = DiffusersEMAModel(model.parameters(), decay=DECAY)
    theirs_foreach = DiffusersEMAModel(model.parameters(), decay=DECAY, foreach=True)
    ours = EMAModel(model.parameters(), decay=DECAY)
    return {
        "diffusers EMAModel": lambda: theirs.step(model.parameters()),
        "diffusers EMAModel foreach": lambda: theirs_foreach.step(model.parameters()),
        "swa_fast EMAModel": lambda: ours.step(model.parameters()),
    }


def torch_ema_updates(model, device):
    import torch_ema

    from swa_fast.integrations.torch_ema import ExponentialMovingAverage

    theirs = torch_ema.ExponentialMovingAverage(model.parameters(), decay=DECAY)
    ours = ExponentialMovingAverage(model.parameters(), decay=DECAY)
    return {
        "torch_ema ExponentialMovingAverage": lambda: theirs.update(),
        "swa_fast ExponentialMovingAverage": lambda: ours.update(),
    }


def ema_pytorch_updates(model, device):
    from ema_pytorch import EMA as TheirEMA

    from swa_fast.integrations.ema_pytorch import EMA

    settings = dict(beta=DECAY, update_after_step=0, update_every=1)  # every update averages
    emas = {
        "ema_pytorch EMA": TheirEMA(model, **settings),
        "ema_pytorch EMA use_foreach": TheirEMA(model, use_foreach=True, **settings),
        "swa_fast EMA": EMA(model, **settings),
    }
    for ema in emas.values():
        ema.update()  # the first update copies the model
    return {name: ema.update for name, ema in emas.items()}


def _lightning_module(model, device):
    """A LightningModule holding `model` (its tensors shared, not copied), as the callbacks take."""
    from lightning.pytorch import LightningModule

    module = LightningModule()
    module.model = model
    return module.to(device)


def lightning_swa_updates(model, device):
    """The SWA callback's static update, the average kept on the model's device (Lightning's
    default `device="cpu"` would time the copies to the CPU on a GPU)."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging as Theirs

    from swa_fast.integrations.lightning import StochasticWeightAveraging as Ours

    module, updates = _lightning_module(model, device), {}
    for label, callback in (("Lightning", Theirs), ("swa_fast", Ours)):
        average, n_averaged = deepcopy(module), torch.tensor(0, device=device)
        update = partial(callback.update_parameters, average, module, n_averaged, callback.avg_fn)
        update()  # the first update copies the model
        updates[f"{label} StochasticWeightAveraging"] = update
    return updates


def lightning_ema_updates(model, device):
    """The update of the AveragedModel that EMAWeightAveraging's setup builds."""
    from lightning.pytorch.callbacks import EMAWeightAveraging as Theirs

    from swa_fast.integrations.lightning import EMAWeightAveraging as Ours

    module, updates = _lightning_module(model, device), {}
    for label, callback in (("Lightning", Theirs(decay=DECAY)), ("swa_fast", Ours(decay=DECAY))):
        callback.setup(None, module, "fit")
        callback._average_model.update_parameters(module)  # the first update copies the model
        updates[f"{label} EMAWeightAveraging"] = partial(callback._average_model.update_parameters, module)
    return updates


LIBRARIES = {
    "timm": timm_updates,
    "diffusers": diffusers_updates,
    "torch_ema": torch_ema_updates,
    "ema_pytorch": ema_pytorch_updates,
    "lightning_swa": lightning_swa_updates,
    "lightning_ema": lightning_ema_updates,
}


def bench_integrations(sets, device, min_run_time, dtype=torch.float32, libraries=None):
    """Rows for every library of LIBRARIES (or `libraries`) on each shape set, a model in `dtype`
    (its average in the same dtype): the original's update, then ours, timed in turns."""
    rows = []
    for name in sets:
        shapes = SHAPE_SETS[name]()
        model = ShapeModel(shapes, dtype, device)
        n = numel(shapes)
        moved = n * 3 * torch.finfo(dtype).bits // 8  # read the average and the model, write the average
        for library in libraries or LIBRARIES:
            try:
                candidates = LIBRARIES[library](model, device)
            except ImportError as e:
                print(f"{library} is not installed ({e}): its rows are left out")
                continue
            dtype_name = f"{dtype}".replace("torch.", "")
            labels = {
                "workload": f"{library} {name}",
                "params": dtype_name,
                "tensors": len(shapes),
                "elements": n,
            }
            rows += time_methods(candidates, labels, moved, device, min_run_time)
            del candidates  # each original keeps its own copy of the model: one library at a time
    return rows


def speedups(rows) -> list[str]:
    """One line per workload: each method's time and its speed-up over the original (the first)."""
    lines, by_workload = [], {}
    for r in rows:
        if r["method"] != COPY:
            by_workload.setdefault((r["workload"], r["params"]), []).append(r)
    for (workload, params), group in by_workload.items():
        base = group[0]["median_ms"]
        parts = [f"{r['method']} {r['median_ms']:.3g} ms ({base / r['median_ms']:.2f}x)" for r in group]
        lines.append(f"{workload} [{params}]: " + "; ".join(parts))
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sets", nargs="*", choices=list(SHAPE_SETS), default=["gpt2-small", "tiny-1000"])
    p.add_argument("--libraries", nargs="*", choices=list(LIBRARIES))
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the model's dtype")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rows = bench_integrations(args.sets, device, args.min_run_time, dtype, args.libraries)
    print(f"on {device} ({torch.get_num_threads()} threads)")
    print("\n".join(speedups(rows)))


if __name__ == "__main__":
    main()
