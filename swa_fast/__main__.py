"""`python -m swa_fast info` prints what was built and what each device would use;
`python -m swa_fast bench [...]` runs the benchmark suite (swa_fast.benchmarks)."""

from __future__ import annotations

import argparse
import sys

import torch

from . import ops
from .ops import triton_kernels


def info() -> str:
    b = ops.BUILD_INFO
    cuda = f"built for {b['cuda_archs']} (CUDA {b['cuda_version']})" if b["cuda"] else "not built"
    threads = (
        f"{torch.get_num_threads()} ({'OpenMP' if torch.backends.openmp.is_available() else 'no OpenMP'})"
    )
    triton_version = getattr(triton_kernels.triton, "__version__", None) or triton_kernels.TRITON_ERROR
    lines = [
        f"swa_fast       {__import__('swa_fast').__version__}",
        f"extension      {'loaded' if ops._C is not None else ops.EXTENSION_ERROR}",
        f"CUDA kernels   {cuda}",
        f"built against  torch {b['torch_version'] or '-'}",
        f"torch          {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton         {triton_version}",
        f"CPU threads    {threads}",
        f"GPUs visible   {torch.cuda.device_count()}"
        + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""),
        "",
        "backend per device (chosen, the others usable, then why the rest cannot run):",
    ]
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            chosen = "none: no GPU is visible"
        else:
            try:
                chosen = ops.choose_backend(device)
                others = [name for name in ops.usable_backends(device) if name != chosen]
                chosen += f" (also usable: {', '.join(others)})" if others else ""
            except (RuntimeError, ValueError) as e:
                chosen = f"error: {e}"
        lines.append(f"  {device:5s} -> {chosen}")
        for name, reason in ops.backend_status(device).items():
            if reason is not None:
                lines.append(f"           {name}: {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swa_fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built and which backend each device uses")
    sub.add_parser("bench", help="run the benchmark suite (swa_fast.benchmarks)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        print(info())
        return 0
    from .benchmarks import run  # (the benchmarks import the integrations' libraries: only here)

    return run.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
