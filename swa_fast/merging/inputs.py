"""The checkpoints a merge reads: each format opened as a `Checkpoint`, which names its tensors
(`tensors`: name -> `TensorInfo`) from its header alone and copies any range of a tensor's elements
into a buffer the merge gives (`read`), so that no input is ever held whole.

- safetensors files: read with `os.preadv` straight into the buffer (no memory map);
- Hugging Face sharded folders (`*.safetensors.index.json`, `pytorch_model.bin.index.json`): each
  tensor read from its shard;
- torch `.pt` / `.bin` / `.pth` / `.ckpt` state dicts: loaded with `weights_only=True, mmap=True`;
  the pages of a range are dropped from the process (`madvise(MADV_DONTNEED)`) once copied, so the
  resident memory stays bounded;
- `torch.distributed.checkpoint` folders: one tensor loaded at a time (whole: DCP reads whole
  tensors);
- PostHocEMA snapshot files (`swa_fast.posthoc`): the average of its first profile;
- a state dict in memory (the Python API, `greedy_soup`'s soups).

`open_checkpoints` turns the user's inputs into checkpoints, a folder of checkpoints
(`checkpoint-500/`, `step_100.safetensors`, `snapshot-0000000100.pt`, ...) becoming its members in
step order."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import safetensors_format

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth", ".ckpt")
# What a folder holding one model is recognised by, in this order (Hugging Face's names first).
_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Checkpoint:
    """One input of a merge. `tensors` is known when it is opened; `read(name, start, out)` fills the
    1-D `out` (of the tensor's dtype) with the tensor's elements [start, start + len(out)) in
    row-major order."""

    path: str
    tensors: dict[str, TensorInfo]

    def read(self, name: str, start: int, out: Tensor) -> None:
        raise NotImplementedError

    def view(self, name: str, start: int, count: int) -> Tensor | None:
        """The elements [start, start + count) of a tensor as a 1-D tensor over the file's memory map
        (no copy: read where the page cache holds them), or None where the format has no such view
        (the caller then `read`s them into a buffer). Its pages are given back with `release`."""
        return None

    def close(self) -> None:
        """Let go of open files and mappings."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


# --- safetensors --------------------------------------------------------------------------------------


class SafetensorsFile(Checkpoint):
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._entries, self.metadata = safetensors_format.read_header(path)
        self.tensors = {name: TensorInfo(e.dtype, e.shape) for name, e in self._entries.items()}
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._mapped: Tensor | None = None  # the whole file, as bytes

    def view(self, name: str, start: int, count: int) -> Tensor | None:
        entry = self._entries[name]
        size = entry.dtype.itemsize
        if entry.begin % size:
            return None  # not aligned for its dtype in the file (a tensor after an odd-sized one): copied
        if self._mapped is None:
            with open(self.path, "rb") as f:  # private and writable (never written): a tensor may view it
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._mapped = torch.frombuffer(self._map, dtype=torch.uint8)
        first = entry.begin + start * size
        return self._mapped[first : first + count * size].view(entry.dtype)

    def read(self, name: str, start: int, out: Tensor) -> None:
        entry = self._entries[name]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view = memoryview(_bytes_of(out))
        offset = entry.begin + start * out.element_size()
        while view:  # a read may return fewer bytes than asked
            done = os.preadv(self._fd, [view], offset)
            if done == 0:
                raise ValueError(f"{self.path!r} is truncated: {name!r} ends past the end of the file")
            view, offset = view[done:], offset + done

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._mapped = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still held elsewhere: unmapped when freed
                self._map.close()
            self._map = None


def _bytes_of(t: Tensor):
    """A writable buffer over the memory of the contiguous CPU tensor `t`."""
    return (ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())


# --- tensors in memory, or memory mapped by torch ------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_PAGE = mmap.PAGESIZE


def touch(view: Tensor) -> None:
    """Map the pages of a memory-mapped view now (one element read per page), so that the thread
    that sums it finds them mapped: the page faults are taken by the reader thread."""
    if view.numel():
        view.view(-1).view(torch.uint8)[::_PAGE].sum()


def release(view: Tensor) -> None:
    """Let the kernel take back the pages of a memory-mapped view once it is summed: mapped file
    pages count in the resident memory that a user's `top` shows, so without this reading a 5 GB
    checkpoint through its map leaves 5 GB resident. (The pages stay in the page cache; a page the
    next chunk shares is mapped again when read.) Only for views of a file's private mapping:
    dropping pages of ordinary memory would zero them."""
    first = view.data_ptr()
    begin = first - first % _PAGE
    end = first + view.numel() * view.element_size()
    _libc.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), 4)  # MADV_DONTNEED


