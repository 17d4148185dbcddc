"""The command line of a benchmark file run on its own (`python benchmarks/<file>.py`): a device,
a shape set, the timing length, and the copy bandwidth its figures are set against."""

from __future__ import annotations

import argparse

import torch

from swa_fast.benchmarks.shapes import SHAPE_SETS
from swa_fast.benchmarks.timing import copy_bandwidth


def standalone_args(description: str, argv=None) -> tuple[argparse.Namespace, torch.device, float]:
    """(arguments, device, copy bandwidth in bytes/s) for a benchmark file's own `main`."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--set", default="gpt2-small", choices=list(SHAPE_SETS))
    p.add_argument("--min-run-time", type=float, default=0.5)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    return args, device, copy_bandwidth(device, args.min_run_time)
