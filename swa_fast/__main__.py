"""`python -m swa_fast info` prints which swa_fast runs (from where), what was built and what each
device would use; `python -m swa_fast bench [...]` runs the benchmark suite (swa_fast.benchmarks);
`python -m swa_fast merge INPUT... --output PATH` merges checkpoints (swa_fast.merging)."""

from __future__ import annotations

import argparse
import sys

import torch

from . import ops
from ._version import __version__
from .ops import extension, triton_kernels


def origin() -> str:
    """Which swa_fast this is: its folder, and whether that is a source checkout."""
    root = extension.checkout_root()
    kind = f"the source checkout {root}" if root is not None else "an installed package"
    return f"{__version__} from {extension.PACKAGE_DIR} ({kind})"


def _backend_lines(device: str) -> list[str]:
    """The backend chosen for `device`, the others usable, then why each of the rest cannot run."""
    if device == "cuda" and not torch.cuda.is_available():
        chosen = "none: no GPU is visible"
    else:
        try:
            chosen = ops.choose_backend(device)
            others = [name for name in ops.usable_backends(device) if name != chosen]
            chosen += f" (also usable: {', '.join(others)})" if others else ""
        except (RuntimeError, ValueError) as e:
            chosen = f"error: {e}"
    lines = [f"  {device:5s} -> {chosen}"]
    for name, reason in ops.backend_status(device).items():
        if reason is not None:
            lines.append(f"           {name}: {reason}")
    return lines


def info() -> str:
    b = ops.BUILD_INFO
    openmp = "OpenMP" if torch.backends.openmp.is_available() else "no OpenMP"
    gpu = f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""
    lines = [
        f"swa_fast       {origin()}",
        f"extension      {'loaded' if ops._C is not None else 'not loaded: ' + str(ops.EXTENSION_ERROR)}",
        f"CUDA kernels   {extension.cuda_summary(b) if ops._C is not None else '-'}",
        f"built against  torch {b['torch_version'] or '-'}",
        f"torch          {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton         {triton_kernels.version()}",
        f"CPU threads    {torch.get_num_threads()} ({openmp})",
        f"GPUs visible   {torch.cuda.device_count()}{gpu}",
        "",
        "backend per device (chosen, the others usable, then why the rest cannot run):",
    ]
    for device in ("cpu", "cuda"):
        lines += _backend_lines(device)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swa_fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which swa_fast runs, what was built, which backend each device uses")
    sub.add_parser("bench", help="run the benchmark suite (`bench --help`: its options)", add_help=False)
    sub.add_parser("merge", help="merge checkpoints into one (`merge --help`: its options)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        print(info())
        return 0
    if args.command == "merge":
        from .merging import cli

        return cli.main(rest)
    from .benchmarks import run  # (the benchmarks import the integrations' libraries: only here)

    return run.main(rest)


if __name__ == "__main__":
    sys.exit(main())
