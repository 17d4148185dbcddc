"""Where a merge's result goes, tensor by tensor in the order it was planned: safetensors on disk
(one file, or shards with a Hugging Face index when `max_shard_size` is given), written under a
temporary name and renamed when whole (`atomic_files.replacing`), or tensors in memory.

Both give the merge a buffer to compute each chunk into (`buffer`) and take it back (`commit`), so
the in-memory result is computed in place and the file's chunks go through one reused buffer."""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor

from ..atomic_files import replacing
from . import safetensors_format
from .inputs import TensorInfo

INDEX_NAME = "model.safetensors.index.json"


def shard_plan(entries: dict[str, TensorInfo], max_shard_size: int | None) -> list[list[str]]:
    """The tensors of each shard, in order: a new shard when the next tensor would take this one
    over `max_shard_size` bytes (a larger tensor alone in its shard), as Hugging Face shards."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, info in entries.items():
        if max_shard_size is not None and shards[-1] and size + info.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += info.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def output_files(
    path: Path, entries: dict[str, TensorInfo], max_shard_size: int | None
) -> list[tuple[Path, list[str]]]:
    """Each file the output `path` will hold and its tensors: `path` itself when it names a
    `.safetensors` file, else the files of the folder `path`."""
    if path.suffix == ".safetensors":
        if max_shard_size is not None:
            raise ValueError(
                "swa_fast.merge: --max-shard-size writes a folder of shards, but the output "
                f"{os.fspath(path)!r} names a .safetensors file; give a folder name"
            )
        return [(path, list(entries))]
    shards = shard_plan(entries, max_shard_size)
    return [(path / name, names) for name, names in zip(shard_names(len(shards)), shards)]


def check_output(path: Path) -> None:
    """Refuse, before anything is read, an output that cannot be written whole."""
    if not path.parent.is_dir():
        raise ValueError(f"swa_fast.merge: the output's folder {os.fspath(path.parent)!r} does not exist")
    if path.suffix != ".safetensors" and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(
            f"swa_fast.merge: the output folder {os.fspath(path)!r} exists and is not empty; "
            "remove it or name another (a merge never writes into an existing model)"
        )
    if path.suffix == ".safetensors" and path.is_dir():
        raise ValueError(f"swa_fast.merge: the output {os.fspath(path)!r} is a folder, not a file")


class SafetensorsOutput:
    """Writes the planned tensors (`entries`, in order) into safetensors files under a temporary
    name, renamed into place when the `with` block ends with every tensor written."""

    def __init__(
        self,
        path: str | os.PathLike,
        entries: dict[str, TensorInfo],
        metadata: dict[str, str],
        max_shard_size: int | None,
        chunk_bytes: int,
    ) -> None:
        self.path = Path(path)
        self._entries = entries
        self._metadata = metadata
        self._files = output_files(self.path, entries, max_shard_size)
        self._buffer = torch.empty(chunk_bytes, dtype=torch.uint8)
        self._stack = ExitStack()
        self._pending: Iterator[str] = iter(())
        self._file: AppendingFile | None = None

    @property
    def paths(self) -> list[Path]:
        return [file for file, _ in self._files]

    def __enter__(self) -> SafetensorsOutput:
        folder = self.path.suffix != ".safetensors"
        self._root = root = self._stack.enter_context(replacing(self.path, folder=folder))
        self._temporary_files = iter(
            [(root / file.name if folder else root, names) for file, names in self._files]
        )
        self._written: list[str] = []
        return self

    def _next_file(self) -> None:
        if self._file is not None:
            self._file.close()
        file, names = next(self._temporary_files)
        self._file = AppendingFile(file)
        info = {name: (self._entries[name].dtype, self._entries[name].shape) for name in names}
        self._file.write(safetensors_format.header_bytes(info, self._metadata))
        self._pending = iter(names)

    def buffer(self, name: str, start: int, count: int, dtype: torch.dtype) -> Tensor:
        return self._buffer[: count * dtype.itemsize].view(dtype)

    def commit(self, name: str, start: int, chunk: Tensor) -> None:
        if start == 0:
            expected = next(self._pending, None)
            while expected is None:  # this file is full: the next one
                self._next_file()
                expected = next(self._pending, None)
            assert expected == name, (expected, name)  # the merge writes in the planned order
            self._written.append(name)
        self._file.write(memoryview(chunk.view(torch.uint8).numpy()))

    def __exit__(self, kind, error, traceback) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            if kind is None:
                file.close()
            else:
                file.abandon()
        if kind is None:
            try:
                self._finish()
            except BaseException as failure:
                self._stack.__exit__(type(failure), failure, failure.__traceback__)  # removes the temporary
                raise
        self._stack.__exit__(kind, error, traceback)  # renames into place, or removes the temporary

    def _finish(self) -> None:
        if len(self._written) != len(self._entries):
            missing = [name for name in self._entries if name not in self._written]
            raise RuntimeError(f"swa_fast.merge: the output lacks {missing[:8]} (not written whole)")
        if len(self._files) > 1:
            index = {
                "metadata": {"total_size": sum(info.nbytes for info in self._entries.values())},
                "weight_map": {name: file.name for file, names in self._files for name in names},
            }
            (self._root / INDEX_NAME).write_text(json.dumps(index, indent=2))


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class AppendingFile:
    """A new file written from start to end, bypassing the page cache (O_DIRECT) where the file
    system allows it: a merge's output must reach the disk anyway (it is fsynced before its rename)
    and is not read back, and buffered writes of new pages cost far more than the data's copy into
    an aligned block (docs/benchmarks.md). Bytes are gathered into one of two aligned staging
    buffers; a full one is written by a background thread while the other fills; the last block is
    padded, then the file cut to its length. Where O_DIRECT is refused (some file systems) or
    `direct=False`, the bytes are written plainly as they come."""

    BLOCK = 4096  # O_DIRECT's alignment of memory, offsets and lengths, on the file systems we meet
    STAGE = 8 << 20

    def __init__(self, path: str | os.PathLike, direct: bool = True) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._direct: int | None = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:
                pass
        # page-aligned, as O_DIRECT needs
        self._stages = [mmap.mmap(-1, self.STAGE) for _ in range(2)] if self._direct is not None else []
        self._writer = ThreadPoolExecutor(1, "swa_fast.merge writer") if self._stages else None
        self._in_flight: Future | None = None
        self._filled = 0
        self._length = 0

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        self._length += len(data)
        if self._direct is None:
            _write_all(self._fd, data)
            return
        while data:
            n = min(len(data), self.STAGE - self._filled)
            self._stages[0][self._filled : self._filled + n] = data[:n]
            self._filled += n
            data = data[n:]
            if self._filled == self.STAGE:
                self._write_stage(self.STAGE)

    def _write_stage(self, nbytes: int) -> None:
        """Hand the filled stage to the writer thread (after the previous one's write), fill the other."""
        self._wait()
        self._in_flight = self._writer.submit(_write_all, self._direct, memoryview(self._stages[0])[:nbytes])
        self._stages.reverse()
        self._filled = 0

    def _wait(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()  # raises what the write raised

    def close(self) -> None:
        """Write what is gathered and close (the caller fsyncs)."""
        try:
            if self._direct is not None:
                if self._filled:
                    padded = -(-self._filled // self.BLOCK) * self.BLOCK
                    self._stages[0][self._filled : padded] = bytes(padded - self._filled)
                    self._write_stage(padded)
                self._wait()
                os.ftruncate(self._fd, self._length)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close without writing what is gathered (the file is being thrown away)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)  # a write in flight ends before its memory goes
            self._writer = None
        for fd in (self._direct, self._fd):
            if fd is not None:
                os.close(fd)
        self._direct = self._fd = None
        for stage in self._stages:
            stage.close()
        self._stages = []


class MemoryOutput:
    """The result as tensors in memory (`tensors`), each chunk computed in place."""

    def __init__(self, entries: dict[str, TensorInfo]) -> None:
        self.tensors = {name: torch.empty(info.shape, dtype=info.dtype) for name, info in entries.items()}

    def buffer(self, name: str, start: int, count: int, dtype: torch.dtype) -> Tensor:
        return self.tensors[name].view(-1)[start : start + count]

    def commit(self, name: str, start: int, chunk: Tensor) -> None:
        pass

    def __enter__(self) -> MemoryOutput:
        return self

    def __exit__(self, *exc) -> None:
        pass
