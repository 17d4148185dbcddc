"""How the benchmark measures: the median time of one call, the copy bandwidth every figure is set
against, the extra memory one call holds, and the protocol that times several methods in turns and
turns their times into a row of figures each."""

from __future__ import annotations

import gc
import time

import torch

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


def fastest_blocks(candidates, device: torch.device, min_run_time: float, blocks: int = 15) -> dict:
    """method -> (fastest, median) seconds per call over `blocks` blocks of calls, the candidates
    taking turns block by block, the garbage collector off (as timeit has it). For fixed costs of a
    few microseconds, where the VM's noise only ever adds time and moves a median by a third from
    run to run, the fastest block is the cost itself. Each candidate's block is as many calls as
    take it about `min_run_time / blocks`; on a GPU a block ends with a synchronisation, so a
    call's device work counts where it is longer than its host work."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def seconds_per_call(fn, calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return (time.perf_counter() - start) / calls

    calls = {}
    for method, fn in candidates.items():  # each candidate's calls per block, from ten calls
        calls[method] = max(1, int(min_run_time / blocks / seconds_per_call(fn, 10)))
    samples = {method: [] for method in candidates}
    collecting = gc.isenabled()
    gc.disable()
    try:
        for _ in range(blocks):
            for method, fn in candidates.items():
                samples[method].append(seconds_per_call(fn, calls[method]))
    finally:
        if collecting:
            gc.enable()
    return {method: (min(times), sorted(times)[len(times) // 2]) for method, times in samples.items()}


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


def time_methods(candidates, labels, moved, device, min_run_time, bandwidth):
    """Rows of figures for `candidates` (name -> callable), which take turns over ROUNDS rounds so
    that a drift of the machine hits them all alike; ratios against the first method (the naive
    baseline) and against torch's AveragedModel when it ran. `labels`: workload, params (dtype),
    tensors, elements; `moved`: the bytes one call must move."""
    samples = {method: [] for method in candidates}
    for _ in range(ROUNDS):
        for method, fn in candidates.items():
            samples[method].append(median_seconds(fn, device, min_run_time / ROUNDS))
    medians = {method: sorted(times)[len(times) // 2] for method, times in samples.items()}
    return figures(candidates, medians, labels, moved, device, bandwidth)


def figures(candidates, seconds, labels, moved, device, bandwidth):
    """A row of figures per method from its time per call (`seconds`), as `time_methods` gives."""
    rows = []
    for method, t in seconds.items():
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
