"""What the benchmark times: the SWA/EMA update over a shape set done each way, a sweep of one
tensor's size, the fixed cost of one update through each API on a tiny model, and SWAG's moments
and FGE's snapshots. Each returns rows of figures (see timing.time_methods)."""

from __future__ import annotations

import copy

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import swa_fast
from swa_fast import swa_utils as fast_swa
from swa_fast.benchmarks.shapes import numel
from swa_fast.benchmarks.timing import (
    COPY,
    copy_candidates,
    fastest_blocks,
    figures,
    merge_copies,
    time_methods,
)
from swa_fast.ops import reference


class ShapeModel(torch.nn.Module):
    """A module whose parameters have the given shapes (what AveragedModel needs)."""

    def __init__(self, shapes, dtype, device):
        super().__init__()
        self.params = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(s, dtype=dtype, device=device)) for s in shapes
        )


def per_backend(device, op, *args):
    """'swa_fast:<b>' -> `op(*args)` forced to backend b, for every backend that runs on `device`
    (Triton under its interpreter is left out: it is right but no measure of speed)."""
    backends = swa_fast.ops.usable_backends(device, interpreted=False)
    return {f"swa_fast:{b}": lambda b=b: op(*args, backend=b) for b in backends}


def methods(avg, params, model, device, kind):
    """name -> zero-argument callable doing one update of `avg` toward `params`."""
    weight = torch.tensor(0.1, device=device)
    out = {"naive": lambda: reference.lerp_(avg, params, weight)}
    if kind == "ema":
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    else:
        averaged = AveragedModel(model)
    averaged.update_parameters(model)  # the first call only copies; time the averaging ones
    out["AveragedModel"] = lambda: averaged.update_parameters(model)
    # the drop-in: same call, fp32 average (dtype=) also for a bf16 model
    ours = fast_swa.AveragedModel(model, dtype=torch.float32)
    ours.update_parameters(model)
    out["swa_fast AveragedModel"] = lambda: ours.update_parameters(model)
    if all(a.dtype == p.dtype for a, p in zip(avg, params)):
        out["foreach_lerp"] = lambda: torch._foreach_lerp_(avg, params, 0.1)
    else:  # what a user has to do today for a bf16 model and an fp32 average: cast, then update
        out["cast+foreach_lerp"] = lambda: torch._foreach_lerp_(avg, [p.float() for p in params], 0.1)
    out.update(per_backend(device, swa_fast.lerp_, avg, params, weight))
    return out


