"""`python -m swa_fast merge INPUT... --output PATH`: `swa_fast.merge` on the command line, with a
progress bar of the bytes read and `--dry-run` to see what a merge would do."""

from __future__ import annotations

import argparse
import re
import sys

import torch

from . import merge, methods

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def byte_size(text: str) -> int:
    """`5GB`, `500MiB`, `1000000`: a number of bytes (decimal and binary units, as Hugging Face's)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MiB or 1000000, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m swa_fast merge",
        description="Merge checkpoints into one safetensors model, tensor by tensor (docs/merging.md).",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="checkpoint files or folders (a folder of "
                   "checkpoints stands for its members in step order)")  # fmt: skip
    p.add_argument("--output", "-o", required=True, help="a .safetensors file, or a folder")
    p.add_argument("--method", default="mean", choices=methods.METHODS)
    p.add_argument("--weights", type=float, nargs="+", metavar="W", help="one weight per input")
    p.add_argument("--base", help="the base model (task-arithmetic, ties, dare)")
    p.add_argument(
        "--dtype", choices=list(DTYPES), help="the output's floating dtype (default: each tensor's own)"
    )
    p.add_argument("--last", type=int, help="merge the last K checkpoints (LAWA's k)")
    p.add_argument("--every", type=int, default=1, help="... taken every S-th (default 1)")
    p.add_argument("--decay", type=float, help="ema: the decay per checkpoint")
    p.add_argument(
        "--schedule", default="linear", choices=methods.WSM_SCHEDULES, help="wsm: the decay emulated"
    )
    p.add_argument("--scale", type=float, default=1.0, help="task-arithmetic, ties, dare: lambda (default 1)")
    p.add_argument("--density", type=float, default=0.2, help="ties: the fraction kept (default 0.2)")
    p.add_argument("--drop", type=float, default=0.9, help="dare: the drop probability (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="dare: the seed (default 0)")
    p.add_argument("--max-shard-size", type=byte_size, help="write a folder of shards of at most this size")
    p.add_argument(
        "--memory-limit", type=byte_size, default="256MiB", help="the chunk buffers' size (default 256MiB)"
    )
    p.add_argument("--allow-non-finite", action="store_true", help="write inf or NaN instead of refusing")
    p.add_argument("--dry-run", action="store_true", help="say what would be read and written, read no data")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = merge(
            args.inputs, args.output, method=args.method, weights=args.weights, base=args.base,
            dtype=DTYPES.get(args.dtype), last=args.last, every=args.every, decay=args.decay,
            schedule=args.schedule, scale=args.scale, density=args.density, drop=args.drop, seed=args.seed,
            max_shard_size=args.max_shard_size, allow_non_finite=args.allow_non_finite, dry_run=args.dry_run,
            progress=not (args.quiet or args.dry_run), memory_limit=args.memory_limit,
        )  # fmt: skip
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.describe())
    if not args.dry_run:
        rate = result.bytes_read / max(result.seconds, 1e-9) / 2**20
        print(f"done       in {result.seconds:.2f} s ({rate:.0f} MiB/s read)")
    return 0
