"""PostHocEMA's snapshots on disk: their file names and format, reading them (memory mapped), the
background writer (temporary name, fsync, rename, so a crash never leaves half a snapshot) and the
host copy a snapshot is taken into without stalling training."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..flat import _shaped_parts, copy_lists

if TYPE_CHECKING:  # (manager imports this module)
    from .manager import PostHocEMA

SNAPSHOT_FORMAT = "swa_fast.PostHocEMA snapshot"
_SNAPSHOT_NAME = re.compile(r"^snapshot-(\d+)\.pt$")


def snapshot_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"snapshot-{step:010d}.pt"


def list_snapshots(directory: str | os.PathLike) -> dict[int, Path]:
    """step -> file of every whole snapshot in `directory` (a snapshot is written under a temporary
    name and renamed when complete, so a file with a snapshot's name is a whole one)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"swa_fast.posthoc: expected a directory of snapshots, got {str(directory)!r}")
    found = {}
    for path in directory.iterdir():
        match = _SNAPSHOT_NAME.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def load_snapshot(path: Path, mmap: bool = True) -> dict:
    """A snapshot file's contents (tensors memory-mapped: read when used), checked to be one."""
    try:
        snapshot = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 (any unreadable file is the same error to the caller)
        raise ValueError(f"swa_fast.posthoc: {str(path)!r} is not a readable snapshot ({error})") from error
    keys = ("format", "step", "progress", "sigma_rels", "gammas", "names", "groups", "flats", "integers")
    if (
        not isinstance(snapshot, dict)
        or snapshot.get("format") != SNAPSHOT_FORMAT
        or any(k not in snapshot for k in keys)
    ):
        raise ValueError(
            f"swa_fast.posthoc: {str(path)!r} is not a PostHocEMA snapshot (expected a dict with "
            f"format {SNAPSHOT_FORMAT!r} and keys {list(keys)})"
        )
    return snapshot


def named_averages(snapshot: dict) -> list[dict[str, Tensor]]:
    """A loaded snapshot's averages, per tracked profile (in `snapshot["sigma_rels"]` order), as
    name -> tensor (views of its flat tensors) in the model's order."""
    shapes = [torch.Size(s) for s in snapshot["shapes"]]
    out = []
    for flats in snapshot["flats"]:
        tensors: list[Tensor] = [torch.empty(0)] * len(shapes)
        for indices, flat in zip(snapshot["groups"], flats):
            for i, view in zip(indices, _shaped_parts(flat, [shapes[i] for i in indices])):
                tensors[i] = view
        out.append(dict(zip(snapshot["names"], tensors)))
    return out


def _write_atomically(path: Path, payload: dict) -> None:
    """torch.save to a temporary name beside `path`, flushed to disk, then renamed over `path`: a
    reader (or a crash) sees the whole file or none of it."""
    # A name of its own (two writers of one step must not rename each other's half files).
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(temporary)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    with contextlib.suppress(OSError):  # the rename itself, on file systems that allow it
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def stop_writer(jobs: queue.Queue, thread: threading.Thread) -> None:
    jobs.put(None)
    thread.join()


class SnapshotWriter:
    """A background thread that writes snapshots, one at a time, in order. A job waits for its
    host copy to land (CUDA events) before it is serialised; `free` is set once the host buffer may
    be written again. The first error is kept and raised by `check()`. Its owner stops it with
    `stop_writer` (a weakref.finalize of the manager: when the manager is collected, and at
    interpreter exit, after the pending jobs are written)."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.free = threading.Event()
        self.free.set()
        self.error: BaseException | None = None
        self.failed_path: Path | None = None
        self.thread = threading.Thread(target=self._run, name="swa_fast snapshot writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            path, payload, copied = job
            try:
                for event in copied:
                    event.synchronize()
                if self.error is None:
                    _write_atomically(path, payload)
            except BaseException as error:  # noqa: BLE001 (kept, raised in the training thread)
                self.error, self.failed_path = error, path
            finally:
                self.free.set()
                self.jobs.task_done()

    def submit(self, path: Path, payload: dict, copied: list) -> None:
        self.free.clear()
        self.jobs.put((path, payload, copied))

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(
                f"swa_fast.PostHocEMA: writing the snapshot {str(self.failed_path)!r} failed: "
                f"{self.error!r}; no later snapshot was written"
            ) from self.error

    def flush(self) -> None:
        self.jobs.join()
        self.check()


class HostSnapshot:
    """Host memory that a snapshot is copied into (pinned for a GPU average) and the payload that is
    saved from it: per tracked profile one flat tensor per group of the average, the names and
    shapes that `named_averages` cuts them back into (a few objects to pickle, however many tensors
    the model has: the writer thread holds the GIL less)."""

    def __init__(self, manager: PostHocEMA, dtype: torch.dtype | None) -> None:
        average = manager.average
        self.pin = torch.cuda.is_available() and any(g.device.type == "cuda" for g in average.groups)
        self.flats = [
            [
                torch.empty(g.buffer.numel(), dtype=dtype or g.dtype, pin_memory=self.pin)
                for g in average.groups
            ]
            for _ in manager._profiles
        ]
        self.integers = [torch.empty_like(t, device="cpu", pin_memory=self.pin) for t in manager._integers]
        self.payload = {
            "format": SNAPSHOT_FORMAT,
            "sigma_rels": list(manager.sigma_rels),
            "gammas": list(manager.gammas),
            "use_buffers": manager.use_buffers,
            "names": manager.tracked.floating_names,
            "shapes": [list(v.shape) for v in average.views],
            "groups": [list(g.indices) for g in average.groups],
            "flats": self.flats,  # per profile, per group
            "integers": dict(zip(manager.tracked.integer_names, self.integers)),
        }

    def copy_from(self, sources: list[Tensor], integers: list[Tensor], backend: str | None) -> list:
        """Copy `sources` (the profiles' flat buffers, in `flats` order) and the integer buffers here;
        from a GPU on a side stream of each device (returns the events to wait for), on the CPU by one
        fused copy."""
        dests = [flat for flats in self.flats for flat in flats]
        if not any(s.is_cuda for s in sources + integers):
            copy_lists(dests, sources, backend=backend)
            copy_lists(self.integers, integers)
            return []
        events = []
        for device in sorted({s.device for s in sources + integers if s.is_cuda}, key=str):
            stream = _snapshot_stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for dst, src in zip(dests + self.integers, sources + integers):
                    if src.device == device:
                        dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            events.append(event)
        for dst, src in zip(dests + self.integers, sources + integers):
            if not src.is_cuda:
                dst.copy_(src)
        return events


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _snapshot_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]