class TensorDict(Checkpoint):
    """Tensors held by a dict: in memory (`mapped=False`), or memory mapped by `torch.load`."""

    def __init__(self, path: str, tensors: Mapping[str, Tensor], mapped: bool) -> None:
        self.path = path
        for name, t in tensors.items():
            if not isinstance(t, Tensor):
                raise ValueError(f"{path!r}: {name!r} is a {type(t).__name__}, not a tensor")
        self._tensors = {name: t.detach() for name, t in tensors.items()}
        self.tensors = {name: TensorInfo(t.dtype, tuple(t.shape)) for name, t in tensors.items()}
        self._mapped = mapped
        self._contiguous: dict[str, Tensor] = {}  # tensors saved as strided views, copied (in memory)

    def view(self, name: str, start: int, count: int) -> Tensor | None:
        # Views only of the file's mapping (whose pages `release` gives back: never a copy in memory,
        # which that would zero), of tensors saved contiguous; the rest is copied by `read`.
        t = self._tensors[name]
        if not self._mapped or t.device.type != "cpu" or not t.is_contiguous():
            return None
        return t.view(-1)[start : start + count]

    def read(self, name: str, start: int, out: Tensor) -> None:
        t = self._tensors[name]
        if not t.is_contiguous():  # made contiguous once, when first read
            t = self._contiguous.get(name)
            if t is None:
                t = self._contiguous[name] = self._tensors[name].contiguous()
        out.copy_(t.view(-1)[start : start + out.numel()])


def _state_dict_of(contents: object, path: str) -> Mapping[str, Tensor]:
    """The state dict inside a loaded torch file: the file's dict itself, or the dict under
    "state_dict" (Lightning), "model" or "module" when the top level holds more than tensors."""
    if isinstance(contents, Mapping) and all(isinstance(v, Tensor) for v in contents.values()):
        return contents
    if isinstance(contents, Mapping):
        for key in ("state_dict", "model", "module"):
            inner = contents.get(key)
            if isinstance(inner, Mapping) and all(isinstance(v, Tensor) for v in inner.values()):
                return inner
    raise ValueError(
        f"{path!r} holds no state dict: expected a dict of tensors (or one under 'state_dict', 'model' "
        f"or 'module'), got {type(contents).__name__}"
        + (f" with keys {list(contents)[:8]}" if isinstance(contents, Mapping) else "")
    )


def torch_file(path: str | os.PathLike) -> Checkpoint:
    """A torch-saved state dict (or a PostHocEMA snapshot), memory mapped."""
    from ..posthoc import snapshots

    path = os.fspath(path)
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 (every unreadable file is the same refusal)
        raise ValueError(
            f"{path!r} is not a readable torch checkpoint ({type(error).__name__}: {error})"
        ) from None
    if isinstance(contents, Mapping) and contents.get("format") == snapshots.SNAPSHOT_FORMAT:
        return TensorDict(path, snapshot_tensors(snapshots.load_snapshot(path)), mapped=True)
    return TensorDict(path, _state_dict_of(contents, path), mapped=True)


def snapshot_tensors(snapshot) -> dict[str, Tensor]:
    """The average of a PostHocEMA snapshot's first profile and its integer buffers, by name."""
    from ..posthoc import snapshots

    return {**snapshots.named_averages(snapshot)[0], **snapshot.integers}


# --- torch.distributed.checkpoint ----------------------------------------------------------------------


class DcpFolder(Checkpoint):
    """A `torch.distributed.checkpoint` folder: its tensors from its metadata; each read loads one
    whole tensor (kept while its chunks are read), without a process group."""

    def __init__(self, path: str | os.PathLike) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = os.fspath(path)
        try:
            metadata = FileSystemReader(self.path).read_metadata()
        except Exception as error:  # noqa: BLE001
            raise ValueError(
                f"{self.path!r} is not a readable torch.distributed.checkpoint folder ({error})"
            ) from None
        self.tensors = {
            name: TensorInfo(meta.properties.dtype, tuple(meta.size))
            for name, meta in metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata)
        }
        self._loaded: tuple[str, Tensor] | None = None

    def read(self, name: str, start: int, out: Tensor) -> None:
        import torch.distributed.checkpoint as dcp

        if self._loaded is None or self._loaded[0] != name:
            info = self.tensors[name]
            whole = torch.empty(info.shape, dtype=info.dtype)
            self._loaded = None
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
                dcp.load({name: whole}, storage_reader=dcp.FileSystemReader(self.path), no_dist=True)
            self._loaded = (name, whole.reshape(-1))
        out.copy_(self._loaded[1][start : start + out.numel()])
        if start + out.numel() == self._loaded[1].numel():
            self._loaded = None  # its last chunk: let it go


