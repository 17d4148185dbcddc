"""PostHocEMA's snapshots on disk: their file names, their versioned format and its one reader
(memory mapped, checked), the background writer (temporary name, fsync, rename, so a crash never
leaves half a snapshot) and the host copy a snapshot is taken into without stalling training.

Code outside this module names snapshot files by `snapshot_path` / `list_snapshots`, writes them by
`save_snapshot` and reads them by `load_snapshot` (a `Snapshot`), so the file names and the format
are this module's alone."""

from __future__ import annotations

import math
import os
import queue
import re
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..atomic_files import replacing
from ..flat import _shaped_parts, copy_lists

if TYPE_CHECKING:  # (manager imports this module)
    from .manager import PostHocEMA

# --- file names -------------------------------------------------------------------------------------

_PREFIX, _SUFFIX = "snapshot-", ".pt"  # snapshot-<step, 10 digits>.pt
_NAME_PATTERN = re.compile(rf"^{re.escape(_PREFIX)}(\d+){re.escape(_SUFFIX)}$")


def snapshot_path(directory: str | os.PathLike, step: int) -> Path:
    """The file of the snapshot of update `step` in `directory`."""
    return Path(directory) / f"{_PREFIX}{step:010d}{_SUFFIX}"


def list_snapshots(directory: str | os.PathLike) -> dict[int, Path]:
    """step -> file of every whole snapshot in `directory`, by step (a snapshot is written under a
    temporary name and renamed when complete, so a file with a snapshot's name is a whole one)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"swa_fast.posthoc: expected a directory of snapshots, got {str(directory)!r}")
    found = {}
    for path in directory.iterdir():
        match = _NAME_PATTERN.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


# --- the format -------------------------------------------------------------------------------------
# A snapshot file is a torch.save'd dict: "format" says what it is, "version" how its other keys are
# laid out. `save_snapshot` writes the current version (`_file_contents`); `load_snapshot` reads every
# version in _KEYS_OF into a `Snapshot`. A new layout is a new SNAPSHOT_VERSION, written and read here.
#   version 1: the fields of `Snapshot` but `run` (read with run None: of an unknown run)
#   version 2: version 1 and "run", the training run that wrote the snapshot

SNAPSHOT_FORMAT = "swa_fast.PostHocEMA snapshot"
SNAPSHOT_VERSION = 2
# Snapshots written before files carried a version hold the version 1 layout without the key.
_VERSION_OF_UNVERSIONED = 1


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One snapshot: every tracked average at update `step`, with what is needed to cut it back into
    the model's tensors. Read from a file, its tensors are memory mapped (read when used)."""

    step: int  # the update count
    progress: float  # the training progress at that update
    sigma_rels: list[float]  # the tracked profiles, in the order of `flats`
    gammas: list[float]
    use_buffers: bool
    names: list[str]  # the model's floating tensors, in order
    shapes: list[list[int]]
    groups: list[list[int]]  # per flat group of the average, its tensors' positions in `names`
    flats: list[list[Tensor]]  # per profile, per group: the group's tensors in one flat tensor
    integers: dict[str, Tensor]  # the integer buffers (with use_buffers), by name
    run: str | None = None  # the training run that wrote it (None: written before runs were recorded)

    def flat_lengths(self) -> list[int]:
        """Each group's flat length (as the writer's FlatBuffer laid it out, padding included)."""
        return [flat.numel() for flat in self.flats[0]] if self.flats else []


# Each version's keys besides "format" and "version": each a field of `Snapshot`, under its name.
_VERSION_1_KEYS = (
    "step",
    "progress",
    "sigma_rels",
    "gammas",
    "use_buffers",
    "names",
    "shapes",
    "groups",
    "flats",
    "integers",
)
_KEYS_OF = {1: _VERSION_1_KEYS, 2: (*_VERSION_1_KEYS, "run")}


def _file_contents(snapshot: Snapshot) -> dict:
    """What the file of `snapshot` holds, in the current version."""
    fields_by_key = {key: getattr(snapshot, key) for key in _KEYS_OF[SNAPSHOT_VERSION]}
    return {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, **fields_by_key}


def load_snapshot(path: str | os.PathLike, mmap: bool = True) -> Snapshot:
    """The snapshot in the file `path` (tensors memory-mapped unless `mmap=False`), checked to be a
    whole PostHocEMA snapshot of a version this code reads, whose parts fit together."""
    contents = _load_file(Path(path), mmap)
    keys = _KEYS_OF[_check_format_and_version(contents, path)]
    missing = [key for key in keys if key not in contents]
    if missing:
        raise ValueError(
            f"swa_fast.posthoc: {str(path)!r} is not a PostHocEMA snapshot (expected the keys "
            f"{list(keys)}, it lacks {missing})"
        )
    snapshot = Snapshot(**{key: contents[key] for key in keys})
    if snapshot.run is not None and not isinstance(snapshot.run, str):
        raise _damaged(path, f"its run is {snapshot.run!r} (expected a string)")
    _check_counts(snapshot, path)
    _check_flat_lengths(snapshot, path)
    return snapshot


