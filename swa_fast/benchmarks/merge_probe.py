"""One checkpoint merge in a process of its own, for benchmarks/merge.py: its seconds, and its peak
resident memory above the process's own after its imports, printed as one line of JSON.

merge.py runs this file's source with `python -c` (not the file by path: its folder, which holds a
`deepspeed.py`, would come first on sys.path and shadow the library), so it imports nothing from
swa_fast at the top: mergekit's interpreter, which may not see swa_fast, runs it too. argv[1] is a
JSON object: "method" (`swa_fast`, `naive` or `mergekit`), "inputs" (paths), "output" (a path),
"runs" (merges in a row; the output is removed between them; default 1).

Resident memory is what a user's `top` shows: VmRSS and its peak VmHWM in /proc/self/status count
the anonymous pages and the mapped file pages that are resident. The peak is reset to the current
resident size after the imports (writing 5 to /proc/self/clear_refs, Linux 4.0 on), so a peak
during the imports does not count; where that is refused, the peak since the start is kept and the
JSON says so."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time


def status_bytes(key: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> bool:
    """Set VmHWM to the current VmRSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def naive_merge(inputs, output) -> None:
    """The mean of the checkpoints the way people write it (fairseq's
    scripts/average_checkpoints.py, with safetensors): each checkpoint loaded whole, its tensors
    added into an fp32 accumulator (a copy of the first), divided, and the result saved in the
    inputs' dtypes. It holds the accumulator and one whole checkpoint at a time."""
    import torch
    from safetensors.torch import load_file, save_file

    total: dict = {}
    dtypes: dict = {}
    for path in inputs:
        state = load_file(path)
        for name, t in state.items():
            if name not in total:
                total[name], dtypes[name] = t.to(torch.float32, copy=True), t.dtype
            else:
                total[name].add_(t)
        del state  # (fairseq keeps it until the next load replaces it: a second checkpoint at once)
    save_file({name: t.div_(len(inputs)).to(dtypes[name]) for name, t in total.items()}, output)


def _mergekit(spec):
    """mergekit-yaml's command, called in this process after its imports: what its users run."""
    from mergekit.scripts.run_yaml import main

    args = [spec["config"], spec["output"], *spec.get("options", [])]
    return lambda: main.main(args=args, standalone_mode=False)


def _prepare(spec):
    """The merge to run, with every import done (the imports are not the merge's cost)."""
    method = spec["method"]
    if method == "swa_fast":
        import swa_fast

        return lambda: swa_fast.merge(spec["inputs"], spec["output"])
    if method == "naive":
        import safetensors.torch  # noqa: F401 (imported here, before the peak is reset)
        import torch  # noqa: F401

        return lambda: naive_merge(spec["inputs"], spec["output"])
    if method == "mergekit":
        return _mergekit(spec)
    raise ValueError(f"unknown method {method!r}")


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def main() -> None:
    spec = json.loads(sys.argv[1])
    run = _prepare(spec)
    after_imports = status_bytes("VmRSS")
    reset = reset_peak()
    seconds = []
    for _ in range(spec.get("runs", 1)):
        _remove(spec["output"])
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    peak = status_bytes("VmHWM")
    print(json.dumps({"seconds": seconds, "after_imports": after_imports, "peak": peak, "peak_reset": reset}))


if __name__ == "__main__":
    main()
