"""Files and folders written whole or not at all: written under a temporary name beside their own,
flushed to disk, then renamed, so a reader (or a crash, or an error half way) sees the whole result
or nothing under the final name. PostHocEMA's snapshots and the merge's outputs are written so."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk (opened again: for files written by another handle)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, racing other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _fsync_directory(path: Path) -> None:
    with contextlib.suppress(OSError):  # the rename itself, on file systems that allow it
        fsync_file(path)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (a file, or an empty folder with `folder=True`) to write
    the result into. When the block ends normally, every file written there is flushed to disk and
    the temporary path renamed to `path` (a file replaces an existing file; a folder needs `path` to
    be absent or an empty folder); when it raises, or the process dies, nothing is left under `path`
    (a killed process leaves its temporary `.<name>.*.tmp` beside it)."""
    path = Path(path)
    # A name of its own: two writers of one path must not rename each other's half files.
    # (mkstemp and mkdtemp make them private; the result gets the permissions any new file gets)
    if folder:
        temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        temporary.chmod(0o777 & ~_umask())
    else:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        temporary = Path(name)
        temporary.chmod(0o666 & ~_umask())
    try:
        yield temporary
        for written in temporary.iterdir() if folder else [temporary]:
            fsync_file(written)
        if folder:
            _fsync_directory(temporary)
            if path.is_dir():
                path.rmdir()  # an empty folder only (OSError otherwise: nothing is lost)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(temporary) if folder else temporary.unlink()
        raise
    _fsync_directory(path.parent)
