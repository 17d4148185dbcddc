"""A merge's one pass over its inputs: the plan (which tensors, in what order, checked before
anything is read), then each tensor in chunks of bounded size, read from every input by a
background thread (mapped from the page cache, or copied into reused buffers) while an earlier
chunk is summed and written.

Memory: SLOTS chunks per input in flight and one for the output, `chunk_bytes` each, whatever the
model's size; TIES and DARE hold whole tensors."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops
from . import inputs
from .inputs import Checkpoint, TensorInfo

AVERAGED = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Per buffer: small enough to stay in cache between the read and the sum.
MIN_CHUNK, MAX_CHUNK = 1 << 20, 4 << 20
# Chunks in flight: one summed while the next ones are read (2 left the threads waiting on each other).
SLOTS = 4


@dataclass(frozen=True)
class Item:
    """One tensor of the output: averaged from every input, or taken from one (`source`)."""

    name: str
    info: TensorInfo  # as every input holds it
    out_dtype: torch.dtype
    source: int | None = None  # the input an integer tensor is taken from; None: averaged


def plan(checkpoints: Sequence[Checkpoint], dtype: torch.dtype | None, take_integers_from: int) -> list[Item]:
    """The output's tensors in the first input's order, refused unless every input holds the same
    names with the same shapes and dtypes; floating tensors averaged (into `dtype` when given),
    integer and bool ones taken from input `take_integers_from`."""
    first = checkpoints[0]
    for other in checkpoints[1:]:
        missing = [n for n in first.tensors if n not in other.tensors]
        extra = [n for n in other.tensors if n not in first.tensors]
        if missing or extra:
            raise ValueError(
                f"swa_fast.merge: {other.path!r} does not hold the tensors of {first.path!r}: "
                + "; ".join(
                    f"{what} {names[:8]}{' ...' if len(names) > 8 else ''} ({len(names)})"
                    for what, names in (("missing", missing), ("extra", extra))
                    if names
                )
            )
    items = []
    for name, info in first.tensors.items():
        for other in checkpoints[1:]:
            got = other.tensors[name]
            if got != info:
                raise ValueError(
                    f"swa_fast.merge: {name!r} is {_show(info)} in {first.path!r} but {_show(got)} in "
                    f"{other.path!r}; every input must hold it alike"
                )
        items.append(_item(name, info, dtype, take_integers_from))
    return items


def _show(info: TensorInfo) -> str:
    return f"{str(info.dtype).removeprefix('torch.')} {list(info.shape)}"


def _item(name: str, info: TensorInfo, dtype: torch.dtype | None, take_integers_from: int) -> Item:
    if info.dtype in AVERAGED:
        return Item(name, info, dtype or info.dtype)
    if info.dtype.is_floating_point or info.dtype.is_complex:
        raise ValueError(
            f"swa_fast.merge: {name!r} is {_show(info)}; averaged tensors must be float64, float32, "
            "float16 or bfloat16"
        )
    return Item(name, info, info.dtype, source=take_integers_from)  # integers and bools: never averaged


def chunk_bytes_for(count: int, memory_limit: int) -> int:
    """Each buffer's size: `memory_limit` shared by SLOTS chunks of every input and the output."""
    return max(MIN_CHUNK, min(MAX_CHUNK, memory_limit // (SLOTS * count + 1)))


@dataclass
class Chunk:
    item: Item
    start: int
    count: int
    views: list[Tensor]  # of each input read (the one source of a taken tensor)


def _chunks(items: Sequence[Item], chunk_bytes: int | None) -> Iterator[tuple[Item, int, int]]:
    for item in items:
        numel = item.info.numel
        widest = max(item.info.dtype.itemsize, item.out_dtype.itemsize)  # the output's buffer holds it too
        step = numel if chunk_bytes is None else max(1, chunk_bytes // widest)
        for start in range(0, max(numel, 1), step):
            yield item, start, min(step, numel - start)


def read_ahead(
    checkpoints: Sequence[Checkpoint], items: Sequence[Item], chunk_bytes: int | None
) -> Iterator[Chunk]:
    """Every chunk of every item, read by a background thread up to SLOTS chunks ahead of the caller:
    a view of the file's memory map where the input has one (its pages mapped by the reader, and
    given back by it once the caller is done), else copied into one of SLOTS sets of buffers.
    `chunk_bytes` None: whole tensors."""
    slots = [[torch.empty(chunk_bytes or 0, dtype=torch.uint8) for _ in checkpoints] for _ in range(SLOTS)]
    free: queue.Queue = queue.Queue()
    ready: queue.Queue = queue.Queue()
    for slot in slots:
        free.put((slot, []))
    stop = threading.Event()

    def read() -> None:
        try:
            for item, start, count in _chunks(items, chunk_bytes):
                slot, done = free.get()
                for view in done:  # pages the caller has summed: given back here, off its thread
                    inputs.release(view)
                if stop.is_set():
                    return
                sources = range(len(checkpoints)) if item.source is None else [item.source]
                views = [
                    _read(checkpoints[k], item, start, count, slot[k] if chunk_bytes else None)
                    for k in sources
                ]
                ready.put(
                    (Chunk(item, start, count, [v for v, _ in views]), slot, [v for v, m in views if m])
                )
            ready.put(None)
        except BaseException as error:  # noqa: BLE001 (raised in the caller's thread)
            ready.put(error)

    thread = threading.Thread(target=read, name="swa_fast.merge reader", daemon=True)
    thread.start()
    try:
        while (got := ready.get()) is not None:
            if isinstance(got, BaseException):
                raise got
            chunk, slot, mapped = got
            yield chunk
            free.put((slot, mapped))
    finally:
        stop.set()
        free.put((slots[0], []))  # wakes a reader waiting for a slot, which then sees `stop`
        thread.join()


def _read(
    checkpoint: Checkpoint, item: Item, start: int, count: int, buffer: Tensor | None
) -> tuple[Tensor, bool]:
    """A chunk of one input: its memory-mapped view, its pages mapped now (True: to give back), or
    its elements copied into `buffer` (a new tensor without one)."""
    view = checkpoint.view(item.name, start, count)
    if view is not None:
        inputs.touch(view)
        return view, True
    dtype = item.info.dtype
    view = torch.empty(count, dtype=dtype) if buffer is None else buffer[: count * dtype.itemsize].view(dtype)
    if count:
        checkpoint.read(item.name, start, view)
    return view, False


Combine = Callable[[Chunk, Tensor], None]


def linear(weights: Sequence[float]) -> Combine:
    """out = sum_k weights[k] * input_k, one fused op per chunk."""
    weights = torch.tensor(weights, dtype=torch.float64)

    def combine(chunk: Chunk, out: Tensor) -> None:
        ops.weighted_sum_([out], [[v] for v in chunk.views], weights)

    return combine


def run(
    checkpoints: Sequence[Checkpoint],
    items: Sequence[Item],
    combine: Combine,
    output,
    chunk_bytes: int | None,
    allow_non_finite: bool,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write every item into `output` (its `buffer` and `commit`), chunk by chunk."""
    with _leaving_a_core_to_the_reader():
        for chunk in read_ahead(checkpoints, items, chunk_bytes):
            _merge_chunk(checkpoints, chunk, combine, output, allow_non_finite)
            if progress is not None:
                progress(sum(v.numel() * v.element_size() for v in chunk.views))


@contextlib.contextmanager
def _leaving_a_core_to_the_reader() -> Iterator[None]:
    """torch's CPU threads one fewer while the merge runs: the reader thread (mapping pages, or
    copying) needs a core of its own, and torch's threads waiting between ops would take it
    (docs/benchmarks.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _merge_chunk(
    checkpoints: Sequence[Checkpoint], chunk: Chunk, combine: Combine, output, allow_non_finite: bool
) -> None:
    """One chunk of the output: summed (or taken as it is), checked, handed to the output."""
    item = chunk.item
    out = output.buffer(item.name, chunk.start, chunk.count, item.out_dtype)
    if item.source is not None:
        out.copy_(chunk.views[0])
    else:
        combine(chunk, out)
        if not allow_non_finite and not _finite(out):
            raise ValueError(_non_finite_message(checkpoints, chunk))
    output.commit(item.name, chunk.start, out)


def _finite(t: Tensor) -> bool:
    """Whether every element of `t` is finite: its sum is, unless an element is inf or NaN or the
    sum overflows, which the exact test then tells apart (a sum is one vectorised pass, where
    torch.isfinite(t).all() writes and reads a bool tensor and costs several)."""
    return t.numel() == 0 or bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _non_finite_message(checkpoints: Sequence[Checkpoint], chunk: Chunk) -> str:
    holding = [c.path for c, v in zip(checkpoints, chunk.views) if not bool(torch.isfinite(v).all())]
    where = f"inf or NaN in {holding}" if holding else "the weighted sum overflows"
    return (
        f"swa_fast.merge: the merged {chunk.item.name!r} is not finite ({where}); nothing was written. "
        "Pass allow_non_finite=True (--allow-non-finite) to write it anyway"
    )
