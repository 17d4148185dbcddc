"""Merging saved checkpoints: SWA after the fact, LAWA, WSM, EMA over checkpoints, model soups,
task arithmetic, TIES and DARE, streamed from disk with bounded memory (docs/merging.md).

`merge(inputs, output, method=...)` checks every input's header, plans the output, then reads each
tensor in chunks (a background thread reads the next chunk while the current one is summed by
`swa_fast.weighted_sum_`) and writes safetensors under a temporary name, renamed when whole.
`greedy_soup(inputs, evaluate)` builds a greedy model soup with it. `python -m swa_fast merge` is the
command line (`cli.py`)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import inputs as _inputs
from . import methods, streaming
from .methods import Settings
from .output import AppendingFile, MemoryOutput, SafetensorsOutput, check_output

__all__ = ["MergeResult", "greedy_soup", "merge"]

DEFAULT_MEMORY_LIMIT = 256 << 20


@dataclass
class MergeResult:
    """What a merge read and wrote (or, for a dry run, would)."""

    method: str
    inputs: list[str]  # in the order merged (the base first, for the methods that take one)
    weights: list[float] | None  # each input's weight in the sum (None: TIES, DARE)
    outputs: list[str]  # the files written (none in memory or for a dry run)
    tensors: dict[str, Tensor] | None  # the result, when no output path was given
    averaged: int  # tensors averaged
    taken: dict[str, str] = field(default_factory=dict)  # integer tensor -> the input it was taken from
    bytes_read: int = 0
    bytes_written: int = 0
    memory_bound: int = 0  # the merge's buffers at most (bytes)
    seconds: float = 0.0

    def describe(self) -> str:
        lines = [f"method     {self.method}"]
        for i, path in enumerate(self.inputs):
            weight = f"  weight {self.weights[i]:.6g}" if self.weights is not None else ""
            lines.append(f"input {i:<4d} {path}{weight}")
        lines += [f"output     {path}" for path in self.outputs]
        lines.append(
            f"tensors    {self.averaged} averaged, {len(self.taken)} integer tensors taken as they are"
        )
        if self.taken:
            lines.append(f"           integer tensors from {sorted(set(self.taken.values()))}")
        lines.append(f"reads      {_size(self.bytes_read)}, writes {_size(self.bytes_written)}")
        lines.append(f"memory     at most {_size(self.memory_bound)} of buffers")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return ""


def select(paths: Sequence, last: int | None, every: int) -> list:
    """The inputs merged: every given input, folders of checkpoints expanded in step order; with
    `last`, the last `last` of them taken `every` apart (the newest always in)."""
    expanded = []
    for source in paths:
        expanded += [source] if isinstance(source, Mapping) else _inputs.expand(source)
    if every < 1 or (last is not None and last < 1):
        raise ValueError(f"swa_fast.merge: last and every must be positive, got last={last}, every={every}")
    if last is None:
        return expanded if every == 1 else expanded[::-1][::every][::-1]
    chosen = expanded[::-1][::every][:last][::-1]
    if len(chosen) < last:
        raise ValueError(
            f"swa_fast.merge: asked for the last {last} checkpoints {every} apart, but only "
            f"{len(chosen)} of the {len(expanded)} found are"
        )
    return chosen


def merge(
    inputs: Sequence[str | os.PathLike | Mapping[str, Tensor]],
    output: str | os.PathLike | None = None,
    *,
    method: str = "mean",
    weights: Sequence[float] | None = None,
    base: str | os.PathLike | Mapping[str, Tensor] | None = None,
    dtype: torch.dtype | None = None,
    last: int | None = None,
    every: int = 1,
    decay: float | None = None,
    schedule: str = "linear",
    scale: float = 1.0,
    density: float = 0.2,
    drop: float = 0.9,
    seed: int = 0,
    max_shard_size: int | None = None,
    allow_non_finite: bool = False,
    dry_run: bool = False,
    progress: bool = False,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
) -> MergeResult:
    """Merge checkpoints into one, streamed tensor by tensor (docs/merging.md).

    Args:
        inputs: checkpoints: safetensors files, Hugging Face model folders (sharded with an index or
            not), torch `.pt` / `.bin` state dicts, `torch.distributed.checkpoint` folders, PostHocEMA
            snapshot files, state dicts in memory; a folder of checkpoints stands for its members
            in step order.
        output: a `.safetensors` file, or a folder (written with `model.safetensors`, or shards and
            an index with `max_shard_size`); None: the result is returned in memory
            (`MergeResult.tensors`).
        method: `mean` (weights normalised to sum to 1; uniform without weights), `lawa` (the mean
            of the `last` checkpoints), `ema` (over the inputs in order, with `decay`), `wsm`
            (weights of a `schedule` decay: linear, cosine, 1-sqrt), `task-arithmetic`, `ties`,
            `dare` (these three with a `base`: base + scale * sum_i weights[i] * (input_i - base)).
        weights: one per input (mean, task-arithmetic, ties, dare).
        base: the pre-trained model the task vectors are taken from.
        dtype: the floating tensors' dtype in the output (default: each tensor's own).
        last, every: merge only the last `last` inputs, `every` apart (LAWA's k and spacing).
        decay, schedule, scale, density, drop, seed: the methods' settings (docs/merging.md).
        max_shard_size: bytes per output shard (the output is then a folder with an index).
        allow_non_finite: write a result holding inf or NaN instead of refusing it.
        dry_run: check everything and say what would be read and written, reading no data.
        progress: a progress bar (tqdm) on stderr.
        memory_limit: the bytes of chunk buffers the merge may hold (TIES and DARE hold whole
            tensors instead).
    """
    given = tuple(float(w) for w in weights) if weights is not None else None
    settings = Settings(method, given, decay, schedule, float(scale), float(density), float(drop), int(seed))
    chosen = select(inputs, last, every)
    if method == "lawa" and last is None:
        raise ValueError("swa_fast.merge: method 'lawa' takes the last k checkpoints: give last=k (--last K)")
    methods.check_settings(settings, len(chosen))
    if (base is None) == (method in methods.NEEDS_BASE):
        raise ValueError(
            f"swa_fast.merge: method {method!r} "
            + ("needs a base model" if base is None else "takes no base model")
        )
    if output is not None:
        check_output(Path(output))
    checkpoints = []
    try:
        for source in ([base] if base is not None else []) + chosen:
            checkpoints.append(_inputs.open_checkpoint(source))
        return _merge_opened(checkpoints, output, settings, dtype, max_shard_size, allow_non_finite, dry_run,
                             progress, memory_limit)  # fmt: skip
    finally:
        for checkpoint in checkpoints:
            checkpoint.close()


def _merge_opened(checkpoints, output, settings, dtype, max_shard_size, allow_non_finite, dry_run, progress,
                  memory_limit) -> MergeResult:  # fmt: skip
    items = streaming.plan(checkpoints, dtype, take_integers_from=len(checkpoints) - 1)
    linear = settings.method in methods.LINEAR
    weights = methods.linear_weights(settings, len(checkpoints)) if linear else None
    chunk_bytes = streaming.chunk_bytes_for(len(checkpoints), memory_limit) if linear else None
    result = MergeResult(
        method=settings.method,
        inputs=[c.path for c in checkpoints],
        weights=weights,
        outputs=[],
        tensors=None,
        averaged=sum(item.source is None for item in items),
        taken={item.name: checkpoints[item.source].path for item in items if item.source is not None},
        bytes_read=sum(item.info.nbytes * (len(checkpoints) if item.source is None else 1) for item in items),
        bytes_written=sum(item.info.numel * item.out_dtype.itemsize for item in items),
    )
    largest = max((item.info.nbytes for item in items), default=0)
    result.memory_bound = (
        chunk_bytes * (streaming.SLOTS * len(checkpoints) + 1)
        if chunk_bytes is not None
        else largest * (streaming.SLOTS * len(checkpoints) + 3)  # whole tensors, and TIES' stack
    )
    entries = {item.name: _inputs.TensorInfo(item.out_dtype, item.info.shape) for item in items}
    if output is not None:
        result.memory_bound += 2 * AppendingFile.STAGE  # the output's staging blocks
        largest_out = max((info.nbytes for info in entries.values()), default=0)  # whole tensors' buffer
        sink = SafetensorsOutput(
            output, entries, _metadata(result), max_shard_size, chunk_bytes or largest_out
        )
        result.outputs = [os.fspath(p) for p in sink.paths]
    if dry_run:
        return result
    if output is None:
        sink = MemoryOutput(entries)
    combine = streaming.linear(weights) if linear else _nonlinear(settings)
    started = time.perf_counter()
    with sink, _progress_bar(progress, result.bytes_read) as advance:
        streaming.run(checkpoints, items, combine, sink, chunk_bytes, allow_non_finite, advance)
    result.seconds = time.perf_counter() - started
    if output is None:
        result.tensors = sink.tensors
    return result


def _metadata(result: MergeResult) -> dict[str, str]:
    """What the output's safetensors header says of its making (the integer tensors' origin too)."""
    made = {
        "method": result.method,
        "inputs": result.inputs,
        "weights": result.weights,
        "taken": result.taken,
    }
    return {"format": "pt", "swa_fast.merge": json.dumps(made)}


def _nonlinear(settings: Settings) -> streaming.Combine:
    """TIES or DARE over whole tensors: views[0] is the base, the rest the models."""

    def combine(chunk: streaming.Chunk, out: Tensor) -> None:
        base, models = chunk.views[0], chunk.views[1:]
        weights = settings.weights or (1.0,) * len(models)
        if settings.method == "ties":
            out.copy_(methods.ties(base, models, weights, settings))
        else:
            out.copy_(methods.dare(base, models, weights, settings, chunk.item.name))

    return combine


class _progress_bar:
    """A tqdm bar of the bytes read (a no-op unless asked)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # an optional extra: the merge goes on without a bar
                print("swa_fast.merge: pip install 'swa_fast[merge]' for a progress bar", file=sys.stderr)
                return
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge")

    def __enter__(self) -> Callable[[int], None] | None:
        return self._bar.update if self._bar is not None else None

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


