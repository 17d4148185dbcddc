"""Benchmark suite: one averaging update done several ways, in one process, on the same tensors.

    python benchmarks/run.py              quick profile (what `make bench` runs)
    python -m swa_fast bench --full       every shape set, op and size

Methods, for the SWA update avg += w (param - avg) over a real model's parameter shapes:
  naive          swa_fast.reference: one Python iteration and a few torch ops per parameter
  AveragedModel  torch.optim.swa_utils.AveragedModel.update_parameters (what users run today)
  foreach_lerp   torch._foreach_lerp_ over the same lists
  swa_fast AveragedModel  swa_fast.swa_utils.AveragedModel.update_parameters (the drop-in)
  swa_fast:<b>   swa_fast.lerp_ forced to backend <b>, for every backend that runs here

Figures: median time (torch.utils.benchmark.Timer on the CPU, CUDA events on a GPU; the methods
take turns over several rounds so that a drift of the machine hits them all alike), GB/s of the
bytes the update must move, that as a fraction of the copy bandwidth measured in the same run (the
faster of an out-of-place and an in-place copy of 256 MiB: the physical limit), and speed-ups
against naive and AveragedModel. Writes a table to the terminal, JSON with the machine's metadata
and a PNG plot.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import swa_fast  # noqa: E402
from benchmarks.shapes import SHAPE_SETS, numel  # noqa: E402
from swa_fast import reference  # noqa: E402
from swa_fast import swa_utils as fast_swa  # noqa: E402

ROUNDS = 3


def median_seconds(fn, device: torch.device, min_run_time: float) -> float:
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize()
        times = []
        deadline = time.perf_counter() + min_run_time
        while len(times) < 5 or time.perf_counter() < deadline:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]
    from torch.utils.benchmark import Timer

    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(device: torch.device, min_run_time: float) -> float:
    """Read + write bytes per second of the faster of two plain copies of 256 MiB: out of place
    (dst.copy_(src)) and in place (x.mul_(1), which writes the lines it has just read, as an
    averaging update does). The most a streaming update can reach on this machine."""
    n = 64 * 1024 * 1024
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    best = min(
        median_seconds(lambda: dst.copy_(src), device, min_run_time),
        median_seconds(lambda: src.mul_(1.0), device, min_run_time),
    )
    return 2 * n * 4 / best


def peak_extra_bytes(fn, device: torch.device) -> int:
    """The most memory one call of `fn` holds at once beyond what existed before it: the caching
    allocator's peak on a GPU; on the CPU, the running sum of the allocations and frees the
    profiler records, in the order they happened."""
    fn()  # warm: first-call caches are not the update's cost
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    for event in events:
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


class ShapeModel(torch.nn.Module):
    """A module whose parameters have the given shapes (what AveragedModel needs)."""

    def __init__(self, shapes, dtype, device):
        super().__init__()
        self.params = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(s, dtype=dtype, device=device)) for s in shapes
        )


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
    for backend in swa_fast_backends(device):
        out[f"swa_fast:{backend}"] = lambda b=backend: swa_fast.lerp_(avg, params, weight, backend=b)
    return out


def bench_set(name, shapes, param_dtype, device, min_run_time, bandwidth, kind="swa"):
    model = ShapeModel(shapes, param_dtype, device)
    params = [p.detach() for p in model.parameters()]
    avg = [torch.randn(s, device=device) for s in shapes]
    n = numel(shapes)
    moved = n * (2 * 4 + torch.finfo(param_dtype).bits // 8)  # read avg and param, write avg
    candidates = methods(avg, params, model, device, kind)
    dtype_name = f"{param_dtype}".replace("torch.", "")
    labels = {"workload": name, "params": dtype_name, "tensors": len(shapes), "elements": n}
    return time_methods(candidates, labels, moved, device, min_run_time, bandwidth)


def time_methods(candidates, labels, moved, device, min_run_time, bandwidth):
    """Rows of figures for `candidates` (name -> callable), which take turns over ROUNDS rounds so
    that a drift of the machine hits them all alike; ratios against the first method (the naive
    baseline) and against torch's AveragedModel when it ran. `labels`: workload, params (dtype),
    tensors, elements; `moved`: the bytes one call must move."""
    samples = {method: [] for method in candidates}
    for _ in range(ROUNDS):
        for method, fn in candidates.items():
            samples[method].append(median_seconds(fn, device, min_run_time / ROUNDS))
    rows = []
    for method, times in samples.items():
        t = sorted(times)[len(times) // 2]
        rows.append(
            {
                **labels,
                "method": method,
                "median_ms": t * 1e3,
                "GB/s": moved / t / 1e9,
                "of_copy_bw": moved / t / bandwidth,
                "peak_extra_MB": peak_extra_bytes(candidates[method], device) / 2**20,
            }
        )
    base = {r["method"]: r["median_ms"] for r in rows}
    baseline = next(iter(base))
    for r in rows:
        r["x_vs_naive"] = base[baseline] / r["median_ms"]
        if "AveragedModel" in base:
            r["x_vs_AveragedModel"] = base["AveragedModel"] / r["median_ms"]
    return rows


def swa_fast_backends(device):
    """The swa_fast backends worth timing on `device` (interpreted Triton is not a speed)."""
    status = swa_fast.backend_status(device)
    return [
        b
        for b in ("cuda", "triton", "cpu", "foreach")
        if status[b] is None and (b != "triton" or device.type == "cuda")
    ]


def bench_sweep(sizes, device, min_run_time, bandwidth):
    """One fp32 tensor of each size: where the update becomes bandwidth-bound."""
    rows = []
    for n in sizes:
        avg, src = [torch.randn(n, device=device)], [torch.randn(n, device=device)]
        weight = torch.tensor(0.1, device=device)
        candidates = {
            "naive": lambda a=avg, s=src, w=weight: reference.lerp_(a, s, w),
            "foreach_lerp": lambda a=avg, s=src: torch._foreach_lerp_(a, s, 0.1),
        }
        for b in swa_fast_backends(device):
            candidates[f"swa_fast:{b}"] = lambda a=avg, s=src, w=weight, b=b: swa_fast.lerp_(
                a, s, w, backend=b
            )
        labels = {"workload": f"sweep {n:.0e}", "params": "float32", "tensors": 1, "elements": n}
        rows += time_methods(candidates, labels, 12 * n, device, min_run_time, bandwidth)
    return rows


def bench_tiny_model(device, min_run_time, bandwidth):
    """The fixed cost of one update through each API: a small MLP with BatchNorm (6 parameters,
    2,890 weights), where the arithmetic is negligible and what is left is per-call overhead."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Linear(64, 10)]
    model = torch.nn.Sequential(*layers).to(device)
    params = [p.detach() for p in model.parameters()]
    avg = [p.clone() for p in params]
    weight = torch.tensor(0.1, device=device)
    theirs = AveragedModel(model)
    ours = fast_swa.AveragedModel(model)
    swa, ema = swa_fast.SWA(model), swa_fast.EMA(model, decay=0.999)
    candidates = {
        "AveragedModel": lambda: theirs.update_parameters(model),
        "swa_fast AveragedModel": lambda: ours.update_parameters(model),
        "swa_fast.SWA.update": lambda: swa.update(model),
        "swa_fast.EMA.update": lambda: ema.update(model),
        "foreach_lerp": lambda: torch._foreach_lerp_(avg, params, 0.1),
        "swa_fast.lerp_": lambda: swa_fast.lerp_(avg, params, weight),
    }
    for update in candidates.values():  # the first call of each only copies
        update()
    n = sum(p.numel() for p in params)
    labels = {"workload": "tiny MLP, one update", "params": "float32", "tensors": len(params), "elements": n}
    return time_methods(candidates, labels, 12 * n, device, min_run_time, bandwidth)