def bench_set(name, shapes, param_dtype, device, min_run_time, kind="swa"):
    model = ShapeModel(shapes, param_dtype, device)
    params = [p.detach() for p in model.parameters()]
    avg = [torch.randn(s, device=device) for s in shapes]
    n = numel(shapes)
    moved = n * (2 * 4 + torch.finfo(param_dtype).bits // 8)  # read avg and param, write avg
    candidates = methods(avg, params, model, device, kind)
    dtype_name = f"{param_dtype}".replace("torch.", "")
    labels = {"workload": name, "params": dtype_name, "tensors": len(shapes), "elements": n}
    return time_methods(candidates, labels, moved, device, min_run_time)


def bench_sweep(sizes, device, min_run_time):
    """One fp32 tensor of each size: where the update becomes bandwidth-bound."""
    rows = []
    for n in sizes:
        avg, src = [torch.randn(n, device=device)], [torch.randn(n, device=device)]
        weight = torch.tensor(0.1, device=device)
        candidates = {
            "naive": lambda a=avg, s=src, w=weight: reference.lerp_(a, s, w),
            "foreach_lerp": lambda a=avg, s=src: torch._foreach_lerp_(a, s, 0.1),
            **per_backend(device, swa_fast.lerp_, avg, src, weight),
        }
        labels = {"workload": f"sweep {n:.0e}", "params": "float32", "tensors": 1, "elements": n}
        rows += time_methods(candidates, labels, 12 * n, device, min_run_time)
    return rows


def one_update_models():
    """The models of the "one update" section, by workload name: small enough that what an API adds
    to the op shows (the arithmetic of the first is negligible)."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Linear(64, 10)]
    encoder_layer = torch.nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True)
    conv_bn = [
        m for _ in range(20) for m in (torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16))
    ]
    return {
        "one update: tiny MLP with BatchNorm": lambda: torch.nn.Sequential(*layers),
        # biases, norms: a many-layer model's small tensors, each module holding two
        "one update: 500 modules, 1,000 tensors": lambda: torch.nn.ModuleList(
            torch.nn.LayerNorm(64 + (i * 37) % 448) for i in range(500)
        ),
        # the engine's target: 1,000 tiny tensors against one tensor of the same bytes (FLOOR)
        "one update: 500 Linear(100, 10)": lambda: torch.nn.Sequential(
            *(torch.nn.Linear(100, 10) for _ in range(500))
        ),
        "one update: 12 encoder layers, d=64": lambda: torch.nn.TransformerEncoder(
            encoder_layer, 12, enable_nested_tensor=False
        ),
        # a CNN's buffers: 60 (two floating, one num_batches_tracked per BatchNorm), copied at each
        # update by the drop-ins as by torch's (no target: it shows what the copies cost)
        "one update: 20 conv + BatchNorm layers": lambda: torch.nn.Sequential(*conv_bn),
    }


BARE_OP = "swa_fast.lerp_"
FLOOR = "swa_fast.lerp_ over one tensor of the same size"  # the same bytes, no per-tensor work


def bench_tiny_model(device, min_run_time):
    """The fixed cost of one update through each API, on the models of `one_update_models`, one
    thread (what an API adds is host work; the op's threads would only shrink the op): the bare
    fused op on the model's parameters, torch's foreach, torch's AveragedModel, our drop-in with
    `multi_avg_fn` and with the `avg_fn` factory (what Lightning passes), and the managers, taking
    turns block by block (`fastest_blocks`). Each row's `best_ms` is its fastest block's time per
    call and `x_bare_op` that over the bare op's, from the same run (`median_ms`: the blocks' median)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for name, build in one_update_models().items():
            rows += _one_update(name, build().to(device), device, min_run_time)
        return rows
    finally:
        torch.set_num_threads(threads)


def _one_update(name, model, device, min_run_time):
    params = [p.detach() for p in model.parameters()]
    avg = [p.clone() for p in params]
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    multi = fast_swa.AveragedModel(model, multi_avg_fn=fast_swa.get_ema_multi_avg_fn(0.999))
    single = fast_swa.AveragedModel(model, avg_fn=fast_swa.get_ema_avg_fn(0.999))
    swa, ema = swa_fast.SWA(model), swa_fast.EMA(model, decay=0.999)
    buffers = list(model.buffers())
    buffer_copies = [b.clone() for b in buffers]
    candidates = {
        BARE_OP: lambda: swa_fast.lerp_(avg, params, 0.1),
        "foreach_lerp": lambda: torch._foreach_lerp_(avg, params, 0.1),
        "AveragedModel": lambda: theirs.update_parameters(model),
        "swa_fast AveragedModel multi_avg_fn": lambda: multi.update_parameters(model),
        "swa_fast AveragedModel avg_fn": lambda: single.update_parameters(model),
        "swa_fast.SWA.update": lambda: swa.update(model),
        "swa_fast.EMA.update": lambda: ema.update(model),
    }
    if len(params) >= 1000:  # the floor of an update of many small tensors
        whole, whole_avg = torch.cat([p.reshape(-1) for p in params]), torch.cat([a.reshape(-1) for a in avg])
        candidates[FLOOR] = lambda: swa_fast.lerp_([whole_avg], [whole], 0.1)
    if buffers:  # what the drop-ins must also do, as torch's: copy the model's buffers (bare, for scale)
        candidates[BARE_OP + " + buffer copy"] = lambda: (
            swa_fast.lerp_(avg, params, 0.1),
            torch._foreach_copy_(buffer_copies, buffers),
        )
    n = sum(p.numel() for p in params)
    candidates.update(copy_candidates(12 * n, device))  # the copy of the same bytes, in the same turns
    for update in candidates.values():  # the first call of each only copies
        update()
    labels = {"workload": name, "params": "float32", "tensors": len(params), "elements": n}
    timed = fastest_blocks(candidates, device, min_run_time)
    medians = {method: median for method, (_, median) in timed.items()}
    timed[COPY] = timed[min((m for m in timed if m.startswith(COPY)), key=medians.__getitem__)]
    merge_copies(medians, candidates)  # (the same one: the faster median)
    rows = figures(candidates, medians, labels, 12 * n, device)
    for r in rows:  # the multiples from the fastest blocks: a fixed cost, without the VM's noise
        r["best_ms"] = timed[r["method"]][0] * 1e3
        r["x_bare_op"] = timed[r["method"]][0] / timed[BARE_OP][0]
    return rows


def print_one_update(rows):
    """Per model of the "one update" section: each API's time per call (its fastest block) and its
    ratio to the bare op's."""
    rows = [r for r in rows if "x_bare_op" in r]
    for workload in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == workload]
        print(f"\n{workload} ({mine[0]['tensors']} tensors, {mine[0]['elements']:,} elements, 1 thread)")
        for r in mine:
            per_call = f"{r['best_ms'] * 1e3:10.1f} us per call"
            print(f"  {r['method']:<38} {per_call}  {r['x_bare_op']:6.2f}x the bare op")


def bench_moments_and_snapshots(shapes, name, device, min_run_time):
    """SWAG's two moments (one fused pass vs two foreach passes) and an FGE snapshot saved and
    loaded (one fused copy vs state_dict deepcopy / load_state_dict), fp32."""
    model = ShapeModel(shapes, torch.float32, device)
    params = [p.detach() for p in model.parameters()]
    mean = [torch.randn(s, device=device) for s in shapes]
    sq = [torch.rand(s, device=device) for s in shapes]
    weight = torch.tensor(0.1, device=device)
    n = numel(shapes)

    def two_foreach_passes():
        torch._foreach_lerp_(mean, params, 0.1)
        torch._foreach_lerp_(sq, torch._foreach_mul(params, params), 0.1)

    moments = {
        "naive": lambda: reference.moments_(mean, sq, params, weight),
        "foreach x2": two_foreach_passes,
        **per_backend(device, swa_fast.moments_, mean, sq, params, weight),
    }

    def labels(what):
        return {"workload": f"{name} {what}", "params": "float32", "tensors": len(shapes), "elements": n}

    rows = time_methods(moments, labels("SWAG moments"), 20 * n, device, min_run_time)

    snapshot = swa_fast.FlatBuffer(params)
    saved = copy.deepcopy(model.state_dict())
    save = {
        "state_dict deepcopy": lambda: copy.deepcopy(model.state_dict()),
        "swa_fast.copy_": lambda: swa_fast.copy_(snapshot.views, params),
    }
    rows += time_methods(save, labels("FGE save"), 8 * n, device, min_run_time)
    load = {
        "load_state_dict": lambda: model.load_state_dict(saved),
        "swa_fast.copy_": lambda: swa_fast.copy_(params, snapshot.views),
    }
    rows += time_methods(load, labels("FGE load"), 8 * n, device, min_run_time)
    return rows