def _load_file(path: Path, mmap: bool) -> object:
    # weights_only: a file holding anything but tensors and plain containers is refused, not run.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 (any unreadable file is the same error to the caller)
        raise ValueError(f"swa_fast.posthoc: {str(path)!r} is not a readable snapshot ({error})") from error


def _check_format_and_version(contents: object, path: str | os.PathLike) -> int:
    """The file's format version, checked to be one this code reads."""
    if not isinstance(contents, dict) or contents.get("format") != SNAPSHOT_FORMAT:
        got = f"format {contents.get('format')!r}" if isinstance(contents, dict) else type(contents).__name__
        raise ValueError(
            f"swa_fast.posthoc: {str(path)!r} is not a PostHocEMA snapshot (expected a dict with format "
            f"{SNAPSHOT_FORMAT!r}, got {got})"
        )
    version = contents.get("version", _VERSION_OF_UNVERSIONED)
    if type(version) is not int or version not in _KEYS_OF:
        readable = ", ".join(str(v) for v in _KEYS_OF)
        raise ValueError(
            f"swa_fast.posthoc: {str(path)!r} is a snapshot of format version {version!r}; this swa_fast "
            f"reads versions {readable} (a newer snapshot needs the swa_fast that wrote it)"
        )
    return version


def _damaged(path: str | os.PathLike, what: str) -> ValueError:
    return ValueError(f"swa_fast.posthoc: {str(path)!r} is damaged: {what}")


def _check_counts(snapshot: Snapshot, path: str | os.PathLike) -> None:
    """One sigma_rel, gamma and average per profile; every tensor named, shaped and in one group."""
    profiles = len(snapshot.sigma_rels)
    if profiles == 0 or len(snapshot.gammas) != profiles or len(snapshot.flats) != profiles:
        raise _damaged(
            path,
            f"it holds {profiles} sigma_rels, {len(snapshot.gammas)} gammas and {len(snapshot.flats)} "
            "averages (expected as many of each, at least one)",
        )
    tensors = len(snapshot.names)
    grouped = sorted(i for group in snapshot.groups for i in group)
    if len(snapshot.shapes) != tensors or grouped != list(range(tensors)):
        raise _damaged(
            path,
            f"it names {tensors} tensors, shapes {len(snapshot.shapes)} and groups positions {grouped} "
            "(expected each tensor once)",
        )


def _check_flat_lengths(snapshot: Snapshot, path: str | os.PathLike) -> None:
    """Every profile's flats as long as the first's, each long enough for its group's tensors."""
    lengths = snapshot.flat_lengths()
    per_profile = [[flat.numel() for flat in flats] for flats in snapshot.flats]
    if any(profile_lengths != lengths for profile_lengths in per_profile):
        raise _damaged(path, f"its averages have the wrong sizes: {per_profile} (expected all as the first)")
    needed = [sum(math.prod(snapshot.shapes[i]) for i in group) for group in snapshot.groups]
    if len(lengths) != len(needed) or any(n < k for n, k in zip(lengths, needed)):
        raise _damaged(
            path, f"its averages do not hold their groups: flat lengths {lengths}, the groups need {needed}"
        )


def named_averages(snapshot: Snapshot) -> list[dict[str, Tensor]]:
    """A snapshot's averages, per tracked profile (in `snapshot.sigma_rels` order), as
    name -> tensor (views of its flat tensors) in the model's order."""
    shapes = [torch.Size(s) for s in snapshot.shapes]
    out = []
    for flats in snapshot.flats:
        tensors: list[Tensor] = [torch.empty(0)] * len(shapes)
        for indices, flat in zip(snapshot.groups, flats):
            for i, view in zip(indices, _shaped_parts(flat, [shapes[i] for i in indices])):
                tensors[i] = view
        out.append(dict(zip(snapshot.names, tensors)))
    return out


# --- writing ----------------------------------------------------------------------------------------


def save_snapshot(path: str | os.PathLike, snapshot: Snapshot) -> None:
    """Write `snapshot` to the file `path` in the current format version, whole or not at all."""
    _write_atomically(Path(path), _file_contents(snapshot))


def _write_atomically(path: Path, payload: dict) -> None:
    """torch.save to `path` whole or not at all (`atomic_files.replacing`)."""
    with replacing(path) as temporary:
        torch.save(payload, temporary)


def snapshot_runs(directory: str | os.PathLike) -> dict[int, str | None]:
    """step -> the training run of every snapshot in `directory` (each file's header read, checked)."""
    return {step: load_snapshot(path).run for step, path in list_snapshots(directory).items()}


def describe_run(run: str | None) -> str:
    """A run's name in a message."""
    return "a run written before snapshots recorded their run" if run is None else f"run {run}"


def check_replaceable(path: Path, run: str | None) -> None:
    """Raise unless `path` is free or holds a snapshot of `run` (which a resumed run writes again):
    a snapshot of another training run, or any other file, is never replaced."""
    if not path.exists():
        return
    try:
        theirs = load_snapshot(path).run
    except ValueError as error:
        raise ValueError(
            f"swa_fast.PostHocEMA: {str(path)!r} is there already and is not replaced ({error})"
        ) from error
    if theirs != run:
        raise ValueError(
            f"swa_fast.PostHocEMA: {str(path)!r} is a snapshot of another training run "
            f"({describe_run(theirs)}; this one is {describe_run(run)}): not replaced"
        )