def greedy_soup(
    inputs: Sequence[str | os.PathLike | Mapping[str, Tensor]],
    evaluate: Callable[[dict[str, Tensor]], float],
    output: str | os.PathLike | None = None,
    **merge_options,
) -> tuple[MergeResult, list[int]]:
    """A greedy model soup (Wortsman et al. 2022): the inputs ranked by their own score
    (`evaluate(state_dict)`, higher is better), then each added to the soup (the uniform mean of the
    models kept) when the soup with it scores at least as well as without. Returns the final merge
    (written to `output` when given) and the positions in `inputs` of the models kept, in the order
    they were added. Each candidate soup is a merge in memory of the soup so far (weight n / (n+1))
    and the candidate (1 / (n+1))."""
    scores = [evaluate(merge([source]).tensors) for source in inputs]
    ranked = sorted(range(len(inputs)), key=lambda i: -scores[i])
    kept = [ranked[0]]
    soup = merge([inputs[ranked[0]]]).tensors
    best = scores[ranked[0]]
    for i in ranked[1:]:
        n = len(kept)
        candidate = merge([soup, inputs[i]], weights=[n, 1], **merge_options).tensors
        score = evaluate(candidate)
        if score >= best:
            soup, best = candidate, score
            kept.append(i)
    final = merge([inputs[i] for i in kept], output, **merge_options)
    return final, kept