# --- Hugging Face sharded folders ----------------------------------------------------------------------


class ShardedFolder(Checkpoint):
    """A model saved in shards with an index (`model.safetensors.index.json` or
    `pytorch_model.bin.index.json`): each tensor read from the shard the index names."""

    def __init__(self, index: Path) -> None:
        import json

        self.path = os.fspath(index.parent)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{os.fspath(index)!r} is not a readable shard index ({error})") from None
        self._shards = {file: _open_file(index.parent / file) for file in dict.fromkeys(weight_map.values())}
        self._shard_of = {}
        self.tensors = {}
        for file, shard in self._shards.items():
            for name, info in shard.tensors.items():
                if weight_map.get(name) == file:
                    self._shard_of[name] = shard
                    self.tensors[name] = info
        missing = [name for name in weight_map if name not in self.tensors]
        if missing:
            raise ValueError(f"{os.fspath(index)!r} names tensors its shards do not hold: {missing[:8]}")

    def read(self, name: str, start: int, out: Tensor) -> None:
        self._shard_of[name].read(name, start, out)

    def view(self, name: str, start: int, count: int) -> Tensor | None:
        return self._shard_of[name].view(name, start, count)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


# --- from paths ----------------------------------------------------------------------------------------


def _open_file(path: Path) -> Checkpoint:
    if not path.is_file():
        raise ValueError(f"{os.fspath(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    return torch_file(path)


def _model_in(folder: Path) -> Checkpoint | None:
    """The one model a folder holds, or None when it holds none (but perhaps checkpoints)."""
    if (folder / ".metadata").is_file():
        return DcpFolder(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json")) or sorted(folder.glob("*.bin.index.json"))
    if indexes:
        return ShardedFolder(indexes[0])
    for name in _MODEL_FILES:
        if (folder / name).is_file():
            return _open_file(folder / name)
    return None


_STEP = re.compile(r"(\d+)(?!.*\d)")  # the last number in a name


def _members(folder: Path) -> list[tuple[int, Path]]:
    """The checkpoints in a folder of checkpoints, by step (the last number in each name)."""
    found = []
    for child in folder.iterdir():
        match = _STEP.search(child.name)
        if match is None or child.name.startswith("."):
            continue
        if (child.is_file() and child.suffix in WEIGHT_SUFFIXES) or (child.is_dir() and _holds_model(child)):
            found.append((int(match.group(1)), child))
    return sorted(found)


def _holds_model(folder: Path) -> bool:
    return _is_one_model(folder) or any((folder / name).is_file() for name in _MODEL_FILES)


def expand(path: str | os.PathLike) -> list[Path]:
    """A path as the checkpoints it stands for: a file, a DCP folder or a sharded model itself; a
    folder holding checkpoints named with their step (a Trainer's `checkpoint-500/`, ...) as those,
    in step order, even beside a model file of its own (a Trainer's output folder); else a folder
    holding one model file."""
    path = Path(path)
    if path.is_file() or (path.is_dir() and _is_one_model(path)):
        return [path]
    if not path.is_dir():
        raise ValueError(f"{os.fspath(path)!r} does not exist")
    members = _members(path)
    if members:
        return [member for _, member in members]
    if _holds_model(path):
        return [path]
    raise ValueError(
        f"{os.fspath(path)!r} holds no checkpoint: expected a model file ({', '.join(WEIGHT_SUFFIXES)}), "
        "a Hugging Face or torch.distributed.checkpoint folder, or checkpoints named with their step"
    )


def _is_one_model(folder: Path) -> bool:
    """A folder that is one model however its files are named (its shards carry numbers too)."""
    return (folder / ".metadata").is_file() or any(folder.glob("*.index.json"))


def open_checkpoint(source) -> Checkpoint:
    """A checkpoint from a path (file or model folder) or a state dict in memory."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, Mapping):
        return TensorDict("<state dict>", source, mapped=False)
    path = Path(source)
    if path.is_dir():
        model = _model_in(path)
        if model is None:
            raise ValueError(f"{os.fspath(path)!r} holds no model (no index, model file or DCP metadata)")
        return model
    return _open_file(path)
