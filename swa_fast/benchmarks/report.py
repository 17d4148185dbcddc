"""What the benchmark writes: the table on the terminal, results.json with the machine's metadata,
and the two plots (bandwidth per method and workload; bandwidth against one tensor's size)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import swa_fast

TABLE_COLUMNS = [
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
CELL_FORMATS = {
    "peak_extra_MB": "{:.2f}",
    "median_ms": "{:.3f}",
    "GB/s": "{:.2f}",
    "of_copy_bw": "{:.2f}",
    "x_vs_naive": "{:.1f}x",
    "x_vs_AveragedModel": "{:.1f}x",
}


def print_table(rows):
    cols = TABLE_COLUMNS
    cells = [[CELL_FORMATS.get(c, "{}").format(r[c]) if c in r else "-" for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = " | ".join(c.ljust(w) for c, w in zip(cols, widths))
    print(line)
    print("-|-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))


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


def write_json(path, meta, rows, targets):
    path.write_text(json.dumps({"meta": meta, "rows": rows, "targets": targets}, indent=1))
    print(f"\njson: {path}")


def pyplot_or_none(path):
    """matplotlib.pyplot on a file-only backend, or None (said on the terminal) where it is missing:
    the plots are optional, the table and the JSON are not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no plot written to {path})")
        return None
    return plt


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def plot(rows, path):
    plt = pyplot_or_none(path)
    if plt is None:
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
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="a copy of the same bytes")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))], workloads, fontsize=8)
    ax.set_ylabel("fraction of a copy's bandwidth (higher is better)")
    ax.set_title("One SWA update: achieved bandwidth per method")
    ax.legend(fontsize=7, ncol=3)
    save(fig, path)


def plot_sweep(rows, path):
    plt = pyplot_or_none(path)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ax.plot([r["elements"] for r in mine], [r["GB/s"] for r in mine], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("elements in the tensor (fp32)")
    ax.set_ylabel("GB/s moved by the update")
    ax.set_title("One tensor's SWA update: bandwidth against size")
    ax.legend(fontsize=8)
    save(fig, path)


def duration(seconds: float) -> str:
    """A duration as people read it: 42s, 3m05s."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


class Progress:
    """A progress line per step on stderr (the tables go to stdout): a bar, the step's number and
    name, the time so far and, from the second step on, a rough estimate of the time left (the
    steps differ in length)."""

    WIDTH = 20

    def __init__(self, total: int) -> None:
        self.total, self.count, self.start = total, 0, time.perf_counter()

    def step(self, label: str) -> None:
        elapsed = time.perf_counter() - self.start
        left = (
            f", about {duration(elapsed / self.count * (self.total - self.count))} left" if self.count else ""
        )
        filled = self.WIDTH * self.count // self.total
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.count += 1
        print(
            f"[{bar}] {self.count}/{self.total} {label} ({duration(elapsed)}{left})",
            file=sys.stderr,
            flush=True,
        )

    def done(self) -> None:
        elapsed = duration(time.perf_counter() - self.start)
        print(
            f"[{'#' * self.WIDTH}] {self.total}/{self.total} done in {elapsed}", file=sys.stderr, flush=True
        )


def print_summary(targets, out: Path, took: str, allow_missed: bool) -> list:
    """The run in a few lines: targets met and missed (each missed one named), where the results
    are, how long it took; returns the missed targets."""
    missed = [t for t in targets if not t[2]]
    met = len(targets) - len(missed)
    print(f"\nsummary: {met} of {len(targets)} targets met, {len(missed)} MISSED; took {took}")
    for target, value, _ in missed:
        print(f"  MISSED {target}: {value}")
    print(f"  results: {out / 'results.json'}, plots: {out / 'lerp_bandwidth.png'}, {out / 'lerp_sweep.png'}")
    if missed:
        exit_status = "0 (--allow-missed)" if allow_missed else "1 (--allow-missed exits 0)"
        print(f"  exit status {exit_status}")
    return missed
