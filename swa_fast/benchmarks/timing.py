"""How the benchmark measures: the median time of one call, the copy of the same bytes every figure
is set against (timed in the same rounds as the methods), the extra memory one call holds, and the
protocol that times several methods in turns and turns their times into a row of figures each."""

from __future__ import annotations

import gc
import os
import time

import torch

import swa_fast

ROUNDS = 3
# The row of the copy each workload's methods are set against (of_copy_bw = its time / theirs).
COPY = "copy (same bytes)"


def median_seconds(fn, device: torch.device, min_run_time: float) -> float:
    """The median time of one call of `fn` over at least `min_run_time` seconds: CUDA events per
    call on a GPU; on the CPU, blocks of calls long enough for the clock (about a millisecond)."""
    if device.type == "cuda":
        return _median_cuda(fn, min_run_time)
    start = time.perf_counter()
    fn()  # also warms up: first-call caches are not a call's cost
    calls = max(1, int(1e-3 / max(time.perf_counter() - start, 1e-9)))
    times = []
    deadline = time.perf_counter() + min_run_time
    while len(times) < 5 or time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return sorted(times)[len(times) // 2]


def _median_cuda(fn, min_run_time: float) -> float:
    fn()  # warm: first-call caches are not a call's cost
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


def copy_candidates(moved: int, device: torch.device) -> dict:
    """Plain passes that move `moved` bytes, as methods to time beside a workload's: a copy in place
    (x.mul_(1), which writes the lines it has just read, as an update does), out of place
    (swa_fast.copy_, the cheapest call there is), and a pass reading two bytes for each one written
    (a.add_(b), an fp32 lerp_'s mix: writing costs more than reading, so a read-heavier update
    could outrun a one-to-one copy). The fastest is the most a streaming update of those bytes can
    reach here: its time becomes the `COPY` row's (`merge_copies`)."""
    n = max(1, moved // 8)  # 4 bytes read and 4 written per fp32 element
    src, dst = torch.randn(n, device=device), torch.randn(n, device=device)
    m = max(1, moved // 12)  # 8 bytes read and 4 written per element, in the same two tensors
    a, b = dst[:m], src[:m]
    return {
        f"{COPY} in place": lambda: src.mul_(1.0),  # (times 1: the values stay)
        f"{COPY} out of place": lambda: swa_fast.copy_([dst], [src]),
        f"{COPY} 2 reads a write": lambda: a.add_(b),
    }


def merge_copies(seconds: dict, candidates: dict) -> None:
    """Replaces the copies' times (and callables) by the fastest one's, as the `COPY` row."""
    variants = [m for m in seconds if m.startswith(f"{COPY} ")]
    fastest = min(variants, key=seconds.__getitem__)
    seconds[COPY], candidates[COPY] = seconds[fastest], candidates[fastest]
    for m in variants:
        del seconds[m], candidates[m]


def copy_bandwidth(device: torch.device, min_run_time: float) -> float:
    """Read + write bytes per second of an in-place pass over 256 MiB, beyond every cache: the
    machine's streaming bandwidth, printed at the start and kept in the JSON's metadata. (The
    figures' own baseline is the copy of each workload's bytes, timed with it: `COPY`.)"""
    x = torch.randn(64 * 1024 * 1024, device=device)
    return 2 * x.nbytes / median_seconds(lambda: x.mul_(1.0), device, min_run_time)


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
    # Kineto, under the profiler, writes its own lines to stderr (profiler_start / profiler_stop at
    # every profile, and "gpuGetDeviceCount failed" where a CUDA build of torch has no GPU): its
    # log level 6 keeps them quiet. Read when the profiler starts; a user's own setting stands.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    for event in events:
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def time_methods(candidates, labels, moved, device, min_run_time):
    """Rows of figures for `candidates` (name -> callable) and for a copy of the same bytes
    (`COPY`), which take turns over ROUNDS rounds so that a drift of the machine hits them all
    alike; ratios against the first method (the naive baseline) and against torch's AveragedModel
    when it ran. `labels`: workload, params (dtype), tensors, elements; `moved`: the bytes one call
    must move."""
    candidates = {**candidates, **copy_candidates(moved, device)}
    samples = {method: [] for method in candidates}
    for _ in range(ROUNDS):
        for method, fn in candidates.items():
            samples[method].append(median_seconds(fn, device, min_run_time / ROUNDS))
    medians = {method: sorted(times)[len(times) // 2] for method, times in samples.items()}
    merge_copies(medians, candidates)
    return figures(candidates, medians, labels, moved, device)


def figures(candidates, seconds, labels, moved, device):
    """A row of figures per method from its time per call (`seconds`, with the `COPY` row's), as
    `time_methods` gives: of_copy_bw is the copy's time over the method's."""
    rows = []
    for method, t in seconds.items():
        rows.append(
            {
                **labels,
                "method": method,
                "median_ms": t * 1e3,
                "GB/s": moved / t / 1e9,
                "of_copy_bw": seconds[COPY] / t,
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


def add_ratios(rows, key: str, prefix: str) -> None:
    """rows[key] = the time of the row whose method is `prefix` + its own, over its own time, for
    every row that has such a baseline in the same run (of the same params)."""
    times = {(r["params"], r["method"]): r["median_ms"] for r in rows}
    for r in rows:
        baseline = times.get((r["params"], f"{prefix} {r['method']}"))
        if baseline is not None:
            r[key] = baseline / r["median_ms"]
