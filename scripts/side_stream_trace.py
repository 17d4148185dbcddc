"""Does SideStream's averaging run alongside the next forward pass? Trains a model with
`swa_fast.SWA(model, side_stream=True)` on a GPU, records a few steps with the profiler, writes the
trace (chrome://tracing, Perfetto) and says how much of the averaging kernels' time overlapped
kernels of other streams.

    python scripts/side_stream_trace.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import swa_fast

AVERAGING_KERNEL = "multi_tensor_kernel"


def overlap(trace_path: Path) -> tuple[float, float, int]:
    """(averaging kernels' time in µs, the part of it other streams' kernels ran alongside, their
    count) in a chrome trace."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    ours = [e for e in kernels if AVERAGING_KERNEL in e["name"]]
    total = shared = 0.0
    for k in ours:
        start, end = k["ts"], k["ts"] + k["dur"]
        total += k["dur"]
        stream = k["args"].get("stream")
        others = [o for o in kernels if o["args"].get("stream") != stream]
        spans = sorted((max(start, o["ts"]), min(end, o["ts"] + o["dur"])) for o in others)
        covered, at = 0.0, start
        for a, b in spans:  # union of the spans (empty ones, of kernels that did not overlap, add nothing)
            a = max(a, at)
            if b > a:
                covered += b - a
                at = b
        shared += covered
    return total, shared, len(ours)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(1024, 16, 4096, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 8).cuda()  # ~100M parameters: a long update
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    swa = swa_fast.SWA(model, side_stream=True)
    x = torch.randn(8, 256, 1024, device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
        swa.update(model)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            step()
        torch.cuda.synchronize()
    trace = out / "side_stream_trace.json"
    prof.export_chrome_trace(str(trace))
    total, shared, count = overlap(trace)
    fraction = shared / total if total else 0.0
    print(
        f"side stream: {count} averaging kernels, {total / 1e3:.2f} ms, {fraction:.0%} of it alongside "
        f"other streams' kernels (trace: {trace})"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_results"))