def bench_moments_and_snapshots(shapes, name, device, min_run_time, bandwidth):
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
    }
    for b in swa_fast_backends(device):
        moments[f"swa_fast:{b}"] = lambda b=b: swa_fast.moments_(mean, sq, params, weight, backend=b)

    def labels(what):
        return {"workload": f"{name} {what}", "params": "float32", "tensors": len(shapes), "elements": n}

    rows = time_methods(moments, labels("SWAG moments"), 20 * n, device, min_run_time, bandwidth)

    snapshot = swa_fast.FlatBuffer(params)
    saved = copy.deepcopy(model.state_dict())
    save = {
        "state_dict deepcopy": lambda: copy.deepcopy(model.state_dict()),
        "swa_fast.copy_": lambda: swa_fast.copy_(snapshot.views, params),
    }
    rows += time_methods(save, labels("FGE save"), 8 * n, device, min_run_time, bandwidth)
    load = {
        "load_state_dict": lambda: model.load_state_dict(saved),
        "swa_fast.copy_": lambda: swa_fast.copy_(params, snapshot.views),
    }
    rows += time_methods(load, labels("FGE load"), 8 * n, device, min_run_time, bandwidth)
    return rows


def check_targets(rows, device):
    """The issue's targets for the fp32 SWA update, each as (target, measured figure, met), from
    ratios measured in this run. Only the workloads that ran are checked."""
    best = "swa_fast:cuda" if device.type == "cuda" else "swa_fast:cpu"
    found = {(r["workload"], r["params"], r["method"]): r for r in rows}

    def row(workload, params, method):
        return found.get((workload, params, method))

    checks = []

    def check(target, workload, params, figure, minimum):
        ours = row(workload, params, best)
        if ours is None:
            return
        value = figure(ours)
        if value is not None:
            checks.append((f"{workload} {params}: {target} >= {minimum}", round(value, 2), value >= minimum))

    def versus(method):
        def figure(ours):
            other = row(ours["workload"], ours["params"], method)
            return other["median_ms"] / ours["median_ms"] if other else None

        return figure

    if device.type == "cpu":
        check("fraction of copy bandwidth", "gpt2-small", "float32", lambda r: r["of_copy_bw"], 0.85)
        check("x vs AveragedModel", "gpt2-small", "float32", lambda r: r.get("x_vs_AveragedModel"), 6)
        check("x vs foreach_lerp", "gpt2-small", "float32", versus("foreach_lerp"), 1.0)
        check("x vs AveragedModel", "tiny-1000", "float32", lambda r: r.get("x_vs_AveragedModel"), 100)
        check("x vs foreach_lerp", "tiny-1000", "float32", versus("foreach_lerp"), 5)
        check("fraction of copy bandwidth", "gpt2-small", "bfloat16", lambda r: r["of_copy_bw"], 0.8)
    else:
        for workload in dict.fromkeys(r["workload"] for r in rows):
            check("x vs foreach_lerp", workload, "float32", versus("foreach_lerp"), 1.0)
            if workload.startswith("sweep") and row(workload, "float32", best)["elements"] >= 10**8:
                check("fraction of copy bandwidth", workload, "float32", lambda r: r["of_copy_bw"], 0.85)
    return checks


