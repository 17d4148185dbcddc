"""The command line of a benchmark file run on its own (`python -m swa_fast.benchmarks.<file>`): a
device, a shape set and the timing length."""

from __future__ import annotations

import argparse

import torch

from swa_fast.benchmarks.shapes import SHAPE_SETS


def standalone_args(description: str, argv=None) -> tuple[argparse.Namespace, torch.device]:
    """(arguments, device) for a benchmark file's own `main`."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--set", default="gpt2-small", choices=list(SHAPE_SETS))
    p.add_argument("--min-run-time", type=float, default=0.5)
    args = p.parse_args(argv)
    return args, torch.device(args.device)