def stop_writer(jobs: queue.Queue, thread: threading.Thread) -> None:
    jobs.put(None)
    thread.join()


@dataclass(frozen=True)
class WriteFailure:
    """A snapshot that the writer could not write."""

    path: Path
    step: int
    error: BaseException


class SnapshotWriter:
    """A background thread that writes snapshots, one at a time, in order. A job waits for its
    host copy to land (CUDA events) before it is serialised; `free` is set once the host buffer may
    be written again. A job that fails is kept (`take_failures`, for its owner to report once) and
    the writer goes on with the next one. Its owner stops it with `stop_writer` (a weakref.finalize
    of the manager: when the manager is collected, and at interpreter exit, after the pending jobs
    are written)."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.free = threading.Event()
        self.free.set()
        self._failures: list[WriteFailure] = []
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="swa_fast snapshot writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            path, snapshot, copied = job
            try:
                for event in copied:
                    event.synchronize()
                check_replaceable(path, snapshot.run)
                save_snapshot(path, snapshot)
            except BaseException as error:  # noqa: BLE001 (kept, reported in the training thread)
                with self._lock:
                    self._failures.append(WriteFailure(path, snapshot.step, error))
            finally:
                self.free.set()
                self.jobs.task_done()

    def submit(self, path: Path, snapshot: Snapshot, copied: list) -> None:
        """Write `snapshot` to `path` once the host copy `copied` (CUDA events) has landed."""
        self.free.clear()
        self.jobs.put((path, snapshot, copied))

    def take_failures(self) -> list[WriteFailure]:
        """The writes that failed since the last call (each one given once)."""
        if not self._failures:  # (every update asks: no lock taken when there is nothing)
            return []
        with self._lock:
            failures, self._failures = self._failures, []
        return failures

    def wait(self) -> None:
        """Until every job submitted so far is done (written, or failed)."""
        self.jobs.join()


class HostSnapshot:
    """Host memory that a snapshot is copied into (pinned for a GPU average) and the `Snapshot` that
    is saved from it: per tracked profile one flat tensor per group of the average, the names and
    shapes that `named_averages` cuts them back into (a few objects to pickle, however many tensors
    the model has: the writer thread holds the GIL less). A group can be copied in the average's
    own dtype instead of the snapshot dtype (`copy_from`'s `wide`), into buffers made when first
    needed."""

    def __init__(self, manager: PostHocEMA, dtype: torch.dtype | None) -> None:
        average = manager.average
        self.pin = torch.cuda.is_available() and any(g.device.type == "cuda" for g in average.groups)
        self._own_dtypes = [g.dtype for g in average.groups]
        self._lengths = [g.buffer.numel() for g in average.groups]
        profiles = len(manager._profiles)
        self._narrow = [[self._empty(g, dtype) for g in range(len(self._lengths))] for _ in range(profiles)]
        self._wide: dict[int, list[Tensor]] = {}  # group -> its buffer per profile, in its own dtype
        self.flats = self._narrow  # as last copied
        self.integers = [torch.empty_like(t, device="cpu", pin_memory=self.pin) for t in manager._integers]
        self._fixed = {  # what every snapshot of this manager holds alike
            "sigma_rels": list(manager.sigma_rels),
            "gammas": list(manager.gammas),
            "use_buffers": manager.use_buffers,
            "names": manager.tracked.floating_names,
            "shapes": [list(v.shape) for v in average.views],
            "groups": [list(g.indices) for g in average.groups],
            "integers": dict(zip(manager.tracked.integer_names, self.integers)),
        }

    def _empty(self, group: int, dtype: torch.dtype | None) -> Tensor:
        dtype = dtype or self._own_dtypes[group]
        return torch.empty(self._lengths[group], dtype=dtype, pin_memory=self.pin)

    def _flats_for(self, wide: Collection[int]) -> list[list[Tensor]]:
        """Per profile, per group: the buffer a snapshot is copied into (the own dtype's for `wide`)."""
        for g in wide:
            if g not in self._wide:
                self._wide[g] = [self._empty(g, None) for _ in self._narrow]
        return [
            [self._wide[g][k] if g in wide else flat for g, flat in enumerate(flats)]
            for k, flats in enumerate(self._narrow)
        ]

    def snapshot_at(self, step: int, progress: float, run: str | None) -> Snapshot:
        """The snapshot of update `step` at `progress` of `run`, made of this host memory (as last
        copied)."""
        return Snapshot(step=step, progress=progress, run=run, flats=self.flats, **self._fixed)

    def copy_from(
        self, sources: list[Tensor], integers: list[Tensor], backend: str | None, wide: Collection[int] = ()
    ) -> list:
        """Copy `sources` (the profiles' flat buffers, in `flats` order) and the integer buffers here,
        the groups in `wide` in their own dtype; from a GPU on a side stream of each device (returns
        the events to wait for), on the CPU by one fused copy."""
        self.flats = self._flats_for(wide)
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