def print_targets(checks):
    for target, value, met in checks:
        print(f"{'met   ' if met else 'MISSED'} {target}: {value}")


def print_table(rows):
    cols = [
        "workload",
        "params",
        "tensors",
        "method",
        "median_ms",
        "GB/s",
        "of_copy_bw",
        "x_vs_naive",
        "x_vs_AveragedModel",
        "peak_extra_MB",
    ]
    fmt = {
        "peak_extra_MB": "{:.2f}",
        "median_ms": "{:.3f}",
        "GB/s": "{:.2f}",
        "of_copy_bw": "{:.2f}",
        "x_vs_naive": "{:.1f}x",
        "x_vs_AveragedModel": "{:.1f}x",
    }
    cells = [[fmt.get(c, "{}").format(r[c]) if c in r else "-" for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = " | ".join(c.ljust(w) for c, w in zip(cols, widths))
    print(line)
    print("-|-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no plot written to {path})")
        return
    workloads = list(dict.fromkeys(f"{r['workload']} ({r['params']})" for r in rows))
    methods_ = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(methods_)
    for j, m in enumerate(methods_):
        xs, ys = [], []
        for i, w in enumerate(workloads):
            for r in rows:
                if f"{r['workload']} ({r['params']})" == w and r["method"] == m:
                    xs.append(i + j * width)
                    ys.append(r["of_copy_bw"])
        ax.bar(xs, ys, width, label=m)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="copy bandwidth")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))], workloads, fontsize=8)
    ax.set_ylabel("fraction of copy bandwidth (higher is better)")
    ax.set_title("One SWA update: achieved bandwidth per method")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def plot_sweep(rows, bandwidth, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no plot written to {path})")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ax.plot([r["elements"] for r in mine], [r["GB/s"] for r in mine], marker="o", label=method)
    ax.axhline(bandwidth / 1e9, color="black", linestyle="--", linewidth=0.8, label="copy bandwidth")
    ax.set_xscale("log")
    ax.set_xlabel("elements in the tensor (fp32)")
    ax.set_ylabel("GB/s moved by the update")
    ax.set_title("One tensor's SWA update: bandwidth against size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def metadata(device, bandwidth):
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "swa_fast_build": swa_fast.ops.BUILD_INFO,
        "commit": commit,
        "device": str(device),
        "copy_GBps": bandwidth / 1e9,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="every shape set and dtype, longer timing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sets", nargs="*", choices=list(SHAPE_SETS), help="shape sets to run")
    p.add_argument("--out", default="bench_results", help="folder for results.json and the plot")
    p.add_argument("--min-run-time", type=float, help="seconds of timing per method and workload")
    args = p.parse_args(argv)

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
    top = 9 if device.type == "cuda" else 8
    sizes = [10**k for k in range(4, top + 1)] if args.full else [10**k for k in range(4, 8)]
    sweep = bench_sweep(sizes, device, min_run_time, bandwidth)
    extras = bench_moments_and_snapshots(SHAPE_SETS[sets[0]](), sets[0], device, min_run_time, bandwidth)
    extras += bench_tiny_model(device, min_run_time, bandwidth)
    print()
    print_table(sweep + extras)
    targets = check_targets(rows + sweep, device)
    print("\ntargets (issue 5), from ratios measured in this run:")
    print_targets(targets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"meta": metadata(device, bandwidth), "rows": rows + sweep + extras, "targets": targets}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\njson: {out / 'results.json'}")
    plot(rows, out / "lerp_bandwidth.png")
    plot_sweep(sweep, bandwidth, out / "lerp_sweep.png")


if __name__ == "__main__":
    main()
